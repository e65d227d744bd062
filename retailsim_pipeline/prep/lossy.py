"""Refuse a lossy copy of a weekly LGSR file: ids destroyed by a spreadsheet round trip.

A *lossy copy* fails as a whole, with :class:`LossyCopyError` naming the column, an example value,
the share of rows affected and what to do: an id column in scientific notation (``9.94E+14``, a
spreadsheet round trip), or BASKET_IDs rounded (many trailing zeros, or so few distinct values
that baskets would merge). Lossless variants (CRLF, ``1`` for ``1.0``) are fine.
"""

from pathlib import Path

import polars as pl

from retailsim_pipeline.prep.errors import LossyCopyError
from retailsim_pipeline.prep.reading import LINE_COL, RAW_BASKET_ID
from retailsim_pipeline.prep.rules import distinct_text
from retailsim_pipeline.prep.schema import ID_COLUMNS

#: A lossy copy is refused when at least this share of a file's rows carry a mangled id.
LOSSY_MIN_SHARE = 0.01
#: Real LGSR baskets have 6.4 lines on average (at most 87 in the 94 published weeks): a file whose
#: BASKET_IDs average more lines than this has had its ids rounded together.
MAX_MEAN_LINES_PER_BASKET = 50
#: The rounding rules judge only files with at least this many rows (a week holds ~27k).
_MIN_ROWS_FOR_ROUNDING_RULES = 500
_SCIENTIFIC = r"^[+-]?\d+(\.\d*)?[eE][+-]?\d+$"
_LOSSY_ADVICE = "re-export the file from the source without a spreadsheet: basket ids were rounded"


def lossy_error(path: Path, column: str, rows: pl.Series, lines: pl.Series, what: str, total: int) -> LossyCopyError:
    """The error for a lossy id column: file, column, an example value and its line, the share affected."""
    example = rows.drop_nulls().head(1).to_list()
    at = lines.head(1).to_list()
    return LossyCopyError(
        f"{path}: column {column} is lossy: {len(rows):,} of {total:,} rows ({len(rows) / max(total, 1):.1%}) "
        f"{what}, e.g. {example[0] if example else '?'!r} on line {at[0] if at else '?'}. Loading it would merge "
        f"different baskets into one. Nothing was written: {_LOSSY_ADVICE}."
    )


def id_texts(columns: list[str]) -> dict[str, pl.Expr]:
    """The text of each id column that can hold scientific notation, given the working frame's columns."""
    texts = {c: pl.col(c) for c in ID_COLUMNS if c != "BASKET_ID"}
    if RAW_BASKET_ID in columns:  # the tolerant path kept BASKET_ID's text
        texts["BASKET_ID"] = pl.col(RAW_BASKET_ID).str.strip_chars('"')
    return texts


def scientific_columns(df: pl.DataFrame) -> list[str]:
    """The id columns holding any value in scientific notation (each *distinct* value checked once)."""
    texts = id_texts(df.columns)
    found = df.select(distinct_text(t).str.contains(_SCIENTIFIC).any().alias(c) for c, t in texts.items())
    return [c for c, hit in found.row(0, named=True).items() if hit]


def scientific_rows(column: str, columns: list[str]) -> pl.Expr:
    """Rows whose ``column`` text is in scientific notation (never null)."""
    return id_texts(columns)[column].cast(pl.String).str.contains(_SCIENTIFIC).fill_null(False)


def ids_look_rounded(total: int, distinct: int, n_round: int) -> bool:
    """Whether a file's BASKET_IDs break a rounding rule: ``total`` rows, ``distinct`` non-null ids,
    ``n_round`` of them ending in six or more zeros (files under 500 rows are not judged)."""
    if total < _MIN_ROWS_FOR_ROUNDING_RULES or not distinct:
        return False
    # One real id in a million ends in six zeros; rounding makes (nearly) every one do so.
    return n_round / distinct >= 0.5 or total / distinct > MAX_MEAN_LINES_PER_BASKET


def check_lossy_ids(df: pl.DataFrame, path: Path) -> None:
    """Refuse a copy whose ids were mangled (scientific notation, rounding); see the module doc."""
    total = len(df)
    if total == 0:
        return
    min_rows = max(1, int(LOSSY_MIN_SHARE * total))
    texts = id_texts(df.columns)
    distinct_ids = pl.col("BASKET_ID").drop_nulls().unique()
    # One query for the common case (a clean file): any scientific notation? how round are the ids?
    stats = df.select(
        *[distinct_text(t).str.contains(_SCIENTIFIC).any().alias(c) for c, t in texts.items()],
        distinct_ids.len().alias("__distinct"), (distinct_ids % 1_000_000 == 0).sum().alias("__round"),
    ).row(0, named=True)
    for column, text in texts.items():
        if stats[column]:
            hit = df.filter(scientific_rows(column, df.columns))
            if len(hit) >= min_rows:
                raise lossy_error(path, column, hit.select(text.cast(pl.String)).to_series(), hit.get_column(LINE_COL),
                                  "hold numbers in scientific notation (a spreadsheet rounded them)", total)
    distinct, n_round = stats["__distinct"], stats["__round"]
    if not ids_look_rounded(total, distinct, n_round):
        return
    if n_round / distinct >= 0.5:
        rounded = df.filter((pl.col("BASKET_ID") % 1_000_000 == 0).fill_null(False))
        raise lossy_error(path, "BASKET_ID", rounded.get_column("BASKET_ID"), rounded.get_column(LINE_COL),
                          f"hold ids ending in six or more zeros ({n_round:,} of {distinct:,} distinct ids: "
                          "rounded)", total)
    if total / distinct > MAX_MEAN_LINES_PER_BASKET:
        raise lossy_error(path, "BASKET_ID", df.get_column("BASKET_ID"), df.get_column(LINE_COL),
                          f"share only {distinct:,} distinct value(s) ({total / distinct:,.0f} lines per basket; "
                          "real baskets average about 6)", total)
