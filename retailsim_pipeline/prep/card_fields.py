"""Type the loyalty-card fields of a weekly LGSR file: empty fields, and the two segment code families.

- ``""`` (a quoted empty string) is an empty field. A carded customer may lack a segment.
- The two customer segment columns hold either the documented codes or the coded family of the
  published copy (:data:`~retailsim_pipeline.prep.schema.SEGMENT_CODE_ALIASES`), one family per
  file; the typed output always holds the documented codes. A file that mixes both families fails
  as a whole (:class:`LgsrFormatError` naming lines of each).
- A segment value in neither family is the row's reason (``unknown code in …``), unless the row
  already failed while being parsed.
"""

from pathlib import Path

import polars as pl

from retailsim_pipeline.prep.errors import LgsrFormatError
from retailsim_pipeline.prep.reading import LINE_COL
from retailsim_pipeline.prep.rules import COLUMN_COL, REASON_COL, VALUE_COL, distinct_text, first_failure
from retailsim_pipeline.prep.schema import CODE_SETS, SEGMENT_CODE_ALIASES, TRANSACTION_SCHEMA

SEGMENT_COLUMNS: tuple[str, ...] = tuple(SEGMENT_CODE_ALIASES)


def normalise_card_fields(df: pl.DataFrame, path: Path) -> tuple[pl.DataFrame, str | None]:
    """``""`` → null in the card fields; coded segment values → documented codes; type them.

    Returns the frame (card columns typed as :data:`TRANSACTION_SCHEMA`, an unknown segment code
    recorded as the row's reason unless it already has one) and the code family the file used.
    Raises :class:`LgsrFormatError` when a file mixes the coded and the documented family.
    """
    def text(c: str) -> pl.Expr:
        return pl.when(pl.col(c) != "").then(pl.col(c))

    seen = {c: set(v) for c, v in df.select(distinct_text(text(c)).implode().alias(c) for c in SEGMENT_COLUMNS)
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
        reason, column, value = first_failure(unknown)
        keep = pl.col(REASON_COL).is_not_null()  # a row rejected while parsing keeps that reason
        columns += [
            pl.coalesce(pl.col(REASON_COL), reason).alias(REASON_COL),
            pl.when(keep).then(pl.col(COLUMN_COL)).otherwise(column).alias(COLUMN_COL),
            pl.when(keep).then(pl.col(VALUE_COL)).otherwise(value).alias(VALUE_COL),
        ]
    return df.with_columns(columns), family
