"""Ingest of the published LGSR variants: coded segments, any-case headers, quoted empties, gzip,
lossy spreadsheet copies, inconsistent BASKET_IDs, and row accounting (nothing may vanish).

Every case starts from a real weekly file written by the generator (tiny preset, generated once per
module) and turns it into the variant with plain text edits; the parquet written for the variant is
compared with the parquet written for the untouched file.
"""

import datetime as dt
import gzip
import random
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from retailsim_pipeline.config import generator_preset
from retailsim_pipeline.prep.generator import generate
from retailsim_pipeline.prep.ingest import (
    IngestResult,
    LgsrFormatError,
    LossyCopyError,
    ingest_weekly_file,
    validate_transactions,
)
from retailsim_pipeline.prep.schema import (
    CODE_SETS,
    HEADER_ALIASES,
    LGSR_COLUMNS,
    SEGMENT_CODE_ALIASES,
    TRANSACTION_SCHEMA,
    DuplicateWeekError,
    file_stem,
    lgsr_weekday,
    raw_file_of_week,
    raw_weekly_files,
    scan_raw_files,
    week_monday,
    weekly_file_name,
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
    without_lines,
    write_lines,
)

NEXT_WEEK = 200608
OUTPUT_NAME = "transactions_200607.parquet"
ADVICE = "re-export the file from the source without a spreadsheet: basket ids were rounded"

CARD = ("CUST_CODE", "CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE")
SEGMENTS = ("CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE")
#: documented code -> coded value of the published seg_1/seg_2 copy (XX of seg_2 has no coded value)
TO_CODED = {c: {doc: coded for coded, doc in m.items()} for c, m in SEGMENT_CODE_ALIASES.items()}
#: canonical column name -> the alias the published copy uses (seg_1 / seg_2)
ALIAS_OF = {canonical: alias for alias, canonical in HEADER_ALIASES.items()}
MONDAY = week_monday(WEEK)


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_raw_dir(tmp_path_factory) -> Path:
    """The raw folder of a freshly generated tiny dataset (never modified by the tests)."""
    root = tmp_path_factory.mktemp("tiny_variants")
    summary = generate(generator_preset("tiny"), root)
    assert root / "raw" / FILE_NAME in [Path(f) for f in summary.files]
    return root / "raw"


@pytest.fixture(scope="module")
def real_week_file(tiny_raw_dir) -> Path:
    src = tiny_raw_dir / FILE_NAME
    lines = read_lines(src)
    assert lines[0].split(",") == list(LGSR_COLUMNS)
    assert len(lines) > 600, "the collapsed-id rule needs a file of 500+ rows"
    assert '"' not in src.read_text(), "generated files are expected to be unquoted"
    # the variants below need both kinds of shopper in the real file
    assert anonymous_lines(lines), "the generated week holds no anonymous shopper"
    assert carded_lines(lines), "the generated week holds no loyalty-card shopper"
    return src


@pytest.fixture(scope="module")
def original(real_week_file, tmp_path_factory) -> tuple[IngestResult, pl.DataFrame]:
    """What the untouched generated file ingests to (result, accepted parquet)."""
    root = tmp_path_factory.mktemp("original_out")
    result = ingest_weekly_file(real_week_file, root / "out", root / "quarantine")
    assert result.quarantined == 0
    written = pl.read_parquet(result.output)
    assert len(written) == len(read_lines(real_week_file)) - 1
    return result, written


@pytest.fixture
def want(original) -> pl.DataFrame:
    return original[1]


def anonymous_lines(lines: list[str]) -> list[int]:
    """0-based indexes (in ``lines``, header = 0) of data lines without a loyalty card."""
    return [i for i in range(1, len(lines)) if field(lines[i], "CUST_CODE") in ("", '""')]


def carded_lines(lines: list[str]) -> list[int]:
    return [i for i in range(1, len(lines)) if field(lines[i], "CUST_CODE") not in ("", '""')]


def basket_lines(lines: list[str], basket_id: str) -> list[int]:
    return [i for i in range(1, len(lines)) if field(lines[i], "BASKET_ID") == basket_id]


def ingest(path: Path, root: Path) -> tuple[IngestResult, pl.DataFrame, pl.DataFrame]:
    result = ingest_weekly_file(path, root / "out", root / "quarantine")
    return result, pl.read_parquet(result.output), pl.read_parquet(result.quarantine)


def make_tolerant(lines: list[str], avoid) -> tuple[int, tuple]:
    """Give one line (not in ``avoid``) an unparsable QUANTITY so the file takes the tolerant read.
    Returns its index and its expected quarantine entry."""
    i = next(i for i in range(len(lines) // 3, len(lines)) if i not in set(avoid))
    lines[i] = set_fields(lines[i], QUANTITY="abc")
    return i, (i + 1, "QUANTITY", "unparsable number in QUANTITY", "abc")


def coded_lines(lines: list[str], header_case=str.lower) -> list[str]:
    """The published variant of a generated week: seg_1/seg_2 header in another case, coded
    segment values, and ``""`` for the card fields of anonymous shoppers."""
    names = [ALIAS_OF.get(c, c) for c in lines[0].split(",")]
    out = [",".join(header_case(n) for n in names)]
    for line in lines[1:]:
        fields = line.split(",")
        if fields[COL["CUST_CODE"]] == "":
            for c in CARD:
                fields[COL[c]] = '""'
        else:
            for c in SEGMENTS:
                v = fields[COL[c]]
                fields[COL[c]] = TO_CODED[c].get(v, v) if v else '""'
        out.append(",".join(fields))
    return out


def segment_values(lines: list[str], column: str) -> set[str]:
    return {field(line, column) for line in lines[1:]}


# ------------------------------------------------------------------------------------------------
# 1. The published format (coded, any-case header, quoted empties) gives the same parquet
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["lower", "title_case", "lower_shuffled"])
def test_coded_lowercase_quoted_empty_week_gives_the_same_parquet(week_copy, original, tmp_path, style):
    want_result, want = original
    lines = read_lines(week_copy)
    coded = coded_lines(lines, str.title if style == "title_case" else str.lower)
    # the variant really is the published format: no documented code left but the neutral XX,
    # anonymous card fields written "", and both kinds of XX (seg_1 coded DY, seg_2 literal XX)
    for c in SEGMENTS:
        assert segment_values(coded, c) & (set(CODE_SETS[c]) - {"XX"}) == set(), c
        assert segment_values(coded, c) & set(SEGMENT_CODE_ALIASES[c]), c
    assert all(field(coded[i], "CUST_CODE") == '""' for i in anonymous_lines(lines))
    assert "DY" in segment_values(coded, "CUST_PRICE_SENSITIVITY"), "no XX price sensitivity generated"
    assert "XX" in segment_values(coded, "CUST_LIFESTAGE"), "no XX lifestage generated"
    assert coded[0].split(",")[COL["CUST_PRICE_SENSITIVITY"]] in ("seg_1", "Seg_1")
    if style == "lower_shuffled":
        order = list(range(N_COLS))
        random.Random(3).shuffle(order)
        coded = [",".join(line.split(",")[j] for j in order) for line in coded]
    write_lines(week_copy, coded)

    result, got, got_q = ingest(week_copy, tmp_path)

    assert want_result.segment_codes == "documented"
    assert result.segment_codes == "coded"
    assert got_q.is_empty() and result.quarantined == 0
    assert dict(got.schema) == TRANSACTION_SCHEMA
    assert got.equals(want)
    assert got.get_column("CUST_CODE").null_count() == len(anonymous_lines(lines))
    assert result.output == tmp_path / "out" / OUTPUT_NAME


def test_xx_is_neutral_in_a_coded_file(week_copy, want, tmp_path):
    """seg_1 "unknown" may be written XX (documented spelling) inside a coded file."""
    coded = coded_lines(read_lines(week_copy))
    dy = [i for i in range(1, len(coded)) if field(coded[i], "CUST_PRICE_SENSITIVITY") == "DY"]
    assert len(dy) >= 2
    for i in dy[::2]:
        coded[i] = set_fields(coded[i], CUST_PRICE_SENSITIVITY="XX")
    write_lines(week_copy, coded)

    result, got, got_q = ingest(week_copy, tmp_path)
    assert result.segment_codes == "coded"
    assert got_q.is_empty()
    assert got.equals(want)


def test_all_anonymous_week_has_no_segment_family(week_copy, tmp_path):
    lines = read_lines(week_copy)
    lines = [lines[0]] + [set_fields(line, **{c: '""' for c in CARD}) for line in lines[1:]]
    write_lines(week_copy, lines)

    result, got, got_q = ingest(week_copy, tmp_path)
    assert result.segment_codes is None
    assert got_q.is_empty() and len(got) == len(lines) - 1
    assert result.customers == 0
    assert got.select(pl.col(c).null_count() for c in CARD).row(0) == (len(got),) * 3


# ------------------------------------------------------------------------------------------------
# 2. A carded customer without a segment is accepted with a null segment
# ------------------------------------------------------------------------------------------------


SEGMENT_GAPS = (
    [(fam, ("CUST_LIFESTAGE",), empty, path)
     for fam in ("documented", "coded") for empty in ('""', "") for path in ("strict", "tolerant")]
    + [("coded", ("CUST_PRICE_SENSITIVITY",), '""', "strict"), ("documented", SEGMENTS, '""', "strict")]
)


@pytest.mark.parametrize(
    ("family", "blank", "empty", "path"), SEGMENT_GAPS,
    ids=[f"{f}-{'+'.join(b)}-{'quoted' if e else 'unquoted'}-{p}" for f, b, e, p in SEGMENT_GAPS],
)
def test_carded_customer_with_empty_segment_is_accepted_with_null(week_copy, want, family, blank, empty, path):
    lines = read_lines(week_copy)
    if family == "coded":
        lines = coded_lines(lines)
    carded = carded_lines(lines)
    # three customers (first, middle, last carded line) lack the segment on all their lines
    customers = {field(lines[i], "CUST_CODE") for i in (carded[0], carded[len(carded) // 2], carded[-1])}
    targets = [i for i in carded if field(lines[i], "CUST_CODE") in customers]
    for i in targets:
        lines[i] = set_fields(lines[i], **{c: empty for c in blank})
    expected_q, dropped = [], []
    if path == "tolerant":
        j, entry = make_tolerant(lines, targets)
        expected_q, dropped = [entry], [j]
    write_lines(week_copy, lines)

    accepted, quarantined = validate_transactions(week_copy)

    assert q_entries(quarantined) == expected_q
    nulled = set(i - 1 for i in targets)
    expected = want.with_row_index("__i").with_columns(
        pl.when(~pl.col("__i").is_in(sorted(nulled))).then(pl.col(c)).alias(c) for c in blank
    ).drop("__i")
    expected = without_lines(expected, dropped)
    assert dict(accepted.schema) == TRANSACTION_SCHEMA
    assert accepted.equals(expected)
    # the customers are still there, with their card and the other segment
    assert accepted.filter(pl.col("CUST_CODE").cast(pl.String).is_in(sorted(customers))).height == len(targets)
    for c in blank:
        assert accepted.get_column(c).null_count() == len(anonymous_lines(lines)) + len(targets)


# ------------------------------------------------------------------------------------------------
# 3. A file that mixes the two code families is refused as a whole
# ------------------------------------------------------------------------------------------------

MIXES = {
    "documented_seg_1_in_coded_file": ("coded", "CUST_PRICE_SENSITIVITY", "LA"),
    "documented_seg_2_in_coded_file": ("coded", "CUST_LIFESTAGE", "YA"),
    "coded_seg_1_in_documented_file": ("documented", "CUST_PRICE_SENSITIVITY", "AZ"),
    "coded_seg_2_in_documented_file": ("documented", "CUST_LIFESTAGE", "FN"),
}


def _lines_named(message: str, family: str) -> list[int]:
    m = re.search(rf"{family} \((?P<codes>[^)]*?) on line\(s\) (?P<lines>[\d, ]+)\)", message)
    assert m, f"no '{family} (... on line(s) ...)' in {message!r}"
    return [int(x) for x in m.group("lines").split(",")]


@pytest.mark.parametrize("name", list(MIXES))
def test_mixed_code_families_raise_naming_lines_of_each(week_copy, tmp_path, name):
    family, column, odd = MIXES[name]
    lines = read_lines(week_copy)
    if family == "coded":
        lines = coded_lines(lines)
    carded = carded_lines(lines)
    i = carded[len(carded) // 2]
    lines[i] = set_fields(lines[i], **{column: odd})
    write_lines(week_copy, lines)
    # lines carrying a (non-XX) code of the file's own family
    own = set(SEGMENT_CODE_ALIASES[column]) if family == "coded" else set(CODE_SETS[column]) - {"XX"}
    own_lines = {
        k + 1 for k in range(1, len(lines)) if k != i
        and any(field(lines[k], c) in (set(SEGMENT_CODE_ALIASES[c]) if family == "coded"
                                       else set(CODE_SETS[c]) - {"XX"}) for c in SEGMENTS)
    }
    assert own_lines and odd not in own

    with pytest.raises(LgsrFormatError) as info:
        validate_transactions(week_copy)
    message = str(info.value)
    assert not isinstance(info.value, LossyCopyError)
    assert FILE_NAME in message
    odd_family, own_family = ("documented codes", "coded values") if family == "coded" else ("coded values",
                                                                                                "documented codes")
    assert _lines_named(message, odd_family) == [i + 1]
    named = _lines_named(message, own_family)
    assert named and set(named) <= own_lines
    assert odd in message

    out, qdir = tmp_path / "out", tmp_path / "quarantine"
    with pytest.raises(LgsrFormatError):
        ingest_weekly_file(week_copy, out, qdir)
    assert not out.exists() or list(out.iterdir()) == []
    assert not qdir.exists() or list(qdir.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# 4. gzip: recognised by its magic bytes, output named without .csv
# ------------------------------------------------------------------------------------------------

GZ_KINDS = {
    "csv_gz": (FILE_NAME + ".gz", True),
    "gzip_named_csv": (FILE_NAME, True),
    "plain_named_csv_gz": (FILE_NAME + ".gz", False),
}


@pytest.mark.parametrize("path", ["strict", "tolerant"])
@pytest.mark.parametrize("kind", list(GZ_KINDS))
def test_gzip_file_gives_the_same_parquet_as_the_plain_file(real_week_file, tmp_path, kind, path):
    name, compress = GZ_KINDS[kind]
    lines = read_lines(real_week_file)
    if path == "tolerant":
        make_tolerant(lines, ())
    plain = tmp_path / "plain" / FILE_NAME
    plain.parent.mkdir()
    write_lines(plain, lines)
    variant = tmp_path / "variant" / name
    variant.parent.mkdir()
    variant.write_bytes(gzip.compress(plain.read_bytes()) if compress else plain.read_bytes())
    assert (variant.read_bytes()[:2] == b"\x1f\x8b") == compress

    want_result, want, want_q = ingest(plain, tmp_path / "plain_out")
    result, got, got_q = ingest(variant, tmp_path / "variant_out")

    assert result.output == tmp_path / "variant_out" / "out" / OUTPUT_NAME
    assert result.quarantine == tmp_path / "variant_out" / "quarantine" / OUTPUT_NAME
    assert [p.name for p in (tmp_path / "variant_out" / "out").iterdir()] == [OUTPUT_NAME]
    assert result.week == WEEK
    assert got.equals(want)
    assert len(got) == len(lines) - 1 - (path == "tolerant")
    assert got_q.drop("source_file").equals(want_q.drop("source_file"))
    assert len(got_q) == (path == "tolerant")
    assert got_q.get_column("source_file").to_list() == [name] * len(got_q)
    assert (result.rows, result.quarantined, result.baskets, result.customers, result.segment_codes) == (
        want_result.rows, want_result.quarantined, want_result.baskets, want_result.customers, "documented")


# ------------------------------------------------------------------------------------------------
# 5. One week, two files (.csv and .csv.gz): refused
# ------------------------------------------------------------------------------------------------


def test_week_present_as_csv_and_csv_gz_is_a_duplicate(tiny_raw_dir, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    csv, gz = raw / FILE_NAME, raw / (FILE_NAME + ".gz")
    other = raw / weekly_file_name(NEXT_WEEK)
    shutil.copyfile(tiny_raw_dir / FILE_NAME, csv)
    gz.write_bytes(gzip.compress(csv.read_bytes()))
    shutil.copyfile(tiny_raw_dir / other.name, other)

    files, duplicates = scan_raw_files(raw)
    assert files == {NEXT_WEEK: other}
    assert duplicates == {WEEK: [csv, gz]}

    with pytest.raises(DuplicateWeekError) as info:
        raw_weekly_files(raw)
    assert str(WEEK) in str(info.value)
    assert csv.name in str(info.value) and gz.name in str(info.value)
    assert other.name not in str(info.value)

    with pytest.raises(DuplicateWeekError) as info:
        raw_file_of_week(raw, WEEK)
    assert csv.name in str(info.value) and gz.name in str(info.value)
    assert raw_file_of_week(raw, NEXT_WEEK) == other

    # keep one of them: the week is that file, whichever it is
    csv.unlink()
    assert raw_weekly_files(raw) == {WEEK: gz, NEXT_WEEK: other}
    assert scan_raw_files(raw) == ({WEEK: gz, NEXT_WEEK: other}, {})
    assert raw_file_of_week(raw, WEEK) == gz
    assert file_stem(gz) == file_stem(csv) == "transactions_200607"


# ------------------------------------------------------------------------------------------------
# 6. Lossy copies are refused whole; lossless variants are not
# ------------------------------------------------------------------------------------------------


def _map_basket_ids(lines: list[str], fn) -> list[str]:
    return [lines[0]] + [set_fields(line, BASKET_ID=fn(field(line, "BASKET_ID"))) for line in lines[1:]]


def _scientific(lines):
    """A spreadsheet round trip: every BASKET_ID written in scientific notation (9.94E+14)."""
    out = _map_basket_ids(lines, lambda v: f"{int(v):.2E}")
    return out, repr(field(out[1], "BASKET_ID")), "hold numbers in scientific notation"


def _rounded(lines):
    """Every BASKET_ID rounded to 4 significant digits (994100000000000), as a spreadsheet shows them."""
    out = _map_basket_ids(lines, lambda v: str(int(float(f"{int(v):.3E}"))))
    distinct = {field(line, "BASKET_ID") for line in out[1:]}
    n_round = sum(int(v) % 1_000_000 == 0 for v in distinct)
    return (out, field(out[1], "BASKET_ID"),
            f"hold ids ending in six or more zeros ({n_round:,} of {len(distinct):,} distinct ids: rounded)")


def _collapsed(lines):
    """BASKET_IDs rounded together to a handful of values that do not end in zeros."""
    out = _map_basket_ids(lines, lambda v: str(int(v) // 100 * 100 + 1))
    distinct = len({field(line, "BASKET_ID") for line in out[1:]})
    return out, field(out[1], "BASKET_ID"), f"share only {distinct:,} distinct value(s)"


LOSSY = {"scientific": _scientific, "rounded": _rounded, "collapsed": _collapsed}


@pytest.mark.parametrize("kind", list(LOSSY))
def test_lossy_copy_raises_and_writes_nothing(week_copy, tmp_path, kind):
    lines, example, what = LOSSY[kind](read_lines(week_copy))
    total = len(lines) - 1
    if kind == "collapsed":
        distinct = len({field(line, "BASKET_ID") for line in lines[1:]})
        assert total >= 500 and total / distinct > 50 and not any(
            int(field(line, "BASKET_ID")) % 1_000_000 == 0 for line in lines[1:])
    write_lines(week_copy, lines)

    with pytest.raises(LossyCopyError) as info:
        validate_transactions(week_copy)
    message = str(info.value)
    assert isinstance(info.value, LgsrFormatError)
    assert str(week_copy) in message
    assert "column BASKET_ID" in message
    assert what in message
    assert f"e.g. {example} on line 2" in message
    assert f"{total:,} of {total:,} rows (100.0%)" in message
    assert ADVICE in message

    out, qdir = tmp_path / "out", tmp_path / "quarantine"
    with pytest.raises(LossyCopyError):
        ingest_weekly_file(week_copy, out, qdir)
    assert not (out / OUTPUT_NAME).exists() and not (qdir / OUTPUT_NAME).exists()
    assert no_tmp_files(out, qdir, week_copy.parent) == []
    assert not out.exists() or list(out.iterdir()) == []
    assert not qdir.exists() or list(qdir.iterdir()) == []


def test_lossy_copy_leaves_earlier_outputs_byte_identical(week_copy, tmp_path):
    out, qdir = tmp_path / "out", tmp_path / "quarantine"
    first = ingest_weekly_file(week_copy, out, qdir)
    before = {p: p.read_bytes() for p in (first.output, first.quarantine)}
    write_lines(week_copy, _scientific(read_lines(week_copy))[0])

    with pytest.raises(LossyCopyError):
        ingest_weekly_file(week_copy, out, qdir)
    assert {p: p.read_bytes() for p in before} == before
    assert no_tmp_files(out, qdir) == []


@pytest.mark.parametrize(("rows", "lossy"), [(499, False), (500, True)])
@pytest.mark.parametrize("kind", ["rounded", "collapsed"])
def test_rounding_rules_judge_files_of_500_rows_or_more(week_copy, kind, rows, lossy):
    lines, _, what = LOSSY[kind](read_lines(week_copy)[: rows + 1])
    assert len({field(line, "BASKET_ID") for line in lines[1:]}) * 50 < rows
    write_lines(week_copy, lines)
    if lossy:
        with pytest.raises(LossyCopyError, match=re.escape(what)):
            validate_transactions(week_copy)
    else:  # small file: judged line by line (the merged baskets conflict), nothing vanishes
        accepted, quarantined = validate_transactions(week_copy)
        assert len(accepted) + len(quarantined) == rows
        assert len(quarantined) > 0
        assert set(quarantined.get_column("reason")) <= {
            f"BASKET_ID appears with different {c} values" for c in ("STORE_CODE", "SHOP_DATE", "CUST_CODE")}


def _trim_spend(v: str) -> str:
    return v.rstrip("0").rstrip(".") if "." in v else v


@pytest.mark.parametrize("variant", ["crlf", "spend_without_trailing_zeros", "crlf_and_spend"])
def test_lossless_variants_give_the_same_parquet(week_copy, want, tmp_path, variant):
    lines = read_lines(week_copy)
    if "spend" in variant:
        assert any(field(line, "SPEND").endswith(".00") for line in lines[1:]), "no whole SPEND generated"
        lines = [lines[0]] + [set_fields(line, SPEND=_trim_spend(field(line, "SPEND"))) for line in lines[1:]]
        assert any(re.fullmatch(r"\d+", field(line, "SPEND")) for line in lines[1:])  # "1" instead of "1.00"
    newline = "\r\n" if "crlf" in variant else "\n"
    write_lines(week_copy, lines, newline)
    assert (b"\r\n" in week_copy.read_bytes()) == ("crlf" in variant)

    result, got, got_q = ingest(week_copy, tmp_path)
    assert got_q.is_empty()
    assert got.equals(want)


# ------------------------------------------------------------------------------------------------
# 7. A BASKET_ID with different stores, dates or customers: the whole basket is quarantined
# ------------------------------------------------------------------------------------------------


def _other_store(lines, line):
    stores = sorted({field(x, "STORE_CODE") for x in lines[1:]} - {field(line, "STORE_CODE")})
    return set_fields(line, STORE_CODE=stores[0])


def _other_date(lines, line):
    day = next(MONDAY + dt.timedelta(days=k) for k in range(7)
               if (MONDAY + dt.timedelta(days=k)).strftime("%Y%m%d") != field(line, "SHOP_DATE"))
    return set_fields(line, SHOP_DATE=day.strftime("%Y%m%d"), SHOP_WEEKDAY=str(lgsr_weekday(day)))


def _other_customer(lines, line):
    customers = sorted({field(x, "CUST_CODE") for x in lines[1:]} - {"", '""', field(line, "CUST_CODE")})
    return set_fields(line, CUST_CODE=customers[0])


CONFLICTS = {"STORE_CODE": _other_store, "SHOP_DATE": _other_date, "CUST_CODE": _other_customer}


def _middle_basket(lines: list[str], min_lines: int = 3) -> str:
    """A carded basket of several lines from the middle of the file."""
    carded = carded_lines(lines)
    for i in carded[len(carded) // 2:]:
        b = field(lines[i], "BASKET_ID")
        if len(basket_lines(lines, b)) >= min_lines:
            return b
    raise AssertionError("no carded basket of several lines")


@pytest.mark.parametrize("mode", ["adjacent", "scattered", "tolerant"])
@pytest.mark.parametrize("column", list(CONFLICTS))
def test_basket_with_conflicting_lines_is_quarantined_whole(week_copy, want, column, mode):
    lines = read_lines(week_copy)
    basket = _middle_basket(lines)
    members = basket_lines(lines, basket)
    j = members[1]
    lines[j] = CONFLICTS[column](lines, lines[j])
    assert field(lines[j], column) != field(lines[members[0]], column)
    expected_kept = without_lines(want, members)
    if mode == "scattered":  # the conflicting line far from the rest of its basket
        lines.append(lines.pop(j))
    members = basket_lines(lines, basket)
    expected = [(i + 1, column, f"BASKET_ID appears with different {column} values", field(lines[i], column))
                for i in members]
    if mode == "tolerant":
        k, entry = make_tolerant(lines, members)
        expected = sorted(expected + [entry])
        expected_kept = without_lines(want, sorted(members + [k]))  # no line moved in this mode
    write_lines(week_copy, lines)

    accepted, quarantined = validate_transactions(week_copy)

    assert q_entries(quarantined) == expected
    assert quarantined.get_column("source_file").to_list() == [FILE_NAME] * len(expected)
    assert len(accepted) + len(quarantined) == len(lines) - 1
    # every other basket is untouched, in file order
    assert accepted.equals(expected_kept)


def test_basket_with_an_anonymous_line_is_a_customer_conflict(week_copy, want):
    lines = read_lines(week_copy)
    basket = _middle_basket(lines)
    members = basket_lines(lines, basket)
    lines[members[1]] = set_fields(lines[members[1]], **{c: '""' for c in CARD})
    write_lines(week_copy, lines)

    accepted, quarantined = validate_transactions(week_copy)

    reason = "BASKET_ID appears with different CUST_CODE values"
    expected = [(i + 1, "CUST_CODE", reason, None if i == members[1] else field(lines[i], "CUST_CODE"))
                for i in members]
    assert q_entries(quarantined) == expected
    assert accepted.equals(without_lines(want, members))


def test_scattered_basket_without_conflict_is_accepted_whole(week_copy, want):
    lines = read_lines(week_copy)
    members = basket_lines(lines, _middle_basket(lines))
    j = members[1]
    lines.append(lines.pop(j))
    write_lines(week_copy, lines)

    accepted, quarantined = validate_transactions(week_copy)

    assert quarantined.is_empty()
    order = list(range(len(want)))
    order.append(order.pop(j - 1))
    assert accepted.equals(want[order])


# ------------------------------------------------------------------------------------------------
# 8. Row accounting: every data line is accepted or quarantined
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["strict", "tolerant"])
def test_malformed_cust_code_does_not_make_anonymous_rows_vanish(week_copy, want, tmp_path, path):
    lines = read_lines(week_copy)
    anonymous = anonymous_lines(lines)
    assert anonymous, "the regression needs anonymous rows in the week"
    carded = carded_lines(lines)
    i = carded[len(carded) // 2]
    lines[i] = set_fields(lines[i], CUST_CODE="CUST12")
    expected, dropped = [(i + 1, "CUST_CODE", "malformed CUST_CODE", "CUST12")], [i]
    if path == "tolerant":
        k, entry = make_tolerant(lines, [i] + anonymous)
        expected, dropped = sorted(expected + [entry]), sorted(dropped + [k])
    write_lines(week_copy, lines)

    result, got, got_q = ingest(week_copy, tmp_path)

    assert q_entries(got_q) == expected
    assert result.lines == len(lines) - 1
    assert result.rows == len(got) == len(lines) - 1 - len(expected)
    assert got.get_column("CUST_CODE").null_count() == len(anonymous)
    assert got.equals(without_lines(want, dropped))


def _cut_points(line: str) -> list[int]:
    """Where to cut a line: inside the first field, right after a comma, inside an id, at the end of
    a field, and around the last two fields (21 whole fields, an empty or a partial last field)."""
    commas = [k for k, ch in enumerate(line) if ch == ","]
    assert len(commas) == N_COLS - 1
    after = lambda n: commas[n - 1] + 1  # noqa: E731  (start of field n, 0-based)
    points = {
        1,
        after(1),
        after(COL["PROD_CODE"]) + 4,
        commas[COL["CUST_CODE"]],
        after(COL["BASKET_ID"]) + 7,
        after(COL["STORE_FORMAT"]),
        after(COL["STORE_FORMAT"]) + 1,
        commas[COL["STORE_FORMAT"]],
        after(COL["STORE_REGION"]),
        len(line) - 1,
    }
    return sorted(p for p in points if 0 < p < len(line))


def test_truncated_last_line_is_quarantined_wherever_it_is_cut(week_copy, want):
    lines = read_lines(week_copy)
    last = lines[-1]
    n_data = len(lines) - 1
    kept = want.head(n_data - 1)
    for cut in _cut_points(last):
        prefix = last[:cut]
        write_lines(week_copy, lines[:-1] + [prefix], final_newline=False)

        accepted, quarantined = validate_transactions(week_copy)

        assert len(accepted) + len(quarantined) == n_data, prefix
        assert quarantined.get_column("line_number").to_list() == [n_data + 1], prefix
        n_fields = prefix.count(",") + 1
        entry = q_entries(quarantined)[0]
        if n_fields < N_COLS:
            assert entry[2:] == (f"missing fields (expected {N_COLS})", str(n_fields)), prefix
        else:  # cut inside the last field: a malformed or empty STORE_REGION
            assert entry[1] == "STORE_REGION", prefix
        assert accepted.equals(kept), prefix


# ------------------------------------------------------------------------------------------------
# Regression: a clean week whose first BASKET_ID happens to end in zeros is not a rounded copy
# ------------------------------------------------------------------------------------------------


def test_every_clean_generated_week_is_accepted(tiny_raw_dir):
    """Generated ids are 994100100000000 + week * 10**7 + n: every week's first basket ends in 7+
    zeros. A rule that counted *rows* with such ids refused the weeks where that basket held 1 % of
    the rows; only a file whose ids are mostly round is a rounded copy."""
    weeks = sorted(tiny_raw_dir.glob("transactions_*.csv"))
    assert len(weeks) >= 12
    big_round_basket = 0
    for path in weeks:
        lines = read_lines(path)
        round_rows = sum(int(field(line, "BASKET_ID")) % 1_000_000 == 0 for line in lines[1:])
        big_round_basket += round_rows >= 0.01 * (len(lines) - 1)
        accepted, quarantined = validate_transactions(path)
        assert quarantined.is_empty(), path.name
        assert len(accepted) == len(lines) - 1, path.name
    assert big_round_basket > 0, "no generated week exercises a round first basket of 1 % of the rows"
