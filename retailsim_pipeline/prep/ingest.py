"""Validate one weekly LGSR file and write it as typed parquet, quarantining rows that break the contract.

Contract (see :mod:`retailsim_pipeline.prep.schema`):

- The file is ``transactions_YYYYWW.csv`` or the same gzip-compressed (``.csv.gz``; compression is
  recognised by its magic bytes, whatever the name says).
- The header must name all 22 LGSR columns (any order, any case; ``seg_1``/``seg_2`` accepted for
  ``CUST_PRICE_SENSITIVITY``/``CUST_LIFESTAGE``). A file that lacks any of them is not this format:
  :class:`LgsrFormatError` names the file and the missing columns, and nothing is written.
- The two customer segment columns hold either the documented codes or the coded family of the
  published copy (:data:`~retailsim_pipeline.prep.schema.SEGMENT_CODE_ALIASES`), one family per
  file; the typed output always holds the documented codes. A file that mixes both families fails
  as a whole (:class:`LgsrFormatError` naming lines of each).
- ``""`` (a quoted empty string) is an empty field. A carded customer may lack a segment.
- A *lossy copy* fails as a whole, with :class:`LossyCopyError` naming the column, an example value,
  the share of rows affected and what to do: an id column in scientific notation (``9.94E+14``, a
  spreadsheet round trip), or BASKET_IDs rounded (many trailing zeros, or so few distinct values
  that baskets would merge). Lossless variants (CRLF, ``1`` for ``1.0``) are fine.
- Basket ids are unique per week across stores: lines of one BASKET_ID with different stores, dates
  or customers are quarantined with that reason (a basket's lines need not be adjacent).
- The file itself must be a regular file (a symbolic link is refused, named, before it is opened)
  whose name is a plausible shop week (WW 1..52, from 200607 on, not in the future); a file whose
  rows mostly hold another week than its name is refused as a whole.
- Absurd but parseable values are quarantined with their reason: SPEND not finite (``inf``,
  ``NaN``), QUANTITY or SPEND per unit above the ceilings of :class:`IngestConfig`.
- A row that breaks the contract goes to the quarantine file with its source file, 1-based line
  number (the header is line 1), the first failing column, the reason and the offending value:
  an unparsable number, a missing field (short row, blank line, empty non-nullable field), a row
  with too many fields, a quantity ≤ 0 or negative spend, a value outside a closed code set, an ID
  that does not match the real format, a week/date/weekday/hour that is impossible or disagrees
  with the file's week. ``XX`` is a valid code, and the three loyalty-card fields may be empty.
- The accepted rows keep their file order (= line order within each basket).
- Row accounting: every data line is either accepted or quarantined (asserted; an anonymous
  shopper's null CUST_CODE can never turn a row mask null and drop the row from both outputs).

Speed: the common case (a clean, well-formed file) is one strict typed ``read_csv`` plus about 15
small polars queries: checks run on *distinct* values where they can (ids, codes, calendar triples),
and the reason for a failing row is worked out for failing rows only. Only when polars cannot parse a file strictly (a non-numeric value in a
numeric column, ragged lines) does it fall back to reading every field as text, splitting lines
itself, and locating the bad rows.

Outputs are written to a temporary name and renamed, so a failure never leaves a half-written file.
"""

import datetime as dt
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from retailsim_pipeline.config import IngestConfig
from retailsim_pipeline.prep.files import write_parquet_atomic
from retailsim_pipeline.prep.schema import (
    CODE_SETS,
    FIRST_WEEK,
    FIRST_WEEK_MONDAY,
    WEEKS_PER_YEAR,
    HEADER_ALIASES,
    ID_COLUMNS,
    ID_PATTERNS,
    LGSR_COLUMNS,
    NULLABLE_COLUMNS,
    SEGMENT_CODE_ALIASES,
    TRANSACTION_SCHEMA,
    file_stem,
    lgsr_weekday,
    unsafe_file_message,
    week_is_plausible,
    week_index,
    week_of_file,
)

log = logging.getLogger(__name__)

LINE_COL = "__line"
RAW_BASKET_ID = "__raw_basket_id"
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

#: The loyalty-card fields: read as text, ``""`` → null, segment codes mapped, then typed.
CARD_COLUMNS: tuple[str, ...] = ("CUST_CODE", "CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE")
SEGMENT_COLUMNS: tuple[str, ...] = tuple(SEGMENT_CODE_ALIASES)

#: Columns whose text can fail to parse, and what such a failure means (card fields apart).
_PARSED_KIND = {
    c: ("unparsable number" if t.is_numeric() else "unknown code")
    for c, t in TRANSACTION_SCHEMA.items()
    if (t.is_numeric() or isinstance(t, pl.Enum)) and c not in CARD_COLUMNS
}

#: A lossy copy is refused when at least this share of a file's rows carry a mangled id.
LOSSY_MIN_SHARE = 0.01
#: Real LGSR baskets have 6.4 lines on average (at most 87 in the 94 published weeks): a file whose
#: BASKET_IDs average more lines than this has had its ids rounded together.
MAX_MEAN_LINES_PER_BASKET = 50
#: The rounding rules judge only files with at least this many rows (a week holds ~27k).
_MIN_ROWS_FOR_ROUNDING_RULES = 500
_SCIENTIFIC = r"^[+-]?\d+(\.\d*)?[eE][+-]?\d+$"
_LOSSY_ADVICE = "re-export the file from the source without a spreadsheet: basket ids were rounded"


class LgsrFormatError(ValueError):
    """The file is not an LGSR transaction file at all (wrong or missing header, unreadable)."""


class LossyCopyError(LgsrFormatError):
    """The file is an LGSR file whose ids were destroyed by a lossy copy (a spreadsheet round trip)."""


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
    #: ``"documented"`` or ``"coded"``: the family of segment codes the file used (None: no segments).
    segment_codes: str | None = None

    @property
    def lines(self) -> int:
        """Data lines read (header excluded) = rows landed + rows quarantined."""
        return self.rows + self.quarantined

    @property
    def quarantine_rate(self) -> float:
        total = self.rows + self.quarantined
        return self.quarantined / total if total else 0.0


GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def read_header(path: Path) -> list[str]:
    """Canonical column names of ``path``'s header (aliases resolved, upper case); raises
    :class:`LgsrFormatError`. A gzip-compressed file is read through gzip, whatever its name."""
    try:
        with (gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")) as fh:
            first = fh.readline()
    except (OSError, EOFError) as exc:
        raise LgsrFormatError(f"{path}: cannot be read ({exc})") from exc
    if not first.strip():
        raise LgsrFormatError(f"{path}: empty file, expected a header with the 22 LGSR columns")
    try:
        text = first.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise LgsrFormatError(f"{path}: line 1 is not UTF-8 text; not an LGSR transaction file") from exc
    names = [n.strip().strip('"').upper() for n in text.split(",")]
    names = [HEADER_ALIASES.get(n, n) for n in names]
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
    schema = {name: pl.String() if name in CARD_COLUMNS else TRANSACTION_SCHEMA.get(name, pl.String())
              for name in header}
    frame = pl.read_csv(path, has_header=True, new_columns=header, schema=schema, encoding="utf8",
                        row_index_name=LINE_COL, row_index_offset=2)
    maybe_short = frame.get_column(header[-1]).has_nulls()
    return frame.select(
        pl.col(LINE_COL).cast(pl.Int64), *LGSR_COLUMNS, pl.lit(None, pl.String).alias(REASON_COL),
        pl.lit(None, pl.String).alias(COLUMN_COL), pl.lit(None, pl.String).alias(VALUE_COL),
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
            target = pl.String() if name in CARD_COLUMNS else target
            casts.append(pl.when(src != "").then(src).cast(target, strict=False).alias(name))
    typed = parsed.with_columns(*casts, pl.col(f"__f{header.index('BASKET_ID')}").alias(RAW_BASKET_ID))

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
        LINE_COL, *LGSR_COLUMNS, REASON_COL, COLUMN_COL, VALUE_COL, "__raw", RAW_BASKET_ID
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


def _row_rules(week: int | None, limits: IngestConfig) -> list[Rule]:
    """Cheap per-row rules, in the order a failure is reported."""
    rules = [_rule(pl.col(c).is_null(), f"missing field {c}", c) for c in LGSR_COLUMNS if c not in NULLABLE_COLUMNS]
    rules += [
        _rule(pl.col("QUANTITY") <= 0, "QUANTITY must be > 0", "QUANTITY"),
        _rule(~pl.col("SPEND").is_finite(), "SPEND is not a finite number", "SPEND"),
        _rule(pl.col("SPEND") < 0, "SPEND must be >= 0", "SPEND"),
        _rule(pl.col("QUANTITY") > limits.max_quantity,
              f"QUANTITY above the ceiling {limits.max_quantity:,} (max_quantity)", "QUANTITY"),
        _rule(pl.col("SPEND") > limits.max_unit_spend * pl.col("QUANTITY"),
              f"SPEND per unit above the ceiling {limits.max_unit_spend:,}".removesuffix(".0") + " (max_unit_spend)", "SPEND"),
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


def _distinct(column: str | pl.Expr) -> pl.Expr:
    """The distinct non-null values of a column as text, in a stable order (so two uses align)."""
    expr = pl.col(column) if isinstance(column, str) else column
    return expr.drop_nulls().unique(maintain_order=True).cast(pl.String)  # distinct first: few casts


def _suspects(df: pl.DataFrame) -> pl.Expr:
    """Rows that may break a value rule (ids, calendar), found by checking each *distinct* value once.

    A weekly file holds a handful of (week, date, weekday) triples and a few thousand distinct ids
    for millions of rows, so the regular expressions and the date arithmetic run on those alone.
    Never null: a null id (an anonymous shopper's CUST_CODE) is not a suspect, and a null inside a
    mask would drop the row from both outputs.
    """
    found = df.select(
        *[_distinct(c).filter(~_distinct(c).str.contains(p)).implode().alias(c) for c, p in ID_PATTERNS.items()],
        pl.struct("SHOP_WEEK", "SHOP_DATE", "SHOP_WEEKDAY").unique().drop_nulls().implode().alias("__calendar"),
    ).row(0, named=True)
    suspect = pl.lit(False)
    for col in ID_PATTERNS:
        if found[col]:
            suspect = suspect | pl.col(col).cast(pl.String).is_in(found[col]).fill_null(False)
    # A handful of distinct triples: plain Python is faster than planning the polars calendar rules.
    bad_keys = [
        t["SHOP_WEEK"] * 1_000_000_000 + t["SHOP_DATE"] * 10 + t["SHOP_WEEKDAY"]
        for t in found["__calendar"]
        if None not in t.values() and not _calendar_ok(t["SHOP_WEEK"], t["SHOP_DATE"], t["SHOP_WEEKDAY"])
    ]
    if bad_keys:
        suspect = suspect | _DATE_KEY.is_in(bad_keys).fill_null(False)
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


def _normalise_card_fields(df: pl.DataFrame, path: Path) -> tuple[pl.DataFrame, str | None]:
    """``""`` → null in the card fields; coded segment values → documented codes; type them.

    Returns the frame (card columns typed as :data:`TRANSACTION_SCHEMA`, an unknown segment code
    recorded as the row's reason unless it already has one) and the code family the file used.
    Raises :class:`LgsrFormatError` when a file mixes the coded and the documented family.
    """
    def text(c: str) -> pl.Expr:
        return pl.when(pl.col(c) != "").then(pl.col(c))

    seen = {c: set(v) for c, v in df.select(_distinct(text(c)).implode().alias(c) for c in SEGMENT_COLUMNS)
            .row(0, named=True).items()}
    coded = {c: seen[c] & set(SEGMENT_CODE_ALIASES[c]) for c in SEGMENT_COLUMNS}
    # XX ("unknown") is written the same in both families, so it tells neither apart.
    documented = {c: seen[c] & (set(CODE_SETS[c]) - {"XX"}) for c in SEGMENT_COLUMNS}
    if any(coded.values()) and any(documented.values()):
        def lines_of(values: dict[str, set[str]]) -> str:
            hit = pl.any_horizontal([pl.col(c).is_in(list(v)) for c, v in values.items() if v])
            lines = df.filter(hit).get_column(LINE_COL).head(5).to_list()
            codes = ", ".join(sorted({v for vs in values.values() for v in vs}))
            return f"{codes} on line(s) {', '.join(map(str, lines))}"

        raise LgsrFormatError(
            f"{path}: the customer segment columns mix two code families: coded values "
            f"({lines_of(coded)}) and documented codes ({lines_of(documented)}); a file uses one or the "
            "other. Re-export the week from one source."
        )
    family = "coded" if any(coded.values()) else "documented" if any(documented.values()) else None
    typed = {}
    for c in SEGMENT_COLUMNS:
        src = text(c).replace(SEGMENT_CODE_ALIASES[c]) if family == "coded" else text(c)
        typed[c] = src.cast(TRANSACTION_SCHEMA[c], strict=False)
    columns = [text("CUST_CODE").cast(TRANSACTION_SCHEMA["CUST_CODE"]).alias("CUST_CODE"),
               *[typed[c].alias(c) for c in SEGMENT_COLUMNS]]
    # Unknown codes, worked out on the distinct values: the common (clean) file needs no reason column.
    mapped = {c: {SEGMENT_CODE_ALIASES[c].get(v, v) if family == "coded" else v for v in seen[c]}
              for c in SEGMENT_COLUMNS}
    if any(mapped[c] - set(CODE_SETS[c]) for c in SEGMENT_COLUMNS):
        unknown = [(text(c).is_not_null() & typed[c].is_null(), f"unknown code in {c}", c, pl.col(c))
                   for c in SEGMENT_COLUMNS]
        reason, column, value = _first_failure(unknown)
        keep = pl.col(REASON_COL).is_not_null()  # a row rejected while parsing keeps that reason
        columns += [
            pl.coalesce(pl.col(REASON_COL), reason).alias(REASON_COL),
            pl.when(keep).then(pl.col(COLUMN_COL)).otherwise(column).alias(COLUMN_COL),
            pl.when(keep).then(pl.col(VALUE_COL)).otherwise(value).alias(VALUE_COL),
        ]
    return df.with_columns(columns), family


def _lossy(path: Path, column: str, rows: pl.Series, lines: pl.Series, what: str, total: int) -> LossyCopyError:
    """The error for a lossy id column: file, column, an example value and its line, the share affected."""
    example = rows.drop_nulls().head(1).to_list()
    at = lines.head(1).to_list()
    return LossyCopyError(
        f"{path}: column {column} is lossy: {len(rows):,} of {total:,} rows ({len(rows) / max(total, 1):.1%}) "
        f"{what}, e.g. {example[0] if example else '?'!r} on line {at[0] if at else '?'}. Loading it would merge "
        f"different baskets into one. Nothing was written: {_LOSSY_ADVICE}."
    )


def _check_lossy_ids(df: pl.DataFrame, path: Path) -> None:
    """Refuse a copy whose ids were mangled (scientific notation, rounding); see the module doc."""
    total = len(df)
    if total == 0:
        return
    min_rows = max(1, int(LOSSY_MIN_SHARE * total))
    texts = {c: pl.col(c) for c in ID_COLUMNS if c != "BASKET_ID"}
    if RAW_BASKET_ID in df.columns:  # the tolerant path kept BASKET_ID's text
        texts["BASKET_ID"] = pl.col(RAW_BASKET_ID).str.strip_chars('"')
    distinct_ids = pl.col("BASKET_ID").drop_nulls().unique()
    # One query for the common case (a clean file): any scientific notation? how round are the ids?
    stats = df.select(
        *[_distinct(t).str.contains(_SCIENTIFIC).any().alias(c) for c, t in texts.items()],
        distinct_ids.len().alias("__distinct"), (distinct_ids % 1_000_000 == 0).sum().alias("__round"),
    ).row(0, named=True)
    for column, text in texts.items():
        if stats[column]:
            hit = df.filter(text.cast(pl.String).str.contains(_SCIENTIFIC).fill_null(False))
            if len(hit) >= min_rows:
                raise _lossy(path, column, hit.select(text.cast(pl.String)).to_series(), hit.get_column(LINE_COL),
                             "hold numbers in scientific notation (a spreadsheet rounded them)", total)
    if total < _MIN_ROWS_FOR_ROUNDING_RULES or not stats["__distinct"]:
        return
    distinct, n_round = stats["__distinct"], stats["__round"]
    # One real id in a million ends in six zeros; rounding makes (nearly) every one do so.
    if n_round / distinct >= 0.5:
        rounded = df.filter((pl.col("BASKET_ID") % 1_000_000 == 0).fill_null(False))
        raise _lossy(path, "BASKET_ID", rounded.get_column("BASKET_ID"), rounded.get_column(LINE_COL),
                     f"hold ids ending in six or more zeros ({n_round:,} of {distinct:,} distinct ids: rounded)", total)
    if total / distinct > MAX_MEAN_LINES_PER_BASKET:
        raise _lossy(path, "BASKET_ID", df.get_column("BASKET_ID"), df.get_column(LINE_COL),
                     f"share only {distinct:,} distinct value(s) ({total / distinct:,.0f} lines per basket; "
                     "real baskets average about 6)", total)


#: Basket-level fields that must agree on every line of one BASKET_ID.
_BASKET_KEYS: tuple[str, ...] = ("STORE_CODE", "SHOP_DATE", "CUST_CODE")


def _basket_spread(accepted: pl.LazyFrame) -> pl.LazyFrame:
    """Per BASKET_ID, how many distinct stores, dates and customers its lines carry (1 when sound)."""
    return accepted.group_by("BASKET_ID").agg(pl.col(c).n_unique().alias(c) for c in _BASKET_KEYS)


def _basket_conflicts(spread: pl.DataFrame) -> pl.DataFrame:
    """The BASKET_IDs whose lines disagree on store, date or customer, with the reason and column."""
    broken = spread.filter(pl.any_horizontal(pl.col(c) > 1 for c in _BASKET_KEYS))
    if broken.is_empty():
        return broken.select("BASKET_ID")
    reason = pl.coalesce(
        pl.when(pl.col(c) > 1).then(pl.lit(f"BASKET_ID appears with different {c} values")) for c in _BASKET_KEYS
    )
    column = pl.coalesce(pl.when(pl.col(c) > 1).then(pl.lit(c)) for c in _BASKET_KEYS)
    return broken.select("BASKET_ID", reason.alias("__conflict"), column.alias("__conflict_col"))


def validate_transactions(path: Path, limits: IngestConfig | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read and validate one LGSR file.

    Returns ``(accepted, quarantined)``: ``accepted`` has exactly the typed columns of
    :data:`TRANSACTION_SCHEMA` in file order; ``quarantined`` follows :data:`QUARANTINE_SCHEMA`,
    ordered by line. Every data line of the file is in exactly one of them.
    Raises :class:`LgsrFormatError` when the file is not this format (:class:`LossyCopyError` when
    its ids were destroyed).
    """
    return _validate(Path(path), limits or IngestConfig())[:2]


#: A file whose rows mostly name another week than its file name is refused as a whole.
_MISNAMED_SHARE = 0.5


def _check_file(path: Path) -> None:
    """Refuse, before reading it, what must never be read: links, non-files, impossible week names."""
    if path.is_symlink() or not path.is_file():
        raise LgsrFormatError(unsafe_file_message(path))
    week = week_of_file(path.name)
    if week is not None and not week_is_plausible(week):
        raise LgsrFormatError(
            f"{path}: {week} in the file name is not an LGSR shop week (YYYYWW with WW 1..52, from "
            f"{FIRST_WEEK} on, not in the future); rename the file after the week its rows hold"
        )


def _check_week_matches_name(df: pl.DataFrame, path: Path, week: int | None) -> None:
    if week is None or df.is_empty():
        return
    other = df.filter(pl.col("SHOP_WEEK").is_not_null() & (pl.col("SHOP_WEEK") != week))
    if len(other) > _MISNAMED_SHARE * len(df):
        common = other.get_column("SHOP_WEEK").mode().sort().to_list()
        raise LgsrFormatError(
            f"{path}: the file name says week {week} but {len(other):,} of {len(df):,} rows say another week "
            f"(mostly {common[0]}, e.g. line {other.get_column(LINE_COL)[0]}); rename the file after its week"
        )


def _validate(path: Path, limits: IngestConfig) -> tuple[pl.DataFrame, pl.DataFrame, str | None]:
    _check_file(path)
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
    df, family = _normalise_card_fields(df, path)
    _check_lossy_ids(df, path)
    _check_week_matches_name(df, path, week)
    n_lines = len(df)

    row_rules = _row_rules(week, limits)
    # The cheap mask runs on every row; *which* rule failed is worked out for failing rows only.
    bad_mask = (
        pl.any_horizontal([cond.fill_null(False) for cond, *_ in row_rules])
        | _suspects(df)
        | pl.col(REASON_COL).is_not_null()
    )
    marked = df.lazy().with_columns(bad_mask.alias("__bad"))
    good = marked.filter(~pl.col("__bad"))
    # One query (the marking shared): accepted rows, rejected rows, and each basket's spread.
    accepted, bad, spread = pl.collect_all([good, marked.filter(pl.col("__bad")), _basket_spread(good)])
    conflicts = _basket_conflicts(spread)
    if not conflicts.is_empty():
        split = accepted.join(conflicts, on="BASKET_ID", how="left", maintain_order="left")
        accepted = split.filter(pl.col("__conflict").is_null()).drop("__conflict", "__conflict_col")
        moved = split.filter(pl.col("__conflict").is_not_null()).with_columns(
            pl.col("__conflict").alias(REASON_COL), pl.col("__conflict_col").alias(COLUMN_COL),
            pl.coalesce(pl.when(pl.col("__conflict_col") == c).then(pl.col(c).cast(pl.String))
                        for c in _BASKET_KEYS).alias(VALUE_COL),
        ).drop("__conflict", "__conflict_col")
        bad = pl.concat([bad, moved.select(bad.columns)]).sort(LINE_COL)
    if len(accepted) + len(bad) != n_lines:  # row accounting: every line lands or is quarantined
        raise AssertionError(f"{path}: {n_lines} lines read but {len(accepted)} accepted + {len(bad)} rejected")
    accepted = accepted.select(LGSR_COLUMNS)
    if bad.is_empty():
        return accepted, pl.DataFrame(schema=QUARANTINE_SCHEMA), family
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
    return accepted, quarantined, family


def transactions_output_path(out_dir: Path, source: Path) -> Path:
    """``out_dir/transactions_YYYYWW.parquet`` for ``transactions_YYYYWW.csv`` or ``.csv.gz``."""
    return Path(out_dir) / (file_stem(source) + ".parquet")


def ingest_weekly_file(
    source: Path, out_dir: Path, quarantine_dir: Path, limits: IngestConfig | None = None
) -> IngestResult:
    """Validate ``source`` and write ``out_dir/<stem>.parquet`` and ``quarantine_dir/<stem>.parquet``.

    Both outputs are written atomically; on :class:`LgsrFormatError` nothing is written and any
    earlier outputs for this file stay as they were. ``limits`` holds the value ceilings
    (:class:`~retailsim_pipeline.config.IngestConfig`; defaults when None).
    """
    source = Path(source)
    accepted, quarantined, family = _validate(source, limits or IngestConfig())
    output = transactions_output_path(out_dir, source)
    quarantine = transactions_output_path(quarantine_dir, source)
    # Weekly files are always read whole: no column statistics to write.
    write_parquet_atomic(quarantined, quarantine, statistics=False)
    write_parquet_atomic(accepted, output, statistics=False)
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
        segment_codes=family,
    )
