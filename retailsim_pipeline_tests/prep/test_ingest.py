"""Ingest of weekly LGSR files: validation, quarantine with exact line numbers, typed atomic outputs.

Every case starts from a real weekly file written by the generator (tiny preset, generated once per
module), copies it and corrupts a few of its lines with plain text edits; the rest stays valid.
"""

import datetime as dt
import random
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from retailsim_pipeline.config import generator_preset
from retailsim_pipeline.prep.generator import generate
from retailsim_pipeline.prep.ingest import (
    QUARANTINE_SCHEMA,
    IngestResult,
    LgsrFormatError,
    ingest_weekly_file,
    validate_transactions,
)
from retailsim_pipeline.prep.schema import (
    LGSR_COLUMNS,
    TRANSACTION_SCHEMA,
    lgsr_weekday,
    week_monday,
)
from retailsim_pipeline_tests.prep.lgsr_text import (
    COL,
    FILE_NAME,
    N_COLS,
    WEEK,
    field,
    no_tmp_files,
    q_entries,
    read_lines,
    set_fields,
    write_lines,
)



# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_week_file(tmp_path_factory) -> Path:
    """The first weekly file of a freshly generated tiny dataset (never modified by the tests)."""
    root = tmp_path_factory.mktemp("tiny_ingest")
    summary = generate(generator_preset("tiny"), root)
    src = root / "raw" / FILE_NAME
    assert src in [Path(f) for f in summary.files], summary.files
    lines = src.read_text().splitlines()
    assert lines[0].split(",") == list(LGSR_COLUMNS)
    assert len(lines) > 200, "the tiny week should hold a few hundred rows at least"
    assert '"' not in src.read_text(), "generated files are expected to be unquoted"
    # the edge cases below need both kinds of shopper in the real file
    assert any(line.split(",")[COL["CUST_CODE"]] == "" for line in lines[1:])
    assert any(line.split(",")[COL["CUST_CODE"]] != "" for line in lines[1:])
    return src


def as_strings(path: Path) -> pl.DataFrame:
    """What is really in a (clean) file: every field as text, plus its 1-based line number."""
    return pl.read_csv(path, infer_schema=False).with_row_index("line", offset=2)


def key_sequence(df: pl.DataFrame) -> list[tuple[str, str]]:
    return list(
        zip(
            df.get_column("PROD_CODE").cast(pl.String).to_list(),
            df.get_column("BASKET_ID").cast(pl.String).to_list(),
        )
    )


def expected_kept(original: Path, dropped_lines: set[int]) -> list[tuple[str, str]]:
    """PROD_CODE/BASKET_ID sequence of the original file without the given (1-based) lines."""
    return key_sequence(as_strings(original).filter(~pl.col("line").is_in(sorted(dropped_lines))))


def date_int(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


MONDAY = week_monday(WEEK)  # 2006-04-10


# ------------------------------------------------------------------------------------------------
# 1. A clean real file
# ------------------------------------------------------------------------------------------------


def test_clean_real_file_is_accepted_whole_with_the_typed_schema(week_copy, tmp_path):
    raw = as_strings(week_copy)
    accepted, quarantined = validate_transactions(week_copy)

    assert len(accepted) == len(raw) == len(read_lines(week_copy)) - 1
    assert quarantined.is_empty()
    assert dict(quarantined.schema) == QUARANTINE_SCHEMA
    assert dict(accepted.schema) == TRANSACTION_SCHEMA
    assert key_sequence(accepted) == key_sequence(raw)

    result = ingest_weekly_file(week_copy, tmp_path / "out", tmp_path / "quarantine")
    written = pl.read_parquet(result.output)
    assert result.output == tmp_path / "out" / "transactions_200607.parquet"
    assert result.quarantine == tmp_path / "quarantine" / "transactions_200607.parquet"
    assert list(written.columns) == list(LGSR_COLUMNS)
    assert dict(written.schema) == TRANSACTION_SCHEMA
    assert len(written) == len(raw)
    assert key_sequence(written) == key_sequence(raw)
    assert written.equals(accepted)

    # every value survives the typing (numbers compared as numbers, the rest as text)
    for c in LGSR_COLUMNS:
        got = written.get_column(c)
        want = raw.get_column(c)
        if c == "SPEND":
            assert got.to_list() == pytest.approx(want.cast(pl.Float64).to_list()), c
        else:
            assert got.cast(pl.String).to_list() == want.to_list(), c

    q = pl.read_parquet(result.quarantine)
    assert q.is_empty() and dict(q.schema) == QUARANTINE_SCHEMA
    assert result.rows == len(raw) and result.quarantined == 0 and result.reasons == {}
    assert result.quarantine_rate == 0.0


# ------------------------------------------------------------------------------------------------
# 2. Real-format edge cases are accepted
# ------------------------------------------------------------------------------------------------


def named_lines(lines: list[str]) -> list[int]:
    """0-based indexes of data lines of loyalty-card shoppers."""
    return [i for i in range(1, len(lines)) if field(lines[i], "CUST_CODE") != ""]


def spread(indexes: list[int], k: int = 3) -> list[int]:
    """First, middle and last of ``indexes`` (distinct)."""
    picks = [indexes[0], indexes[len(indexes) // 2], indexes[-1]][:k]
    assert len(set(picks)) == len(picks)
    return picks


def test_anonymous_shoppers_are_accepted_with_null_card_fields(week_copy):
    lines = read_lines(week_copy)
    # whole baskets lose their card (a basket is one shopper: every line of it)
    baskets = {field(lines[i], "BASKET_ID") for i in spread(named_lines(lines))}
    targets = [i for i in range(1, len(lines)) if field(lines[i], "BASKET_ID") in baskets]
    for i in targets:
        lines[i] = set_fields(lines[i], CUST_CODE="", CUST_PRICE_SENSITIVITY="", CUST_LIFESTAGE="")
    write_lines(week_copy, lines)
    n_anonymous = sum(field(line, "CUST_CODE") == "" for line in lines[1:])

    accepted, quarantined = validate_transactions(week_copy)
    assert q_entries(quarantined) == []
    assert len(accepted) == len(lines) - 1
    assert key_sequence(accepted) == key_sequence(as_strings(week_copy))
    card = accepted.select("CUST_CODE", "CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE")
    assert card.get_column("CUST_CODE").null_count() == n_anonymous
    for i in targets:
        assert card.row(i - 1) == (None, None, None)


XX_COLUMNS = [
    "CUST_PRICE_SENSITIVITY",
    "CUST_LIFESTAGE",
    "BASKET_PRICE_SENSITIVITY",
    "BASKET_TYPE",
    "BASKET_DOMINANT_MISSION",
]


@pytest.mark.parametrize("columns", [[c] for c in XX_COLUMNS] + [XX_COLUMNS], ids=XX_COLUMNS + ["all"])
def test_xx_is_a_real_value_not_an_error(week_copy, columns):
    lines = read_lines(week_copy)
    targets = spread(named_lines(lines))
    for i in targets:
        lines[i] = set_fields(lines[i], **{c: "XX" for c in columns})
    write_lines(week_copy, lines)

    accepted, quarantined = validate_transactions(week_copy)
    assert q_entries(quarantined) == []
    assert len(accepted) == len(lines) - 1
    for i in targets:
        row = accepted.row(i - 1, named=True)
        assert {c: row[c] for c in columns} == {c: "XX" for c in columns}
        assert row["PROD_CODE"] == field(lines[i], "PROD_CODE")
    for c in columns:
        assert accepted.schema[c] == TRANSACTION_SCHEMA[c]


def ingest_frames(path: Path, root: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    result = ingest_weekly_file(path, root / "out", root / "quarantine")
    return pl.read_parquet(result.output), pl.read_parquet(result.quarantine)


def test_seg_1_seg_2_header_gives_the_same_parquet(week_copy, real_week_file, tmp_path):
    lines = read_lines(week_copy)
    header = lines[0].split(",")
    header[COL["CUST_PRICE_SENSITIVITY"]] = "seg_1"
    header[COL["CUST_LIFESTAGE"]] = "seg_2"
    lines[0] = ",".join(header)
    write_lines(week_copy, lines)

    got, got_q = ingest_frames(week_copy, tmp_path / "variant")
    want, _ = ingest_frames(real_week_file, tmp_path / "original")
    assert got_q.is_empty()
    assert dict(got.schema) == TRANSACTION_SCHEMA
    assert got.equals(want)
    assert got.get_column("CUST_PRICE_SENSITIVITY").drop_nulls().len() > 0


def test_columns_in_another_order_give_the_same_rows(week_copy, real_week_file, tmp_path):
    order = list(range(N_COLS))
    random.Random(7).shuffle(order)
    assert order != list(range(N_COLS))
    lines = [",".join(line.split(",")[j] for j in order) for line in read_lines(week_copy)]
    write_lines(week_copy, lines)

    got, got_q = ingest_frames(week_copy, tmp_path / "variant")
    want, _ = ingest_frames(real_week_file, tmp_path / "original")
    assert got_q.is_empty()
    assert list(got.columns) == list(LGSR_COLUMNS)
    assert dict(got.schema) == TRANSACTION_SCHEMA
    assert got.equals(want)


def test_crlf_line_endings_give_the_same_rows(week_copy, real_week_file, tmp_path):
    write_lines(week_copy, read_lines(week_copy), newline="\r\n")
    assert b"\r\n" in week_copy.read_bytes()

    got, got_q = ingest_frames(week_copy, tmp_path / "variant")
    want, _ = ingest_frames(real_week_file, tmp_path / "original")
    assert got_q.is_empty()
    assert got.equals(want)
    assert not any(v.endswith("\r") for v in got.get_column("STORE_REGION").cast(pl.String).to_list())


@pytest.mark.parametrize("with_bad_number", [False, True], ids=["strict", "tolerant"])
def test_quoted_fields_are_accepted(week_copy, with_bad_number):
    lines = read_lines(week_copy)
    small = [i for i in range(1, len(lines)) if field(lines[i], "BASKET_TYPE") == "Small Shop"]
    others = [i for i in range(1, len(lines)) if field(lines[i], "BASKET_TYPE") != "Small Shop"]
    if len(small) < 3:  # make some: any basket type is a real value
        small = spread(others)
        for i in small:
            lines[i] = set_fields(lines[i], BASKET_TYPE="Small Shop")
    targets = spread(small)
    for i in targets:
        lines[i] = set_fields(lines[i], BASKET_TYPE='"Small Shop"', STORE_CODE=f'"{field(lines[i], "STORE_CODE")}"')
    bad = [i for i in range(2, len(lines)) if i not in targets][len(lines) // 3]
    if with_bad_number:
        lines[bad] = set_fields(lines[bad], QUANTITY="abc")
    write_lines(week_copy, lines)

    accepted, quarantined = validate_transactions(week_copy)
    expected_q = [(bad + 1, "QUANTITY", "unparsable number in QUANTITY", "abc")] if with_bad_number else []
    assert q_entries(quarantined) == expected_q
    assert len(accepted) == len(lines) - 1 - len(expected_q)
    for i in targets:
        position = i - 1 - (1 if with_bad_number and bad < i else 0)  # index among accepted rows
        row = accepted.row(position, named=True)
        assert row["PROD_CODE"] == field(lines[i], "PROD_CODE")
        assert row["BASKET_TYPE"] == "Small Shop"
        assert row["STORE_CODE"] == field(lines[i], "STORE_CODE").strip('"')


# ------------------------------------------------------------------------------------------------
# 3. Contract violations are quarantined with file, line, column, reason and value
# ------------------------------------------------------------------------------------------------


class Case:
    def __init__(self, edit: Callable[[str], str], column, reason, value, *, named=False, not_last=False):
        self.edit, self.column, self.reason, self.value = edit, column, reason, value
        self.named, self.not_last = named, not_last


def _fields(**values: str) -> Callable[[str], str]:
    return lambda line: set_fields(line, **values)


NEXT_MONDAY, PREV_SUNDAY = MONDAY + dt.timedelta(days=7), MONDAY - dt.timedelta(days=1)
TUESDAY, NEXT_TUESDAY = MONDAY + dt.timedelta(days=1), MONDAY + dt.timedelta(days=8)
assert lgsr_weekday(TUESDAY) == 3 and lgsr_weekday(NEXT_MONDAY) == 2 and lgsr_weekday(PREV_SUNDAY) == 1

CASES: dict[str, Case] = {
    "quantity_abc": Case(_fields(QUANTITY="abc"), "QUANTITY", "unparsable number in QUANTITY", "abc"),
    "spend_1.2x": Case(_fields(SPEND="1.2x"), "SPEND", "unparsable number in SPEND", "1.2x"),
    "truncated_line": Case(lambda l: ",".join(l.split(",")[:19]), None, f"missing fields (expected {N_COLS})", "19"),
    "too_many_fields": Case(lambda l: l + ",EXTRA", None, f"too many fields (expected {N_COLS})", "23"),
    "blank_line": Case(lambda l: "", None, "missing fields (blank line)", None, not_last=True),
    "empty_store_code": Case(_fields(STORE_CODE=""), "STORE_CODE", "missing field STORE_CODE", None),
    "empty_basket_id": Case(_fields(BASKET_ID=""), "BASKET_ID", "missing field BASKET_ID", None),
    "negative_quantity": Case(_fields(QUANTITY="-2"), "QUANTITY", "QUANTITY must be > 0", "-2"),
    "zero_quantity": Case(_fields(QUANTITY="0"), "QUANTITY", "QUANTITY must be > 0", "0"),
    "negative_spend": Case(_fields(SPEND="-1.25"), "SPEND", "SPEND must be >= 0", "-1.25"),
    "basket_size_XL": Case(_fields(BASKET_SIZE="XL"), "BASKET_SIZE", "unknown code in BASKET_SIZE", "XL"),
    "store_format_ZZ": Case(_fields(STORE_FORMAT="ZZ"), "STORE_FORMAT", "unknown code in STORE_FORMAT", "ZZ"),
    "malformed_prod_code": Case(_fields(PROD_CODE="PRD12"), "PROD_CODE", "malformed PROD_CODE", "PRD12"),
    "malformed_store_region": Case(_fields(STORE_REGION="X99"), "STORE_REGION", "malformed STORE_REGION", "X99"),
    "weekday_vs_date": Case(
        _fields(SHOP_DATE=date_int(TUESDAY), SHOP_WEEKDAY="5"),
        "SHOP_WEEKDAY", "SHOP_WEEKDAY disagrees with SHOP_DATE (1 = Sunday)", "5",
    ),
    "impossible_date": Case(_fields(SHOP_DATE="20060231"), "SHOP_DATE", "SHOP_DATE is not a YYYYMMDD date", "20060231"),
    "date_after_week": Case(
        _fields(SHOP_DATE=date_int(NEXT_MONDAY), SHOP_WEEKDAY="2"),
        "SHOP_DATE", "SHOP_DATE is not in SHOP_WEEK", date_int(NEXT_MONDAY),
    ),
    "date_before_week": Case(
        _fields(SHOP_DATE=date_int(PREV_SUNDAY), SHOP_WEEKDAY="1"),
        "SHOP_DATE", "SHOP_DATE is not in SHOP_WEEK", date_int(PREV_SUNDAY),
    ),
    # a row that is consistent in itself but belongs to another week than its file
    "week_not_files_week": Case(
        _fields(SHOP_WEEK="200608", SHOP_DATE=date_int(NEXT_TUESDAY), SHOP_WEEKDAY="3"),
        "SHOP_WEEK", f"SHOP_WEEK differs from the file's week {WEEK}", "200608",
    ),
    "hour_24": Case(_fields(SHOP_HOUR="24"), "SHOP_HOUR", "SHOP_HOUR must be 0..23", "24"),
    "segment_without_card": Case(
        _fields(CUST_CODE=""), "CUST_CODE", "customer segment without CUST_CODE", None, named=True
    ),
}

#: Cases whose corrupted lines still parse with the strict typed read (the fast path).
STRICT_PARSABLE = {
    "negative_quantity", "zero_quantity", "negative_spend", "malformed_prod_code", "malformed_store_region",
    "weekday_vs_date", "impossible_date", "date_after_week", "date_before_week", "week_not_files_week",
    "hour_24", "segment_without_card", "empty_store_code", "empty_basket_id",
}


def corrupt(path: Path, case: Case, *, trigger_slow_path: bool, newline: str = "\n") -> tuple[list[tuple], int]:
    """Apply ``case`` to three real lines (first, middle, last eligible) of ``path``.

    With ``trigger_slow_path`` another line also gets an unparsable QUANTITY. Returns the expected
    quarantine entries (line, column, reason, value), sorted by line, and the number of data lines.
    """
    lines = read_lines(path)
    eligible = named_lines(lines) if case.named else list(range(1, len(lines)))
    if case.not_last:
        eligible = [i for i in eligible if i != len(lines) - 1]
    targets = spread(eligible)
    expected = []
    for i in targets:
        lines[i] = case.edit(lines[i])
        expected.append((i + 1, case.column, case.reason, case.value))
    if trigger_slow_path:
        j = next(i for i in range(len(lines) // 3, len(lines)) if i not in targets)
        lines[j] = set_fields(lines[j], QUANTITY="abc")
        expected.append((j + 1, "QUANTITY", "unparsable number in QUANTITY", "abc"))
    write_lines(path, lines, newline)
    return sorted(expected), len(lines) - 1


#: Cases whose corrupted lines alone already force the tolerant read (no need to add another bad line).
UNPARSABLE = {"quantity_abc", "spend_1.2x", "too_many_fields", "basket_size_XL", "store_format_ZZ"}


@pytest.mark.parametrize(
    ("name", "trigger_slow_path"),
    [(name, False) for name in CASES] + [(name, True) for name in CASES if name not in UNPARSABLE],
    ids=[f"{name}-alone" for name in CASES]
    + [f"{name}-with_unparsable_elsewhere" for name in CASES if name not in UNPARSABLE],
)
def test_violation_is_quarantined_with_its_line(week_copy, real_week_file, name, trigger_slow_path):
    """Same entry for the corrupted lines whether the file takes the strict or the tolerant read."""
    expected, n_data = corrupt(week_copy, CASES[name], trigger_slow_path=trigger_slow_path)

    accepted, quarantined = validate_transactions(week_copy)

    assert dict(quarantined.schema) == QUARANTINE_SCHEMA
    assert quarantined.get_column("source_file").to_list() == [FILE_NAME] * len(quarantined)
    assert sorted(q_entries(quarantined)) == expected
    assert len(accepted) + len(quarantined) == n_data
    # the other rows are kept, typed, in file order
    assert dict(accepted.schema) == TRANSACTION_SCHEMA
    assert key_sequence(accepted) == expected_kept(real_week_file, {line for line, *_ in expected})
    # the raw line is there for a human to look at, and it shows the offending value
    for raw, column, value in quarantined.select("raw_line", "column", "value").iter_rows():
        if column is not None and value is not None:
            assert value in raw


@pytest.mark.parametrize("name", sorted(STRICT_PARSABLE))
def test_parsable_violations_really_take_the_strict_path(week_copy, name):
    """Sanity check of the test matrix: the 'alone' variants of these cases parse strictly."""
    corrupt(week_copy, CASES[name], trigger_slow_path=False)
    pl.read_csv(week_copy, schema=TRANSACTION_SCHEMA)  # raises if the strict typed read would fail


def test_short_row_missing_only_nullable_fields_is_not_accepted(week_copy):
    """Columns reordered so the three loyalty-card fields come last: a line cut before them is a
    short row (19 of 22 fields), not an anonymous shopper, and must be quarantined, not accepted."""
    card = ["CUST_CODE", "CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE"]
    order = [COL[c] for c in LGSR_COLUMNS if c not in card] + [COL[c] for c in card]
    lines = read_lines(week_copy)
    targets = spread(named_lines(lines))
    reordered = [",".join(line.split(",")[j] for j in order) for line in lines]
    for i in targets:
        reordered[i] = ",".join(reordered[i].split(",")[:N_COLS - 3])
    write_lines(week_copy, reordered)

    accepted, quarantined = validate_transactions(week_copy)

    assert quarantined.get_column("line_number").to_list() == [i + 1 for i in targets]
    assert quarantined.get_column("reason").to_list() == [f"missing fields (expected {N_COLS})"] * 3
    assert len(accepted) == len(lines) - 1 - 3


def mixed_file(path: Path, *, unparsable: bool, newline: str = "\n") -> tuple[list[tuple], int]:
    """Many different violations in one real file; with ``unparsable`` some cannot be parsed strictly."""
    names = sorted(STRICT_PARSABLE - {"segment_without_card"})
    if unparsable:
        names += ["quantity_abc", "spend_1.2x", "truncated_line", "too_many_fields", "blank_line",
                  "basket_size_XL", "store_format_ZZ"]
    lines = read_lines(path)
    named = named_lines(lines)
    step = (len(lines) - 2) // (len(names) + 2)
    expected = []
    for k, name in enumerate(names):
        i = 1 + step * (k + 1)
        case = CASES[name]
        lines[i] = case.edit(lines[i])
        expected.append((i + 1, case.column, case.reason, case.value))
    i = next(i for i in named if i > 1 + step * (len(names) + 1))
    lines[i] = CASES["segment_without_card"].edit(lines[i])
    c = CASES["segment_without_card"]
    expected.append((i + 1, c.column, c.reason, c.value))
    write_lines(path, lines, newline)
    return sorted(expected), len(lines) - 1


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("unparsable", [False, True], ids=["strict", "tolerant"])
def test_many_violations_in_one_file(week_copy, real_week_file, unparsable, newline):
    expected, n_data = mixed_file(week_copy, unparsable=unparsable, newline=newline)

    accepted, quarantined = validate_transactions(week_copy)

    assert q_entries(quarantined) == expected  # in file order
    assert len(accepted) + len(quarantined) == n_data
    assert key_sequence(accepted) == expected_kept(real_week_file, {line for line, *_ in expected})
    assert not any((r or "").endswith("\r") for r in quarantined.get_column("raw_line").to_list())


# ------------------------------------------------------------------------------------------------
# 4. Not this format at all: a clear error, and nothing written
# ------------------------------------------------------------------------------------------------


def _other_csv(path: Path, real: Path) -> None:
    path.write_text("date,store,sku,units,price\n2006-04-10,S1,A,1,2.5\n2006-04-10,S1,B,2,1.0\n")


def _empty(path: Path, real: Path) -> None:
    path.write_bytes(b"")


def _random_bytes(path: Path, real: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(8192))


def _utf16(path: Path, real: Path) -> None:
    path.write_bytes(real.read_text().encode("utf-16"))


def _missing_column(column: str):
    def make(path: Path, real: Path) -> None:
        j = COL[column]
        lines = [line.split(",") for line in read_lines(real)]
        write_lines(path, [",".join(f[:j] + f[j + 1:]) for f in lines])

    make.column = column
    return make


NOT_LGSR = {
    "other_columns": _other_csv,
    "empty": _empty,
    "random_bytes": _random_bytes,
    "utf16": _utf16,
    "no_STORE_REGION": _missing_column("STORE_REGION"),
    "no_CUST_CODE": _missing_column("CUST_CODE"),
    "no_SHOP_WEEK": _missing_column("SHOP_WEEK"),
    "no_BASKET_DOMINANT_MISSION": _missing_column("BASKET_DOMINANT_MISSION"),
}


@pytest.mark.parametrize("kind", list(NOT_LGSR))
def test_not_lgsr_raises_and_writes_nothing(week_copy, real_week_file, tmp_path, kind):
    make = NOT_LGSR[kind]
    make(week_copy, real_week_file)
    out, qdir = tmp_path / "out", tmp_path / "quarantine"

    with pytest.raises(LgsrFormatError) as info:
        validate_transactions(week_copy)
    message = str(info.value)
    assert FILE_NAME in message
    if kind == "other_columns":
        for c in LGSR_COLUMNS:
            assert c in message, f"{c} not listed in {message!r}"
    if hasattr(make, "column"):
        assert make.column in message

    with pytest.raises(LgsrFormatError):
        ingest_weekly_file(week_copy, out, qdir)
    assert not (out / "transactions_200607.parquet").exists()
    assert not (qdir / "transactions_200607.parquet").exists()
    assert no_tmp_files(out, qdir) == []
    assert not out.exists() or list(out.iterdir()) == []
    assert not qdir.exists() or list(qdir.iterdir()) == []


@pytest.mark.parametrize("kind", ["other_columns", "empty", "random_bytes", "no_STORE_REGION"])
def test_failed_reingest_leaves_earlier_outputs_byte_identical(week_copy, real_week_file, tmp_path, kind):
    out, qdir = tmp_path / "out", tmp_path / "quarantine"
    expected, _ = corrupt(week_copy, CASES["negative_quantity"], trigger_slow_path=False)
    first = ingest_weekly_file(week_copy, out, qdir)
    assert first.quarantined == len(expected)
    before = {p: p.read_bytes() for p in (first.output, first.quarantine)}
    listing = sorted(p.name for p in [*out.iterdir(), *qdir.iterdir()])

    NOT_LGSR[kind](week_copy, real_week_file)
    with pytest.raises(LgsrFormatError):
        ingest_weekly_file(week_copy, out, qdir)

    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in [*out.iterdir(), *qdir.iterdir()]) == listing
    assert no_tmp_files(out, qdir) == []


# ------------------------------------------------------------------------------------------------
# 5. Atomic writes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unparsable", [False, True], ids=["strict", "tolerant"])
def test_no_temporary_files_after_success(week_copy, tmp_path, unparsable):
    out, qdir = tmp_path / "out", tmp_path / "quarantine"
    mixed_file(week_copy, unparsable=unparsable)
    ingest_weekly_file(week_copy, out, qdir)
    ingest_weekly_file(week_copy, out, qdir)  # overwrite in place
    assert no_tmp_files(out, qdir) == []
    assert sorted(p.name for p in out.iterdir()) == ["transactions_200607.parquet"]
    assert sorted(p.name for p in qdir.iterdir()) == ["transactions_200607.parquet"]


def test_no_temporary_files_when_the_write_itself_fails(week_copy, tmp_path):
    out, qdir = tmp_path / "out", tmp_path / "quarantine"
    (out / "transactions_200607.parquet").mkdir(parents=True)  # the final rename cannot succeed
    (out / "transactions_200607.parquet" / "keep").write_text("x")
    with pytest.raises(OSError):
        ingest_weekly_file(week_copy, out, qdir)
    assert no_tmp_files(out, qdir) == []
    assert (out / "transactions_200607.parquet" / "keep").read_text() == "x"


# ------------------------------------------------------------------------------------------------
# 6. IngestResult counts agree with the outputs
# ------------------------------------------------------------------------------------------------


def check_result(result: IngestResult, source: Path, out: Path, qdir: Path, n_data: int) -> None:
    written = pl.read_parquet(result.output)
    q = pl.read_parquet(result.quarantine)
    assert result.source == source
    assert result.week == WEEK
    assert result.output == out / "transactions_200607.parquet"
    assert result.quarantine == qdir / "transactions_200607.parquet"
    assert dict(q.schema) == QUARANTINE_SCHEMA
    assert result.rows == len(written)
    assert result.quarantined == len(q)
    assert result.rows + result.quarantined == n_data
    assert result.baskets == written.get_column("BASKET_ID").n_unique()
    assert result.customers == written.get_column("CUST_CODE").drop_nulls().n_unique()
    assert result.reasons == dict(q.group_by("reason").len().iter_rows())
    assert sum(result.reasons.values()) == result.quarantined
    assert result.quarantine_rate == pytest.approx(len(q) / n_data)

    # and independently of the parquet, from the CSV text itself
    bad_lines = set(q.get_column("line_number").to_list())
    lines = read_lines(source)
    kept = [lines[i].split(",") for i in range(1, len(lines)) if i + 1 not in bad_lines]
    assert result.baskets == len({f[COL["BASKET_ID"]] for f in kept})
    assert result.customers == len({f[COL["CUST_CODE"]] for f in kept} - {""})


@pytest.mark.parametrize("variant", ["clean", "strict", "tolerant"])
def test_ingest_result_counts_match_outputs(week_copy, tmp_path, variant):
    out, qdir = tmp_path / "out", tmp_path / "quarantine"
    if variant == "clean":
        expected, n_data = [], len(read_lines(week_copy)) - 1
    else:
        expected, n_data = mixed_file(week_copy, unparsable=variant == "tolerant")
    result = ingest_weekly_file(week_copy, out, qdir)
    check_result(result, week_copy, out, qdir, n_data)
    assert result.quarantined == len(expected)
    want_reasons: dict[str, int] = {}
    for _, _, reason, _ in expected:
        want_reasons[reason] = want_reasons.get(reason, 0) + 1
    assert result.reasons == want_reasons
    if variant == "clean":
        assert result.quarantine_rate == 0.0 and result.reasons == {}
    else:
        assert 0.0 < result.quarantine_rate < 0.1
