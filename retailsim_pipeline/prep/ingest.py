"""Validate one weekly LGSR file and write it as typed parquet, quarantining rows that break the contract.

Contract (see :mod:`retailsim_pipeline.prep.schema`), one module per part:

- reading the file (gzip, header, strict and tolerant reads): :mod:`retailsim_pipeline.prep.reading`;
- the loyalty-card fields and the two segment code families: :mod:`retailsim_pipeline.prep.card_fields`;
- a lossy copy (ids rounded by a spreadsheet): :mod:`retailsim_pipeline.prep.lossy`;
- the row rules (missing fields, values, ids, calendar, ceilings): :mod:`retailsim_pipeline.prep.rules`;
- basket consistency (one BASKET_ID, one store, date and customer):
  :mod:`retailsim_pipeline.prep.basket_consistency`.

This module checks the file itself and runs those parts in order:

- The file itself must be a regular file (a symbolic link is refused, named, before it is opened)
  whose name is a plausible shop week (WW 1..52, from 200607 on, not in the future); a file whose
  rows mostly hold another week than its name is refused as a whole.
- A file that is not this format fails with :class:`LgsrFormatError` (:class:`LossyCopyError` for a
  lossy copy), and nothing is written.
- A row that breaks the contract goes to the quarantine file with its source file, 1-based line
  number (the header is line 1), the first failing column, the reason and the offending value.
- The accepted rows keep their file order (= line order within each basket).
- Row accounting: every data line is either accepted or quarantined (asserted; an anonymous
  shopper's null CUST_CODE can never turn a row mask null and drop the row from both outputs).

Speed: the common case (a clean, well-formed file) is one strict typed ``read_csv`` plus about 15
small polars queries: checks run on *distinct* values where they can (ids, codes, calendar triples),
and the reason for a failing row is worked out for failing rows only.

Outputs are written to a temporary name and renamed, so a failure never leaves a half-written file.

Many files at once (a range of weeks): :func:`retailsim_pipeline.prep.ingest_batch.ingest_weekly_files`
validates them in batches and gives, per file, what :func:`ingest_weekly_file` gives.
"""

import functools
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from retailsim_pipeline.config import IngestConfig
from retailsim_pipeline.prep.basket_consistency import BASKET_KEYS, basket_conflicts, basket_spread
from retailsim_pipeline.prep.card_fields import normalise_card_fields
from retailsim_pipeline.prep.errors import LgsrFormatError, LossyCopyError
from retailsim_pipeline.prep.files import write_bytes_atomic, write_parquet_atomic
from retailsim_pipeline.prep.lossy import check_lossy_ids
from retailsim_pipeline.prep.reading import LINE_COL, read_header, tolerant_read, typed_read
from retailsim_pipeline.prep.rules import (
    COLUMN_COL,
    REASON_COL,
    VALUE_COL,
    date_rules,
    first_failure,
    id_rules,
    row_rules,
    suspects,
)
from retailsim_pipeline.prep.schema import (
    FIRST_WEEK,
    LGSR_COLUMNS,
    file_stem,
    unsafe_file_message,
    week_is_plausible,
    week_of_file,
)

__all__ = [
    "QUARANTINE_SCHEMA",
    "IngestResult",
    "LgsrFormatError",
    "LossyCopyError",
    "ingest_weekly_file",
    "transactions_output_path",
    "validate_transactions",
]

log = logging.getLogger(__name__)

#: Schema of a quarantine file.
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source_file": pl.String(),
    "line_number": pl.Int64(),
    "column": pl.String(),
    "reason": pl.String(),
    "value": pl.String(),
    "raw_line": pl.String(),
}


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
MISNAMED_SHARE = 0.5


def check_file(path: Path) -> None:
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
    if len(other) > MISNAMED_SHARE * len(df):
        common = other.get_column("SHOP_WEEK").mode().sort().to_list()
        raise LgsrFormatError(
            f"{path}: the file name says week {week} but {len(other):,} of {len(df):,} rows say another week "
            f"(mostly {common[0]}, e.g. line {other.get_column(LINE_COL)[0]}); rename the file after its week"
        )


def _validate(path: Path, limits: IngestConfig) -> tuple[pl.DataFrame, pl.DataFrame, str | None]:
    check_file(path)
    header = read_header(path)
    week = week_of_file(path.name)
    try:
        df, short = typed_read(path, header)
        if short:
            log.info("%s: a line may be short; counting fields", path.name)
    except pl.exceptions.PolarsError as exc:
        log.info("%s: strict read failed (%s); locating bad rows", path.name, str(exc).splitlines()[0])
        short = True
    if short:
        df = tolerant_read(path, header)
    raw_available = short
    df, family = normalise_card_fields(df, path)
    check_lossy_ids(df, path)
    _check_week_matches_name(df, path, week)
    n_lines = len(df)

    accepted, bad = sort_rows(df, week, limits)
    if len(accepted) + len(bad) != n_lines:  # row accounting: every line lands or is quarantined
        raise AssertionError(f"{path}: {n_lines} lines read but {len(accepted)} accepted + {len(bad)} rejected")
    return accepted.select(LGSR_COLUMNS), quarantine_rows(bad, path.name, raw_available), family


def sort_rows(df: pl.DataFrame, week: int | pl.Expr | None, limits: IngestConfig,
              by: tuple[str, ...] = (), spread: pl.DataFrame | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split the working frame into accepted rows (in file order) and rejected rows, each rejected row
    with its first failing rule in the reason columns (ordered by ``by`` and line).

    ``by`` names the columns that tell files apart when rows of several files are checked together
    (baskets are then grouped per file too); ``week`` is then an expression (see :func:`row_rules`).
    ``spread``: :func:`basket_spread` of every row of ``df`` (by ``by``), when the caller has it.
    Both frames keep the working frame's columns.
    """
    rules = row_rules(week, limits)
    # The cheap mask runs on every row; *which* rule failed is worked out for failing rows only.
    bad_mask = (
        pl.any_horizontal([cond.fill_null(False) for cond, *_ in rules])
        | suspects(df)
        | pl.col(REASON_COL).is_not_null()
    )
    # One query for the common case (no row breaks a rule): is any row bad? and each basket's spread,
    # which is then the accepted rows' spread; the frame is kept as it is, not copied by a filter.
    if spread is None:
        any_bad, spread = pl.collect_all([df.lazy().select(bad_mask.any()), basket_spread(df.lazy(), by)])
    else:
        any_bad = df.select(bad_mask.any())
    if any_bad.item():
        marked = df.lazy().with_columns(bad_mask.alias("__bad"))
        good = marked.filter(~pl.col("__bad")).drop("__bad")
        accepted, bad, spread = pl.collect_all([good, marked.filter(pl.col("__bad")).drop("__bad"),
                                                basket_spread(good, by)])
    else:
        accepted, bad = df, df.clear()
    conflicts = basket_conflicts(spread, by)
    if not conflicts.is_empty():
        split = accepted.join(conflicts, on=[*by, "BASKET_ID"], how="left", maintain_order="left")
        accepted = split.filter(pl.col("__conflict").is_null()).drop("__conflict", "__conflict_col")
        moved = split.filter(pl.col("__conflict").is_not_null()).with_columns(
            pl.col("__conflict").alias(REASON_COL), pl.col("__conflict_col").alias(COLUMN_COL),
            pl.coalesce(pl.when(pl.col("__conflict_col") == c).then(pl.col(c).cast(pl.String))
                        for c in BASKET_KEYS).alias(VALUE_COL),
        ).drop("__conflict", "__conflict_col")
        bad = pl.concat([bad, moved.select(bad.columns)]).sort(*by, LINE_COL)
    if bad.is_empty():
        return accepted, bad
    all_rules = rules + date_rules() + id_rules()
    bad = bad.with_columns(
        # A row already rejected while parsing keeps that reason.
        *[pl.when(pl.col(REASON_COL).is_null()).then(new).otherwise(pl.col(name)).alias(name)
          for new, name in zip(first_failure(all_rules), (REASON_COL, COLUMN_COL, VALUE_COL))]
    )
    return accepted, bad


def quarantine_rows(bad: pl.DataFrame, source_name: str, raw_available: bool) -> pl.DataFrame:
    """The quarantine file's rows (:data:`QUARANTINE_SCHEMA`) for one file's rejected rows.

    ``raw_available``: the tolerant read kept each line's text; otherwise the raw line is rebuilt
    from the typed fields.
    """
    if bad.is_empty():
        return pl.DataFrame(schema=QUARANTINE_SCHEMA)
    raw_line = (
        pl.col("__raw") if raw_available
        else pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in LGSR_COLUMNS], separator=",")
    )
    return bad.select(
        pl.lit(source_name).alias("source_file"),
        pl.col(LINE_COL).alias("line_number"),
        pl.col(COLUMN_COL).alias("column"),
        pl.col(REASON_COL).alias("reason"),
        pl.col(VALUE_COL).alias("value"),
        raw_line.alias("raw_line"),
    )


@functools.cache
def _empty_quarantine_parquet() -> bytes:
    """An empty quarantine file, as :func:`write_parquet_atomic` writes it."""
    buffer = io.BytesIO()
    pl.DataFrame(schema=QUARANTINE_SCHEMA).write_parquet(buffer, compression="lz4", statistics=False)
    return buffer.getvalue()


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
    return write_outputs(source, accepted, quarantined, family, out_dir, quarantine_dir)


def accepted_counts() -> list[pl.Expr]:
    """The accepted rows' distinct baskets and customers (an :class:`IngestResult`'s counts)."""
    return [pl.col("BASKET_ID").n_unique().alias("baskets"),
            pl.col("CUST_CODE").drop_nulls().n_unique().alias("customers")]


def write_outputs(source: Path, accepted: pl.DataFrame, quarantined: pl.DataFrame, family: str | None,
                  out_dir: Path, quarantine_dir: Path, counts: dict[str, int] | None = None) -> IngestResult:
    """Write one file's accepted rows and quarantine, each atomically (quarantine first), and count them
    (``counts``: :func:`accepted_counts` of ``accepted``, when the caller has them)."""
    output = transactions_output_path(out_dir, source)
    quarantine = transactions_output_path(quarantine_dir, source)
    # Weekly files are always read whole: no column statistics to write.
    if quarantined.is_empty():  # the common case: the same bytes every time, made once
        write_bytes_atomic(_empty_quarantine_parquet(), quarantine)
    else:
        write_parquet_atomic(quarantined, quarantine, statistics=False)
    write_parquet_atomic(accepted, output, statistics=False)
    if counts is None:
        counts = accepted.select(accepted_counts()).row(0, named=True)
    reasons = {} if quarantined.is_empty() else dict(
        quarantined.group_by("reason").len().sort("len", descending=True).iter_rows())
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
