"""Validate one weekly LGSR file and write it as typed parquet, quarantining rows that break the contract.

Contract (see :mod:`retailsim_pipeline.prep.schema`):

- The header must name all 22 LGSR columns (any order; ``seg_1``/``seg_2`` accepted for
  ``CUST_PRICE_SENSITIVITY``/``CUST_LIFESTAGE``). A file that lacks any of them is not this format:
  :class:`LgsrFormatError` names the file and the missing columns, and nothing is written.
- A row that breaks the contract goes to the quarantine file with its source file, 1-based line
  number (the header is line 1), the first failing column, the reason and the offending value:
  an unparsable number, a missing field (short row, blank line, empty non-nullable field), a row
  with too many fields, a quantity ≤ 0 or negative spend, a value outside a closed code set, an ID
  that does not match the real format, a week/date/weekday/hour that is impossible or disagrees
  with the file's week. ``XX`` is a valid code, and the three loyalty-card fields may be empty.
- The accepted rows keep their file order (= line order within each basket).

Speed: the common case (a clean, well-formed file) is one strict typed ``read_csv`` plus one
vectorized pass of checks. Only when polars cannot parse a file strictly (a non-numeric value in a
numeric column, ragged lines) does it fall back to reading every field as text, splitting lines
itself, and locating the bad rows.

Outputs are written to a temporary name and renamed, so a failure never leaves a half-written file.
"""

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from retailsim_pipeline.prep.files import write_parquet_atomic
from retailsim_pipeline.prep.schema import (
    FIRST_WEEK,
    FIRST_WEEK_MONDAY,
    WEEKS_PER_YEAR,
    HEADER_ALIASES,
    ID_PATTERNS,
    LGSR_COLUMNS,
    NULLABLE_COLUMNS,
    TRANSACTION_SCHEMA,
    lgsr_weekday,
    week_index,
    week_of_file,
)

log = logging.getLogger(__name__)

LINE_COL = "__line"
REASON_COL = "__reason"
COLUMN_COL = "__column"
VALUE_COL = "__value"

#: Schema of a quarantine file.
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source_file": pl.String(),
    "line_number": pl.Int64(),
    "column": pl.String(),
    "reason": pl.String(),
    "value": pl.String(),
    "raw_line": pl.String(),
}

#: Columns whose text can fail to parse, and what such a failure means.
_PARSED_KIND = {
    c: ("unparsable number" if t.is_numeric() else "unknown code")
    for c, t in TRANSACTION_SCHEMA.items()
    if t.is_numeric() or isinstance(t, pl.Enum)
}


class LgsrFormatError(ValueError):
    """The file is not an LGSR transaction file at all (wrong or missing header, unreadable)."""


@dataclass(frozen=True)
class IngestResult:
    """What :func:`ingest_weekly_file` wrote and counted."""

    source: Path
    week: int | None
    output: Path
    quarantine: Path
    rows: int
    quarantined: int
    baskets: int
    customers: int
    reasons: dict[str, int]

    @property
    def quarantine_rate(self) -> float:
        total = self.rows + self.quarantined
        return self.quarantined / total if total else 0.0


def read_header(path: Path) -> list[str]:
    """Canonical column names of ``path``'s header (aliases resolved); raises :class:`LgsrFormatError`."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline()
    except OSError as exc:
        raise LgsrFormatError(f"{path}: cannot be read ({exc})") from exc
    if not first.strip():
        raise LgsrFormatError(f"{path}: empty file, expected a header with the 22 LGSR columns")
    try:
        text = first.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise LgsrFormatError(f"{path}: line 1 is not UTF-8 text; not an LGSR transaction file") from exc
    names = [HEADER_ALIASES.get(n.strip().strip('"'), n.strip().strip('"')) for n in text.split(",")]
    missing = [c for c in LGSR_COLUMNS if c not in names]
    if missing:
        raise LgsrFormatError(
            f"{path}: not an LGSR transaction file: header lacks column(s) {', '.join(missing)} "
            f"(found {len(names)} column(s): {', '.join(names[:8])}{', …' if len(names) > 8 else ''})"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LgsrFormatError(f"{path}: header repeats column(s) {', '.join(dupes)}")
    return names


def _typed_read(path: Path, header: list[str]) -> tuple[pl.DataFrame, bool]:
    """Strict typed read and whether any line may be short.

    Raises ``polars.exceptions.ComputeError`` on anything it cannot parse. polars pads a short line
    (or a blank one) with nulls instead of failing; such a line leaves the file's last column
    empty, so any empty last field is reported and the caller takes the slow path, which counts
    every line's fields.
    """
    schema = {name: TRANSACTION_SCHEMA.get(name, pl.String()) for name in header}
    frame = pl.read_csv(path, has_header=True, new_columns=header, schema=schema, encoding="utf8")
    maybe_short = frame.get_column(header[-1]).null_count() > 0
    return (
        frame.select(LGSR_COLUMNS)
        .with_row_index(LINE_COL, offset=2)
        .with_columns(pl.col(LINE_COL).cast(pl.Int64), pl.lit(None, pl.String).alias(REASON_COL),
                      pl.lit(None, pl.String).alias(COLUMN_COL), pl.lit(None, pl.String).alias(VALUE_COL))
    ), maybe_short


def _tolerant_read(path: Path, header: list[str]) -> pl.DataFrame:
    """Slow path: split every line ourselves, type each field non-strictly and record why rows fail.

    Returns the same columns as :func:`_typed_read` with ``__reason``/``__column``/``__value`` set for
    rows whose fields could not be parsed or whose field count is wrong.
    """
    n = len(header)
    lines = pl.read_csv(
        path, has_header=False, separator="\x1f", quote_char=None, skip_rows=1,
        schema={"__raw": pl.String()}, encoding="utf8-lossy",
    ).with_row_index(LINE_COL, offset=2).with_columns(pl.col(LINE_COL).cast(pl.Int64))
    raw = pl.col("__raw").str.strip_chars_end("\r")
    n_fields = raw.str.count_matches(",", literal=True) + 1
    fields = raw.str.split(",")
    parsed = lines.with_columns(
        n_fields.alias("__n_fields"),
        *[fields.list.get(i, null_on_oob=True).alias(f"__f{i}") for i in range(n)],
    )
    casts = []
    for i, name in enumerate(header):
        target = TRANSACTION_SCHEMA.get(name)
        if target is not None:
            src = pl.col(f"__f{i}").str.strip_chars('"')
            casts.append(pl.when(src != "").then(src).cast(target, strict=False).alias(name))
    typed = parsed.with_columns(casts)

    # Which numeric field failed to parse: raw text present, typed value null.
    reasons = [
        (pl.col("__raw").is_null() | (pl.col("__raw").str.strip_chars() == ""), "missing fields (blank line)",
         None, None),
        (pl.col("__n_fields") > n, f"too many fields (expected {n})", None, pl.col("__n_fields").cast(pl.String)),
        (pl.col("__n_fields") < n, f"missing fields (expected {n})", None, pl.col("__n_fields").cast(pl.String)),
    ]
    for i, name in enumerate(header):
        kind = _PARSED_KIND.get(name)
        if kind is not None:
            raw_i = pl.col(f"__f{i}")
            reasons.append(
                ((raw_i != "") & raw_i.is_not_null() & pl.col(name).is_null(), f"{kind} in {name}", name, raw_i)
            )
    return typed.with_columns(*_first_failure(reasons)).select(
        LINE_COL, *LGSR_COLUMNS, REASON_COL, COLUMN_COL, VALUE_COL, "__raw"
    )


def _first_failure(rules: "list[Rule]") -> list[pl.Expr]:
    """Expressions for the first failing rule's reason, column and offending value (in rule order).

    Each rule is ``(failing condition, reason, column or None, value expression or None)``.
    """
    def first(pick) -> pl.Expr:
        return pl.coalesce([pl.when(rule[0]).then(pick(rule)) for rule in rules])

    return [
        first(lambda r: pl.lit(r[1])).alias(REASON_COL),
        first(lambda r: pl.lit(r[2], pl.String)).alias(COLUMN_COL),
        first(lambda r: r[3] if r[3] is not None else pl.lit(None, pl.String)).alias(VALUE_COL),
    ]


Rule = tuple[pl.Expr, str, str | None, pl.Expr | None]


def _rule(cond: pl.Expr, reason: str, column: str | None) -> Rule:
    return cond, reason, column, (pl.col(column).cast(pl.String) if column else None)


_EPOCH_FIRST_MONDAY = (FIRST_WEEK_MONDAY - dt.date(1970, 1, 1)).days


def _days_from_civil(y: pl.Expr, m: pl.Expr, d: pl.Expr) -> pl.Expr:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm), as expressions.

    Month 13 is read as January of the next year, so ``days(y, m + 1, 1) - days(y, m, 1)`` is the
    length of month ``m``. Integer arithmetic only: no parsing, no failure on impossible dates.
    """
    y = pl.when(m > 12).then(y + 1).otherwise(y)
    m = pl.when(m > 12).then(m - 12).otherwise(m)
    y = pl.when(m <= 2).then(y - 1).otherwise(y)
    era = y // 400
    yoe = y - era * 400
    mp = pl.when(m > 2).then(m - 3).otherwise(m + 9)
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _row_rules(week: int | None) -> list[Rule]:
    """Cheap per-row rules, in the order a failure is reported."""
    rules = [_rule(pl.col(c).is_null(), f"missing field {c}", c) for c in LGSR_COLUMNS if c not in NULLABLE_COLUMNS]
    rules += [
        _rule(pl.col("QUANTITY") <= 0, "QUANTITY must be > 0", "QUANTITY"),
        _rule(pl.col("SPEND") < 0, "SPEND must be >= 0", "SPEND"),
        _rule(~pl.col("SHOP_WEEKDAY").is_between(1, 7), "SHOP_WEEKDAY must be 1..7 (1 = Sunday)", "SHOP_WEEKDAY"),
        _rule(~pl.col("SHOP_HOUR").is_between(0, 23), "SHOP_HOUR must be 0..23", "SHOP_HOUR"),
        _rule(~(pl.col("SHOP_WEEK") % 100).is_between(1, WEEKS_PER_YEAR), "SHOP_WEEK is not a YYYYWW week",
              "SHOP_WEEK"),
        # An anonymous shopper has no segments: a segment without a card is a broken row.
        _rule(pl.col("CUST_CODE").is_null()
              & (pl.col("CUST_PRICE_SENSITIVITY").is_not_null() | pl.col("CUST_LIFESTAGE").is_not_null()),
              "customer segment without CUST_CODE", "CUST_CODE"),
    ]
    if week is not None:
        rules.append(_rule(pl.col("SHOP_WEEK") != week, f"SHOP_WEEK differs from the file's week {week}",
                           "SHOP_WEEK"))
    return rules


def _date_rules() -> list[Rule]:
    """Calendar rules: a real date, inside its shop week, on the stated weekday."""
    date = pl.col("SHOP_DATE")
    y, m, d = date // 10000, (date // 100) % 100, date % 100
    valid_date = (
        m.is_between(1, 12) & y.is_between(1900, 2100) & d.is_between(1, 31)
        & (d <= _days_from_civil(y, m + 1, 1) - _days_from_civil(y, m, 1))
    )
    days = _days_from_civil(y, m, d)
    wk = pl.col("SHOP_WEEK")
    week_start = _EPOCH_FIRST_MONDAY + 7 * (
        (wk // 100 - FIRST_WEEK // 100) * WEEKS_PER_YEAR + wk % 100 - FIRST_WEEK % 100
    )
    return [
        _rule(~valid_date, "SHOP_DATE is not a YYYYMMDD date", "SHOP_DATE"),
        # 1970-01-01 was a Thursday = LGSR weekday 5 (1 = Sunday).
        _rule(valid_date & (pl.col("SHOP_WEEKDAY") != (days + 4) % 7 + 1),
              "SHOP_WEEKDAY disagrees with SHOP_DATE (1 = Sunday)", "SHOP_WEEKDAY"),
        _rule(valid_date & ~(days - week_start).is_between(0, 6), "SHOP_DATE is not in SHOP_WEEK", "SHOP_DATE"),
    ]


def _id_rules() -> list[Rule]:
    return [
        _rule(pl.col(c).is_not_null() & ~pl.col(c).cast(pl.String).str.contains(p), f"malformed {c}", c)
        for c, p in ID_PATTERNS.items()
    ]


_DATE_KEY = (
    pl.col("SHOP_WEEK").cast(pl.Int64) * 1_000_000_000 + pl.col("SHOP_DATE").cast(pl.Int64) * 10
    + pl.col("SHOP_WEEKDAY").cast(pl.Int64)
)


def _suspects(df: pl.DataFrame) -> pl.Expr:
    """Rows that may break a value rule (ids, calendar), found by checking each *distinct* value once.

    A weekly file holds a handful of (week, date, weekday) triples and a few thousand distinct ids
    for millions of rows, so the regular expressions and the date arithmetic run on those alone.
    """
    suspect = pl.lit(False)
    for col, pattern in ID_PATTERNS.items():
        values = df.get_column(col).unique().drop_nulls().cast(pl.String)
        bad = values.filter(~values.str.contains(pattern))
        if len(bad):
            suspect = suspect | pl.col(col).cast(pl.String).is_in(bad.to_list())
    calendar = df.select("SHOP_WEEK", "SHOP_DATE", "SHOP_WEEKDAY").unique().drop_nulls()
    # A handful of distinct triples: plain Python is faster than planning the polars calendar rules.
    bad_keys = [w * 1_000_000_000 + d * 10 + wd for w, d, wd in calendar.iter_rows() if not _calendar_ok(w, d, wd)]
    if bad_keys:
        suspect = suspect | _DATE_KEY.is_in(bad_keys)
    return suspect


def _calendar_ok(week: int, date: int, weekday: int) -> bool:
    """The Python twin of :func:`_date_rules` for one (SHOP_WEEK, SHOP_DATE, SHOP_WEEKDAY) triple."""
    try:
        day = dt.date(date // 10000, date // 100 % 100, date % 100)
    except ValueError:
        return False
    if not 1900 <= day.year <= 2100 or not 1 <= week % 100 <= WEEKS_PER_YEAR:
        return False
    monday = FIRST_WEEK_MONDAY + dt.timedelta(weeks=week_index(week))
    return 0 <= (day - monday).days <= 6 and weekday == lgsr_weekday(day)


def validate_transactions(path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read and validate one LGSR file.

    Returns ``(accepted, quarantined)``: ``accepted`` has exactly the typed columns of
    :data:`TRANSACTION_SCHEMA` in file order; ``quarantined`` follows :data:`QUARANTINE_SCHEMA`.
    Raises :class:`LgsrFormatError` when the file is not this format.
    """
    path = Path(path)
    header = read_header(path)
    week = week_of_file(path.name)
    try:
        df, short = _typed_read(path, header)
        if short:
            log.info("%s: a line may be short; counting fields", path.name)
    except pl.exceptions.PolarsError as exc:
        log.info("%s: strict read failed (%s); locating bad rows", path.name, str(exc).splitlines()[0])
        short = True
    if short:
        df = _tolerant_read(path, header)
    raw_available = short

    row_rules = _row_rules(week)
    # The cheap mask runs on every row; *which* rule failed is worked out for failing rows only.
    bad_mask = (
        pl.any_horizontal([cond.fill_null(False) for cond, *_ in row_rules])
        | _suspects(df)
        | pl.col(REASON_COL).is_not_null()
    )
    df = df.with_columns(bad_mask.alias("__bad"))
    accepted = df.filter(~pl.col("__bad")).select(LGSR_COLUMNS)
    bad = df.filter(pl.col("__bad"))
    if bad.is_empty():
        return accepted, pl.DataFrame(schema=QUARANTINE_SCHEMA)
    all_rules = row_rules + _date_rules() + _id_rules()
    bad = bad.with_columns(
        # A row already rejected while parsing keeps that reason.
        *[pl.when(pl.col(REASON_COL).is_null()).then(new).otherwise(pl.col(name)).alias(name)
          for new, name in zip(_first_failure(all_rules), (REASON_COL, COLUMN_COL, VALUE_COL))]
    )
    raw_line = (
        pl.col("__raw") if raw_available
        else pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in LGSR_COLUMNS], separator=",")
    )
    quarantined = bad.select(
        pl.lit(path.name).alias("source_file"),
        pl.col(LINE_COL).alias("line_number"),
        pl.col(COLUMN_COL).alias("column"),
        pl.col(REASON_COL).alias("reason"),
        pl.col(VALUE_COL).alias("value"),
        raw_line.alias("raw_line"),
    )
    return accepted, quarantined


def transactions_output_path(out_dir: Path, source: Path) -> Path:
    return Path(out_dir) / (Path(source).stem + ".parquet")


def ingest_weekly_file(source: Path, out_dir: Path, quarantine_dir: Path) -> IngestResult:
    """Validate ``source`` and write ``out_dir/<stem>.parquet`` and ``quarantine_dir/<stem>.parquet``.

    Both outputs are written atomically; on :class:`LgsrFormatError` nothing is written and any
    earlier outputs for this file stay as they were.
    """
    source = Path(source)
    accepted, quarantined = validate_transactions(source)
    output = transactions_output_path(out_dir, source)
    quarantine = Path(quarantine_dir) / (source.stem + ".parquet")
    write_parquet_atomic(quarantined, quarantine)
    write_parquet_atomic(accepted, output)
    counts = accepted.select(
        pl.col("BASKET_ID").n_unique().alias("baskets"),
        pl.col("CUST_CODE").drop_nulls().n_unique().alias("customers"),
    ).row(0, named=True)
    reasons = dict(quarantined.group_by("reason").len().sort("len", descending=True).iter_rows())
    if len(quarantined):
        log.warning("%s: quarantined %d of %d rows (%s)", source.name, len(quarantined),
                    len(quarantined) + len(accepted), ", ".join(f"{k}: {v}" for k, v in reasons.items()))
    return IngestResult(
        source=source,
        week=week_of_file(source.name),
        output=output,
        quarantine=quarantine,
        rows=len(accepted),
        quarantined=len(quarantined),
        baskets=counts["baskets"],
        customers=counts["customers"],
        reasons=reasons,
    )
