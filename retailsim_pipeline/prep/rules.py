"""The row rules of a weekly LGSR file: which rows break the contract, and why.

- Absurd but parseable values are quarantined with their reason: SPEND not finite (``inf``,
  ``NaN``), QUANTITY or SPEND per unit above the ceilings of :class:`IngestConfig`.
- A row fails on a missing field (empty non-nullable field), a quantity ≤ 0 or negative spend, an
  ID that does not match the real format, a week/date/weekday/hour that is impossible or disagrees
  with the file's week, or a customer segment without a loyalty card. ``XX`` is a valid code, and
  the three loyalty-card fields may be empty.

A rule is ``(failing condition, reason, column or None, value expression or None)``; a failing row
reports its first failing rule (:func:`first_failure`). The expressions write the reason into
:data:`REASON_COL`, :data:`COLUMN_COL` and :data:`VALUE_COL` of the working frame.

Speed: the cheap rules run on every row; ids and calendar triples are checked once per *distinct*
value (:func:`suspects`), and which rule failed is worked out for the failing rows only.
"""

import datetime as dt

import polars as pl

from retailsim_pipeline.config import IngestConfig
from retailsim_pipeline.prep.schema import (
    FIRST_WEEK,
    FIRST_WEEK_MONDAY,
    ID_PATTERNS,
    LGSR_COLUMNS,
    NULLABLE_COLUMNS,
    WEEKS_PER_YEAR,
    lgsr_weekday,
    week_index,
)

#: Working-frame columns: why a row failed, in which column, and the offending value (null: passed).
REASON_COL = "__reason"
COLUMN_COL = "__column"
VALUE_COL = "__value"


Rule = tuple[pl.Expr, str | pl.Expr, str | None, pl.Expr | None]


def first_failure(rules: list[Rule]) -> list[pl.Expr]:
    """Expressions for the first failing rule's reason, column and offending value (in rule order).

    Each rule is ``(failing condition, reason, column or None, value expression or None)``; the
    reason is a text, or a text expression where it depends on the row's file (its week).
    """
    def first(pick) -> pl.Expr:
        return pl.coalesce([pl.when(r[0]).then(pick(r)) for r in rules])

    return [
        first(lambda r: r[1] if isinstance(r[1], pl.Expr) else pl.lit(r[1])).alias(REASON_COL),
        first(lambda r: pl.lit(r[2], pl.String)).alias(COLUMN_COL),
        first(lambda r: r[3] if r[3] is not None else pl.lit(None, pl.String)).alias(VALUE_COL),
    ]


def rule(cond: pl.Expr, reason: str | pl.Expr, column: str | None) -> Rule:
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


def row_rules(week: int | pl.Expr | None, limits: IngestConfig) -> list[Rule]:
    """Cheap per-row rules, in the order a failure is reported.

    ``week``: the file's week (None: the file name names none), or an expression giving each row
    its file's week (null: none) when rows of several files are checked together.
    """
    rules = [rule(pl.col(c).is_null(), f"missing field {c}", c) for c in LGSR_COLUMNS if c not in NULLABLE_COLUMNS]
    rules += [
        rule(pl.col("QUANTITY") <= 0, "QUANTITY must be > 0", "QUANTITY"),
        rule(~pl.col("SPEND").is_finite(), "SPEND is not a finite number", "SPEND"),
        rule(pl.col("SPEND") < 0, "SPEND must be >= 0", "SPEND"),
        rule(pl.col("QUANTITY") > limits.max_quantity,
             f"QUANTITY above the ceiling {limits.max_quantity:,} (max_quantity)", "QUANTITY"),
        rule(pl.col("SPEND") > limits.max_unit_spend * pl.col("QUANTITY"),
             f"SPEND per unit above the ceiling {limits.max_unit_spend:,}".removesuffix(".0") + " (max_unit_spend)", "SPEND"),
        rule(~pl.col("SHOP_WEEKDAY").is_between(1, 7), "SHOP_WEEKDAY must be 1..7 (1 = Sunday)", "SHOP_WEEKDAY"),
        rule(~pl.col("SHOP_HOUR").is_between(0, 23), "SHOP_HOUR must be 0..23", "SHOP_HOUR"),
        rule(~(pl.col("SHOP_WEEK") % 100).is_between(1, WEEKS_PER_YEAR), "SHOP_WEEK is not a YYYYWW week",
             "SHOP_WEEK"),
        # An anonymous shopper has no segments: a segment without a card is a broken row.
        rule(pl.col("CUST_CODE").is_null()
             & (pl.col("CUST_PRICE_SENSITIVITY").is_not_null() | pl.col("CUST_LIFESTAGE").is_not_null()),
             "customer segment without CUST_CODE", "CUST_CODE"),
    ]
    if isinstance(week, pl.Expr):
        rules.append(rule(pl.col("SHOP_WEEK") != week, pl.format("SHOP_WEEK differs from the file's week {}", week),
                          "SHOP_WEEK"))
    elif week is not None:
        rules.append(rule(pl.col("SHOP_WEEK") != week, f"SHOP_WEEK differs from the file's week {week}",
                          "SHOP_WEEK"))
    return rules


def date_rules() -> list[Rule]:
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
        rule(~valid_date, "SHOP_DATE is not a YYYYMMDD date", "SHOP_DATE"),
        # 1970-01-01 was a Thursday = LGSR weekday 5 (1 = Sunday).
        rule(valid_date & (pl.col("SHOP_WEEKDAY") != (days + 4) % 7 + 1),
             "SHOP_WEEKDAY disagrees with SHOP_DATE (1 = Sunday)", "SHOP_WEEKDAY"),
        rule(valid_date & ~(days - week_start).is_between(0, 6), "SHOP_DATE is not in SHOP_WEEK", "SHOP_DATE"),
    ]


def id_rules() -> list[Rule]:
    return [
        rule(pl.col(c).is_not_null() & ~pl.col(c).cast(pl.String).str.contains(p), f"malformed {c}", c)
        for c, p in ID_PATTERNS.items()
    ]


# A (week, date, weekday) triple as one integer, week·10⁹ + date·10 + weekday: one-to-one only while
# the date has at most eight digits and the weekday one (weekday 14 on the 11th would otherwise read
# as weekday 4 on the 12th); a triple outside that range is a suspect by itself.
_DATE_KEY = (
    pl.col("SHOP_WEEK").cast(pl.Int64) * 1_000_000_000 + pl.col("SHOP_DATE").cast(pl.Int64) * 10
    + pl.col("SHOP_WEEKDAY").cast(pl.Int64)
)
_KEYED = pl.col("SHOP_DATE").is_between(0, 99_999_999) & pl.col("SHOP_WEEKDAY").is_between(0, 9)


def distinct_text(column: str | pl.Expr) -> pl.Expr:
    """The distinct non-null values of a column as text, in a stable order (so two uses align)."""
    expr = pl.col(column) if isinstance(column, str) else column
    return expr.drop_nulls().unique(maintain_order=True).cast(pl.String)  # distinct first: few casts


def suspects(df: pl.DataFrame) -> pl.Expr:
    """Rows that may break a value rule (ids, calendar), found by checking each *distinct* value once.

    A weekly file holds a handful of (week, date, weekday) triples and a few thousand distinct ids
    for millions of rows, so the regular expressions and the date arithmetic run on those alone.
    Never null: a null id (an anonymous shopper's CUST_CODE) is not a suspect, and a null inside a
    mask would drop the row from both outputs.
    """
    found = df.select(
        *[distinct_text(c).filter(~distinct_text(c).str.contains(p)).implode().alias(c)
          for c, p in ID_PATTERNS.items()],
        _DATE_KEY.filter(_KEYED).drop_nulls().unique().implode().alias("__calendar"),
        (~_KEYED).fill_null(False).any().alias("__unkeyed"),
    ).row(0, named=True)
    suspect = pl.lit(False)
    for col in ID_PATTERNS:
        if found[col]:
            suspect = suspect | pl.col(col).cast(pl.String).is_in(found[col]).fill_null(False)
    # A handful of distinct triples: plain Python is faster than planning the polars calendar rules.
    bad_keys = [key for key in found["__calendar"]
                if not _calendar_ok(key // 1_000_000_000, key % 1_000_000_000 // 10, key % 10)]
    if bad_keys:
        suspect = suspect | _DATE_KEY.is_in(bad_keys).fill_null(False)
    if found["__unkeyed"]:
        suspect = suspect | (~_KEYED).fill_null(False)
    return suspect


def _calendar_ok(week: int, date: int, weekday: int) -> bool:
    """The Python twin of :func:`date_rules` for one (SHOP_WEEK, SHOP_DATE, SHOP_WEEKDAY) triple."""
    try:
        day = dt.date(date // 10000, date // 100 % 100, date % 100)
    except ValueError:
        return False
    if not 1900 <= day.year <= 2100 or not 1 <= week % 100 <= WEEKS_PER_YEAR:
        return False
    monday = FIRST_WEEK_MONDAY + dt.timedelta(weeks=week_index(week))
    return 0 <= (day - monday).days <= 6 and weekday == lgsr_weekday(day)
