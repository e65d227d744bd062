"""A catalogue of bad inputs and the outcome each must have.

1. a file named after an impossible or future week: refused whole, nothing written;
2. a valid file renamed to another plausible week: refused whole, naming both weeks (while a few
   rows of another week are quarantined row by row);
3. a header-only file: an empty result, no error (the runner-level refusal is in test_assets.py);
4. absurd but parseable values (1e308, inf, NaN, a huge QUANTITY): quarantined with their reason,
   exact row accounting, ceilings configurable through IngestConfig;
5. a symbolic link named like a weekly file: refused before it is read, by ingest, by the raw-folder
   scan, by the runner and by the sensor.

Every case starts from a weekly file written by the generator (the session's ``tiny`` data) and
turns it into the defect with plain text edits.
"""

import builtins
import datetime as dt
import gzip
import json
import math
import os
import re
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from retailsim_pipeline.config import IngestConfig
from retailsim_pipeline.definitions import defs
from retailsim_pipeline.defs.automation import new_raw_files_sensor
from retailsim_pipeline.defs.ingest_assets import weekly_files
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.defs.runner import materialize_selection
from retailsim_pipeline.prep.ingest import (
    QUARANTINE_SCHEMA,
    IngestResult,
    LgsrFormatError,
    LossyCopyError,
    ingest_weekly_file,
)
from retailsim_pipeline.prep.schema import (
    LGSR_COLUMNS,
    TRANSACTION_SCHEMA,
    DuplicateWeekError,
    RawFileError,
    raw_weekly_files,
    scan_raw_files,
    week_is_plausible,
    week_monday,
    weekly_file_name,
)
from retailsim_pipeline_tests.prep.lgsr_text import (
    FILE_NAME,
    WEEK,
    field,
    q_entries,
    read_lines,
    set_fields,
    without_lines,
    write_lines,
)

DATA_STAGES = "group:ingest or group:prep"
SECRET_FIRST_LINE = "not_lgsr_secret_q7z,token_9f3k"


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_week_file(tiny_raw) -> Path:
    """The generated week 200607 (read-only)."""
    src = tiny_raw.raw / FILE_NAME
    lines = read_lines(src)
    assert lines[0].split(",") == list(LGSR_COLUMNS)
    assert len(lines) > 500
    assert {field(line, "SHOP_WEEK") for line in lines[1:]} == {str(WEEK)}
    return src


@pytest.fixture(scope="module")
def original(real_week_file, tmp_path_factory) -> tuple[IngestResult, pl.DataFrame]:
    """What the untouched generated week ingests to: every line accepted."""
    root = tmp_path_factory.mktemp("defects_original")
    result = ingest_weekly_file(real_week_file, root / "out", root / "quarantine")
    written = pl.read_parquet(result.output)
    assert result.quarantined == 0 and len(written) == len(read_lines(real_week_file)) - 1
    return result, written


@pytest.fixture
def want(original) -> pl.DataFrame:
    return original[1]


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def ingest(path: Path, root: Path, limits: IngestConfig | None = None):
    result = ingest_weekly_file(path, root / "out", root / "quarantine", limits=limits)
    return result, pl.read_parquet(result.output), pl.read_parquet(result.quarantine)


def spread_lines(lines: list[str], n: int) -> list[int]:
    """``n`` data-line indexes spread over the file (first, middle, last ...)."""
    step = (len(lines) - 2) // (n - 1)
    return [1 + k * step for k in range(n)]


def nothing_written(*folders: Path) -> bool:
    return all(not f.exists() or not any(f.iterdir()) for f in folders)


def assert_refused(path: Path, root: Path, *fragments: str) -> LgsrFormatError:
    out, qdir = root / "out", root / "quarantine"
    with pytest.raises(LgsrFormatError) as info:
        ingest_weekly_file(path, out, qdir)
    message = str(info.value)
    assert not isinstance(info.value, LossyCopyError), message
    for fragment in (str(path), *fragments):
        assert fragment in message, (fragment, message)
    assert nothing_written(out, qdir)
    assert not list(path.parent.glob(".*tmp*"))
    return info.value


# ------------------------------------------------------------------------------------------------
# 1. A file named after an impossible or a future week
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("week", [209999, 209901, 200653, 200600, 200606])
@pytest.mark.parametrize("content", ["copied", "week_rewritten"])
def test_file_named_after_an_impossible_week_is_refused_and_nothing_written(real_week_file, tmp_path, week,
                                                                            content):
    """``copied``: the real week's lines as they are; ``week_rewritten``: SHOP_WEEK rewritten to the
    name's week, so the rows agree with the name and only the name's week itself is impossible."""
    lines = read_lines(real_week_file)
    if content == "week_rewritten":
        lines = [lines[0]] + [set_fields(line, SHOP_WEEK=str(week)) for line in lines[1:]]
    path = tmp_path / "raw" / weekly_file_name(week)
    path.parent.mkdir()
    write_lines(path, lines)

    assert_refused(path, tmp_path, f"{week} in the file name is not an LGSR shop week")


def test_week_is_plausible_bounds():
    today = dt.date(2026, 6, 1)
    assert week_is_plausible(200607, today) and week_is_plausible(200652, today)
    assert week_is_plausible(200701, today) and week_is_plausible("200810", today)
    for code in (200606, 200553, 200653, 200600, 200700, 209999, 209901, 0):
        assert not week_is_plausible(code, today), code
    # "not in the future": a week is plausible from its Monday on
    for code in (209901, 202623):
        monday = week_monday(code)
        assert week_is_plausible(code, monday)
        assert not week_is_plausible(code, monday - dt.timedelta(days=1))
    assert not week_is_plausible(209901)  # against the real today


# ------------------------------------------------------------------------------------------------
# 2. A file whose rows hold another week than its name
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("other", [200630, 200608, 200701])
def test_valid_week_renamed_to_another_plausible_week_is_refused_naming_both(real_week_file, tmp_path, other):
    path = tmp_path / "raw" / weekly_file_name(other)
    path.parent.mkdir()
    shutil.copyfile(real_week_file, path)

    error = assert_refused(path, tmp_path, f"week {other}", str(WEEK))
    n = len(read_lines(real_week_file)) - 1
    assert f"{n:,} of {n:,} rows" in str(error)


def test_a_few_rows_of_another_week_are_quarantined_row_by_row(week_copy, want, tmp_path):
    lines = read_lines(week_copy)
    targets = spread_lines(lines, 3)
    for i in targets:
        lines[i] = set_fields(lines[i], SHOP_WEEK="200608")
    write_lines(week_copy, lines)

    result, got, got_q = ingest(week_copy, tmp_path)

    reason = f"SHOP_WEEK differs from the file's week {WEEK}"
    assert q_entries(got_q, with_value=False) == [(i + 1, "SHOP_WEEK", reason) for i in targets]
    assert got_q.get_column("value").to_list() == ["200608"] * 3
    assert result.rows == len(lines) - 1 - 3 and result.quarantined == 3
    assert got.equals(without_lines(want, targets))


@pytest.mark.parametrize("share", ["half", "half_plus_one"])
def test_a_file_is_refused_only_when_most_rows_hold_another_week(week_copy, tmp_path, share):
    lines = read_lines(week_copy)
    n = len(lines) - 1
    k = n // 2 + (1 if share == "half_plus_one" else 0)
    mostly = k * 2 > n
    lines = [lines[0]] + [set_fields(line, SHOP_WEEK="200608") if j < k else line
                          for j, line in enumerate(lines[1:])]
    write_lines(week_copy, lines)

    if mostly:
        error = assert_refused(week_copy, tmp_path, f"week {WEEK}", "200608")
        assert f"{k:,} of {n:,} rows" in str(error)
    else:
        result, got, got_q = ingest(week_copy, tmp_path)
        assert result.quarantined == k and result.rows == n - k
        assert set(got_q.get_column("reason")) == {f"SHOP_WEEK differs from the file's week {WEEK}"}


# ------------------------------------------------------------------------------------------------
# 3. A header-only file: an empty result at ingest level
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_header_only_file_gives_an_empty_result(week_copy, tmp_path, ending):
    week_copy.write_bytes((read_lines(week_copy)[0] + ending).encode())

    result, got, got_q = ingest(week_copy, tmp_path)

    assert (result.rows, result.quarantined, result.lines) == (0, 0, 0)
    assert (result.baskets, result.customers, result.reasons) == (0, 0, {})
    assert result.quarantine_rate == 0.0 and result.week == WEEK
    assert got.is_empty() and dict(got.schema) == TRANSACTION_SCHEMA
    assert got_q.is_empty() and dict(got_q.schema) == QUARANTINE_SCHEMA


# ------------------------------------------------------------------------------------------------
# 4. Absurd but parseable values
# ------------------------------------------------------------------------------------------------

NOT_FINITE = "SPEND is not a finite number"
SPEND_CEILING = "SPEND per unit above the ceiling 10,000 (max_unit_spend)"
QUANTITY_CEILING = "QUANTITY above the ceiling 10,000 (max_quantity)"

ABSURD = {
    "spend_1e308": ("SPEND", "1e308", SPEND_CEILING),
    "spend_inf": ("SPEND", "inf", NOT_FINITE),
    "spend_minus_inf": ("SPEND", "-inf", NOT_FINITE),
    "spend_NaN": ("SPEND", "NaN", NOT_FINITE),
    "quantity_1000000": ("QUANTITY", "1000000", QUANTITY_CEILING),
}


def _same_number(text: str, raw: str) -> bool:
    a, b = float(text), float(raw)
    return (math.isnan(a) and math.isnan(b)) or a == b


def _make_tolerant(lines: list[str], avoid) -> tuple[int, tuple]:
    """One more line (not in ``avoid``) with an unparsable QUANTITY: the file takes the tolerant read."""
    i = next(i for i in range(len(lines) // 3, len(lines)) if i not in set(avoid))
    lines[i] = set_fields(lines[i], QUANTITY="abc")
    return i, (i + 1, "QUANTITY", "unparsable number in QUANTITY")


@pytest.mark.parametrize("path", ["strict", "tolerant"])
@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_value_is_quarantined_with_its_reason(week_copy, want, tmp_path, case, path):
    column, value, reason = ABSURD[case]
    lines = read_lines(week_copy)
    targets = spread_lines(lines, 3)
    for i in targets:
        lines[i] = set_fields(lines[i], **{column: value})
    expected = [(i + 1, column, reason) for i in targets]
    dropped = list(targets)
    if path == "tolerant":
        k, entry = _make_tolerant(lines, targets)
        expected, dropped = sorted(expected + [entry]), sorted(dropped + [k])
    write_lines(week_copy, lines)

    result, got, got_q = ingest(week_copy, tmp_path)

    assert q_entries(got_q, with_value=False) == expected
    values = dict(zip(got_q.get_column("line_number"), got_q.get_column("value")))
    assert all(_same_number(values[i + 1], value) for i in targets), values
    assert result.lines == result.rows + result.quarantined == len(lines) - 1
    assert result.quarantined == len(expected) and result.reasons.get(reason) == len(targets)
    assert got.equals(without_lines(want, dropped))
    assert got.get_column("SPEND").is_finite().all()


def test_every_absurd_value_in_one_file_each_with_its_own_reason(week_copy, want, tmp_path):
    lines = read_lines(week_copy)
    targets = spread_lines(lines, len(ABSURD))
    for i, (column, value, _) in zip(targets, ABSURD.values()):
        lines[i] = set_fields(lines[i], **{column: value})
    write_lines(week_copy, lines)

    result, got, got_q = ingest(week_copy, tmp_path)

    assert q_entries(got_q, with_value=False) == [(i + 1, column, reason) for i, (column, _, reason) in zip(targets, ABSURD.values())]
    assert result.rows + result.quarantined == len(lines) - 1 == result.lines
    assert got.equals(without_lines(want, targets))


@pytest.mark.parametrize("typo", ["weekday_plus_10", "weekday_minus_10", "nine_digit_date"])
def test_a_calendar_typo_quarantines_its_own_line_only(week_copy, want, tmp_path, typo):
    """A line whose (week, date, weekday) is out of range must not take other lines with it. The
    distinct-triple check once keyed triples as week·10⁹ + date·10 + weekday, so weekday 14 on a
    Tuesday read as weekday 4 on the Wednesday (and a nine-digit date of the week before as a date of
    this week): every line of that day was quarantined, without a reason."""
    lines = read_lines(week_copy)
    weekday_of = {field(line, "SHOP_DATE"): int(field(line, "SHOP_WEEKDAY")) for line in lines[1:]}
    tuesday, wednesday, thursday = sorted(weekday_of)[1:4]

    def first_line_on(day: str) -> int:
        return next(k for k in range(1, len(lines)) if field(lines[k], "SHOP_DATE") == day)

    victims = [k for k in range(1, len(lines)) if field(lines[k], "SHOP_DATE") == wednesday]
    weekday_rule = ("SHOP_WEEKDAY", "SHOP_WEEKDAY must be 1..7 (1 = Sunday)")
    if typo == "weekday_plus_10":  # on the Tuesday, the Wednesday's weekday + 10
        i = first_line_on(tuesday)
        lines[i] = set_fields(lines[i], SHOP_WEEKDAY=str(weekday_of[wednesday] + 10))
        expected = (i + 1, *weekday_rule)
    elif typo == "weekday_minus_10":  # on the Thursday, the Wednesday's weekday - 10
        i = first_line_on(thursday)
        lines[i] = set_fields(lines[i], SHOP_WEEKDAY=str(weekday_of[wednesday] - 10))
        expected = (i + 1, *weekday_rule)
    else:  # a line of the week before dated the Wednesday + 10⁸
        i = first_line_on(tuesday)
        lines[i] = set_fields(lines[i], SHOP_WEEK=str(WEEK - 1), SHOP_DATE=str(int(wednesday) + 10 ** 8),
                              SHOP_WEEKDAY=str(weekday_of[wednesday]))
        expected = (i + 1, "SHOP_WEEK", f"SHOP_WEEK differs from the file's week {WEEK}")
    assert victims and i not in victims
    write_lines(week_copy, lines)

    result, got, got_q = ingest(week_copy, tmp_path)

    assert q_entries(got_q, with_value=False) == [expected]
    assert got.equals(without_lines(want, [i]))


@pytest.mark.parametrize(("column", "at", "above"), [("QUANTITY", "10000", "10001"),
                                                     ("SPEND", "10000.00", "10000.01")])
def test_default_ceilings_are_inclusive(week_copy, want, tmp_path, column, at, above):
    """QUANTITY 10,000 and a unit price of £10,000 are accepted; one more is quarantined."""
    lines = read_lines(week_copy)
    i, j = spread_lines(lines, 4)[1:3]
    for k in (i, j):  # one unit, so SPEND is the unit price; a tiny SPEND for the QUANTITY case
        lines[k] = set_fields(lines[k], QUANTITY="1", SPEND="1.00")
    lines[i] = set_fields(lines[i], **{column: at})
    lines[j] = set_fields(lines[j], **{column: above})
    write_lines(week_copy, lines)

    result, got, got_q = ingest(week_copy, tmp_path)

    reason = QUANTITY_CEILING if column == "QUANTITY" else SPEND_CEILING
    assert q_entries(got_q, with_value=False) == [(j + 1, column, reason)]
    assert result.rows == len(lines) - 2
    assert float(got.row(i - 1, named=True)[column]) == float(at)


def _unit_prices(path: Path) -> pl.DataFrame:
    """Line index (header = 0), QUANTITY and unit price of every data line, read from the text."""
    return pl.read_csv(path, infer_schema=False).select(
        (pl.int_range(pl.len()) + 1).alias("line"),
        pl.col("QUANTITY").cast(pl.Int64),
        (pl.col("SPEND").cast(pl.Float64) / pl.col("QUANTITY").cast(pl.Int64)).alias("unit"),
    )


def test_max_unit_spend_is_configurable(week_copy, want, tmp_path):
    prices = _unit_prices(week_copy)
    distinct = prices.get_column("unit").unique().sort().to_list()
    assert len(distinct) > 20
    # just below the 6th highest real unit price, above the one under it
    p, below = distinct[-6], distinct[-7]
    limit = round((p + below) / 2, 4)
    assert below + 1e-6 < limit < p - 1e-6
    expected = prices.filter(pl.col("unit") > limit).get_column("line").to_list()
    assert 6 <= len(expected) < len(prices) // 10

    result, got, got_q = ingest(week_copy, tmp_path, IngestConfig(max_unit_spend=limit))

    assert got_q.get_column("line_number").to_list() == [i + 1 for i in expected]
    assert set(got_q.get_column("column")) == {"SPEND"}
    (reason,) = set(got_q.get_column("reason"))
    shown = re.fullmatch(r"SPEND per unit above the ceiling ([\d,.]+) \(max_unit_spend\)", reason)
    assert shown and float(shown.group(1).replace(",", "")) == limit, reason
    assert result.rows + result.quarantined == len(prices) and result.quarantined == len(expected)
    assert got.equals(without_lines(want, expected))
    # the default ceiling keeps every one of those rows
    default, got_default, _ = ingest(week_copy, tmp_path / "default")
    assert default.quarantined == 0 and got_default.equals(want)


def test_max_quantity_is_configurable(week_copy, want, tmp_path):
    prices = _unit_prices(week_copy)
    top = prices.get_column("QUANTITY").max()
    assert top > 2
    expected = prices.filter(pl.col("QUANTITY") > top - 1).get_column("line").to_list()
    assert 0 < len(expected) < len(prices) // 10

    result, got, got_q = ingest(week_copy, tmp_path, IngestConfig(max_quantity=top - 1))

    assert q_entries(got_q, with_value=False) == [(i + 1, "QUANTITY", f"QUANTITY above the ceiling {top - 1} (max_quantity)")
                                for i in expected]
    assert result.rows + result.quarantined == len(prices)
    assert got.equals(without_lines(want, expected))


# ------------------------------------------------------------------------------------------------
# 5. A symbolic link named like a weekly file
# ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["weekly_file_elsewhere", "not_lgsr_file", "etc_hostname"])
def link_target(request, tiny_raw, tmp_path) -> Path:
    """What the link in raw/ points to: a real weekly file outside raw/, or a file that is not LGSR."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if request.param == "weekly_file_elsewhere":
        target = elsewhere / weekly_file_name(200618)
        shutil.copyfile(tiny_raw.raw / target.name, target)
    elif request.param == "not_lgsr_file":
        target = elsewhere / "secrets.txt"
        target.write_text(SECRET_FIRST_LINE + "\nsecond,line\n")
    else:
        target = Path("/etc/hostname")
        if not target.is_file() or not target.read_text().strip():
            pytest.skip("no /etc/hostname with content on this machine")
    return target


def _first_line(path: Path) -> str:
    return path.read_text().splitlines()[0].strip()


def test_ingest_refuses_a_symbolic_link_without_reading_it(link_target, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    # a weekly file is linked under its own name: read through the link, it would ingest cleanly
    link = raw / (link_target.name if link_target.name.startswith("transactions_") else weekly_file_name(200619))
    link.symlink_to(link_target)
    opened: list[str] = []
    watched = {str(link), str(link_target), os.path.realpath(link_target)}

    def spy(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) in watched:
                opened.append(os.fspath(file))
            return real(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(gzip, "open", spy(gzip.open))
    monkeypatch.setattr(pl, "read_csv", spy(pl.read_csv))

    error = assert_refused(link, tmp_path, "symbolic link")

    assert opened == []
    first = _first_line(link_target)
    if len(first) >= 4:  # a short hostname could occur in the message's own words
        assert first.upper() not in str(error).replace(str(link), "").upper()
    assert "SHOP_WEEK" not in str(error)
    # The message does not depend on what the link points to: the same with a dangling link.
    link.unlink()
    link.symlink_to(tmp_path / "does-not-exist.csv")
    assert str(assert_refused(link, tmp_path, "symbolic link")) == str(error)


def test_raw_folder_scan_names_the_link_and_leaves_it_out(tiny_copy, link_target):
    raw = tiny_copy.raw
    regular = {int(p.name[len("transactions_"):-len(".csv")]): p for p in raw.glob("transactions_*.csv")}
    link = raw / weekly_file_name(200619)
    link.symlink_to(link_target)
    gz_link = raw / (weekly_file_name(WEEK) + ".gz")  # beside a regular week: not a duplicate either
    gz_link.symlink_to(link_target)

    with pytest.raises(RawFileError) as info:
        raw_weekly_files(raw)
    message = str(info.value)
    assert not isinstance(info.value, DuplicateWeekError)
    assert str(link) in message and str(gz_link) in message and "symbolic link" in message
    named = set(re.findall(r"(\S+): a symbolic link", message))
    assert named == {str(link), str(gz_link)}, message

    files, duplicates = scan_raw_files(raw)
    assert files == regular and duplicates == {}


def _move_week_out_and_link_it(paths, tmp_path) -> Path:
    """The last week moved out of raw/ and linked back under its own name (a "data kept elsewhere" setup)."""
    name = weekly_file_name(200618)
    elsewhere = tmp_path / "kept_elsewhere"
    elsewhere.mkdir()
    shutil.move(paths.raw / name, elsewhere / name)
    (paths.raw / name).symlink_to(elsewhere / name)
    return paths.raw / name


def test_runner_stops_on_a_link_naming_it_and_registers_nothing(tiny_copy, instance, tmp_path):
    weekly_link = _move_week_out_and_link_it(tiny_copy, tmp_path)
    other_link = tiny_copy.raw / weekly_file_name(200619)
    other_link.symlink_to(tmp_path / "kept_elsewhere" / weekly_file_name(200618))

    report = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)

    assert not report.success
    (failure,) = report.failures
    assert str(weekly_link) in failure and str(other_link) in failure and "symbolic link" in failure
    assert not report.registered and not report.partitions_materialized and not report.run_ids
    assert instance.get_dynamic_partitions(weekly_files.name) == []
    assert not tiny_copy.transactions.exists() and not tiny_copy.quarantine.exists()
    assert any("symbolic link" in line for line in report.lines())


def test_runner_stops_on_a_link_to_a_non_lgsr_file(tiny_copy, instance, tmp_path):
    secret = tmp_path / "secrets.txt"
    secret.write_text(SECRET_FIRST_LINE + "\n")
    link = tiny_copy.raw / weekly_file_name(200619)
    link.symlink_to(secret)

    report = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)

    assert not report.success
    (failure,) = report.failures
    assert str(link) in failure and "symbolic link" in failure
    assert SECRET_FIRST_LINE.upper() not in failure.upper()
    assert not report.registered and not report.run_ids
    assert instance.get_dynamic_partitions(weekly_files.name) == []


def _tick(instance, paths, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"retailsim_data": RetailSimData(data_dir=str(paths.root))})
    return new_raw_files_sensor(context)


def test_sensor_requests_no_run_for_a_link_and_still_requests_the_regular_files(tiny_copy, instance, tmp_path,
                                                                                 capfd):
    weekly_link = _move_week_out_and_link_it(tiny_copy, tmp_path)
    secret = tmp_path / "secrets.txt"
    secret.write_text(SECRET_FIRST_LINE + "\n")
    links = [weekly_link, tiny_copy.raw / weekly_file_name(200619), tiny_copy.raw / (weekly_file_name(WEEK) + ".gz")]
    for link in links[1:]:  # the .gz one beside a regular week
        link.symlink_to(secret)
    regular = sorted(p.name[len("transactions_"):-len(".csv")] for p in tiny_copy.raw.glob("transactions_*.csv")
                     if not p.is_symlink())
    assert len(regular) == 11 and "200618" not in regular and str(WEEK) in regular

    capfd.readouterr()
    first = _tick(instance, tiny_copy)
    logged = capfd.readouterr().err

    for link in links:  # each link is named in the sensor's log, as not ingested
        assert f"{link}: a symbolic link" in logged, logged
    assert logged.count("not ingested") == len(links), logged
    assert SECRET_FIRST_LINE.upper() not in logged.upper()

    assert sorted(r.partition_key for r in first.run_requests) == regular
    assert sorted(first.dynamic_partitions_requests[0].partition_keys) == regular
    cursor_names = set(json.loads(first.cursor))
    assert cursor_names == {weekly_file_name(int(w)) for w in regular}
    assert weekly_link.name not in cursor_names

    # Nothing new on the next tick: the links never turn into requests.
    instance.add_dynamic_partitions(weekly_files.name, regular)
    second = _tick(instance, tiny_copy, first.cursor)
    assert not second.run_requests and not second.dynamic_partitions_requests




def test_the_ingest_asset_refuses_a_link_before_hashing_it(tiny_copy, tmp_path, monkeypatch):
    """Launched directly (UI, job, an old sensor request), the asset never follows the link."""
    import dagster as dg

    import retailsim_pipeline.defs.ingest_assets as ingest_assets
    from retailsim_pipeline.defs.ingest_assets import raw_transactions, weekly_files
    from retailsim_pipeline.defs.resources import RetailSimData

    target = tmp_path / "elsewhere.csv"
    target.write_text("secret first line\n")
    (tiny_copy.raw / "transactions_200619.csv").symlink_to(target)
    hashed = []
    monkeypatch.setattr(ingest_assets, "file_sha256", lambda path: hashed.append(path) or "0" * 64)
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(weekly_files.name, ["200619"])
        result = dg.materialize([raw_transactions], partition_key="200619", instance=instance, raise_on_error=False,
                                resources={"retailsim_data": RetailSimData(data_dir=str(tiny_copy.root))})
    assert not result.success and hashed == []
    message = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.to_string()
    assert "symbolic link" in message and "secret first line" not in message
