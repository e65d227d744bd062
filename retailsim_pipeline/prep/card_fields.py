"""Type the loyalty-card fields of a weekly LGSR file: empty fields, and the two segment code families.

- ``""`` (a quoted empty string) is an empty field. A carded customer may lack a segment.
- The two customer segment columns hold either the documented codes or the coded family of the
  published copy (:data:`~retailsim_pipeline.prep.schema.SEGMENT_CODE_ALIASES`), one family per
  file; the typed output always holds the documented codes. A file that mixes both families fails
  as a whole (:class:`LgsrFormatError` naming lines of each).
- A segment value in neither family is the row's reason (``unknown code in …``), unless the row
  already failed while being parsed.

The family is decided per file from the file's distinct segment values (:func:`segment_family`);
:func:`card_field_columns` types the columns of one file or of many files read together
(:mod:`retailsim_pipeline.prep.ingest_batch`): one mapping serves both families (:data:`SEGMENT_CODES`).
"""

from pathlib import Path

import polars as pl

from retailsim_pipeline.prep.errors import LgsrFormatError
from retailsim_pipeline.prep.reading import LINE_COL
from retailsim_pipeline.prep.rules import COLUMN_COL, REASON_COL, VALUE_COL, distinct_text, first_failure
from retailsim_pipeline.prep.schema import CODE_SETS, SEGMENT_CODE_ALIASES, TRANSACTION_SCHEMA

SEGMENT_COLUMNS: tuple[str, ...] = tuple(SEGMENT_CODE_ALIASES)
#: :func:`segment_family` of a file that uses both families (refused as a whole).
MIXED = "mixed"


def card_text(c: str) -> pl.Expr:
    """A card field's text, ``""`` read as null."""
    return pl.when(pl.col(c) != "").then(pl.col(c))


def _families(seen: dict[str, set[str]]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The coded and the documented values among a file's distinct segment values, per column."""
    coded = {c: seen[c] & set(SEGMENT_CODE_ALIASES[c]) for c in SEGMENT_COLUMNS}
    # XX ("unknown") is written the same in both families, so it tells neither apart.
    documented = {c: seen[c] & (set(CODE_SETS[c]) - {"XX"}) for c in SEGMENT_COLUMNS}
    return coded, documented


def segment_family(seen: dict[str, set[str]]) -> str | None:
    """``"coded"``, ``"documented"``, None (no value tells them apart) or :data:`MIXED`, from a file's
    distinct non-empty values of each segment column."""
    coded, documented = _families(seen)
    if any(coded.values()) and any(documented.values()):
        return MIXED
    return "coded" if any(coded.values()) else "documented" if any(documented.values()) else None


#: Each segment column's text → its documented code, for both families. The coded values and the
#: documented codes are disjoint (XX apart, which maps to itself), so once a file is known not to mix
#: the families a value maps the same whichever family the file uses: one mapping serves every file.
SEGMENT_CODES: dict[str, dict[str, str]] = {
    c: {**{v: v for v in CODE_SETS[c]}, **SEGMENT_CODE_ALIASES[c]} for c in SEGMENT_COLUMNS
}
assert all(not set(SEGMENT_CODE_ALIASES[c]) & set(CODE_SETS[c]) for c in SEGMENT_COLUMNS)


def has_unknown_codes(seen: dict[str, set[str]]) -> bool:
    """Whether a file's distinct segment values include one in neither family."""
    return any(seen[c] - set(SEGMENT_CODES[c]) for c in SEGMENT_COLUMNS)


def card_field_columns(unknown: bool) -> list[pl.Expr]:
    """The typed card columns (and, when ``unknown``, the reason columns for unknown segment codes) of
    rows of files that do not mix the code families, one file or many. The card fields come in as
    text or as ``Categorical`` (:func:`~retailsim_pipeline.prep.reading.typed_scan`).

    ``unknown``: whether any row may hold an unknown code (without it the common, clean case needs
    no reason column).
    """
    typed = {c: pl.col(c).replace_strict(SEGMENT_CODES[c], default=None, return_dtype=TRANSACTION_SCHEMA[c])
             for c in SEGMENT_COLUMNS}  # "" and unknown values → null
    columns = [card_text("CUST_CODE").cast(TRANSACTION_SCHEMA["CUST_CODE"]).alias("CUST_CODE"),
               *[typed[c].alias(c) for c in SEGMENT_COLUMNS]]
    if unknown:
        rules = [(card_text(c).is_not_null() & typed[c].is_null(), f"unknown code in {c}", c, pl.col(c).cast(pl.String))
                 for c in SEGMENT_COLUMNS]
        reason, column, value = first_failure(rules)
        keep = pl.col(REASON_COL).is_not_null()  # a row rejected while parsing keeps that reason
        columns += [
            pl.coalesce(pl.col(REASON_COL), reason).alias(REASON_COL),
            pl.when(keep).then(pl.col(COLUMN_COL)).otherwise(column).alias(COLUMN_COL),
            pl.when(keep).then(pl.col(VALUE_COL)).otherwise(value).alias(VALUE_COL),
        ]
    return columns


def normalise_card_fields(df: pl.DataFrame, path: Path) -> tuple[pl.DataFrame, str | None]:
    """``""`` → null in the card fields; coded segment values → documented codes; type them.

    Returns the frame (card columns typed as :data:`TRANSACTION_SCHEMA`, an unknown segment code
    recorded as the row's reason unless it already has one) and the code family the file used.
    Raises :class:`LgsrFormatError` when a file mixes the coded and the documented family.
    """
    seen = {c: set(v) for c, v in df.select(distinct_text(card_text(c)).implode().alias(c) for c in SEGMENT_COLUMNS)
            .row(0, named=True).items()}
    family = segment_family(seen)
    if family == MIXED:
        coded, documented = _families(seen)

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
    # Unknown codes, worked out on the distinct values: the common (clean) file needs no reason column.
    return df.with_columns(card_field_columns(has_unknown_codes(seen))), family
