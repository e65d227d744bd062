"""Ingest many weekly LGSR files at once: per file, exactly what :func:`ingest_weekly_file` writes.

Why: a published week holds ~27k lines, and validating one file alone costs about 15 small polars
queries, each with its fixed cost, and as many passes over the week's distinct ids. Here a batch of
files is read as one query (their strict scans collected together, then joined with each row tagged
with its file: :func:`~retailsim_pipeline.prep.reading.working_frame`) and validated at once: the
queries run once per batch (~16 published weeks), the distinct ids are checked once for all of them.
Each file's rows are then written to its own outputs, atomically, as the per-file path does. (Reading
and writing cost the same either way: they are per row.)

What is a file's own, and how the batch keeps it so:

- its line numbers: each file's rows are numbered from its own first line (the header is line 1);
- its week (the rule "SHOP_WEEK differs from the file's week"): a column of the batch (:data:`WEEK_COL`);
- its segment code family: decided per file from its distinct values (:func:`segment_family`);
- its baskets: consistency is checked per (file, BASKET_ID);
- its outputs: the concatenation keeps file order and the checks keep row order, so each file's
  accepted and quarantined rows are a contiguous slice of the batch's.

Every other check (value rules, ids and calendar per distinct value) looks at one row at a time, so
it gives each row the same verdict in a batch as in its file alone.

A file that is refused as a whole or needs the slow path leaves the batch and goes through
:func:`ingest_weekly_file`, so its error or its tolerant result is the per-file one, and it never
holds up the others: a link or non-file, an impossible week name, a missing or unreadable header
(all found before the batch is read), a file the strict read cannot parse or whose last column has
empty fields (maybe a short line), one that mixes segment code families, may be a lossy copy, holds
mostly another week, or holds no data line. A file larger than the batch limit is ingested alone.

Memory: a batch holds at most ``IngestConfig.batch_mb`` of CSV (a gzip file counts uncompressed).
"""

import logging
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from retailsim_pipeline.config import IngestConfig
from retailsim_pipeline.prep.basket_consistency import basket_spread
from retailsim_pipeline.prep.card_fields import (
    MIXED,
    SEGMENT_COLUMNS,
    card_field_columns,
    has_unknown_codes,
    segment_family,
)
from retailsim_pipeline.prep.errors import LgsrFormatError
from retailsim_pipeline.prep.ingest import (
    MISNAMED_SHARE,
    IngestResult,
    accepted_counts,
    check_file,
    ingest_weekly_file,
    quarantine_rows,
    sort_rows,
    write_outputs,
)
from retailsim_pipeline.prep.lossy import ids_look_rounded, scientific_columns, scientific_rows
from retailsim_pipeline.prep.reading import is_gzip, read_header, typed_scan, typed_scan_schema, working_frame
from retailsim_pipeline.prep.schema import LGSR_COLUMNS, week_of_file

__all__ = ["IngestOutcome", "ingest_weekly_files", "plan_batches"]

log = logging.getLogger(__name__)

#: Batch columns: the row's file (its index in the batch) and that file's week (null: none in its name).
FILE_COL = "__file"
WEEK_COL = "__file_week"


@dataclass(frozen=True)
class IngestOutcome:
    """One file of :func:`ingest_weekly_files`: its result, or the error that refused it as a whole."""

    source: Path
    result: IngestResult | None = None
    #: :class:`LgsrFormatError` (incl. ``LossyCopyError``) or ``OSError``, as :func:`ingest_weekly_file` raises it.
    error: Exception | None = None


def ingest_weekly_files(
    sources: Iterable[Path], out_dir: Path, quarantine_dir: Path, limits: IngestConfig | None = None
) -> Iterator[IngestOutcome]:
    """:func:`ingest_weekly_file` on each of ``sources``, validating them in batches: yields one
    :class:`IngestOutcome` per source, in order, as soon as its outputs are written.

    The outputs of each file (typed parquet, quarantine) and its result are those of
    :func:`ingest_weekly_file`; a file refused as a whole (:class:`LgsrFormatError`, ``OSError``)
    yields its error, writes nothing, and leaves the others unaffected. Any other exception is a
    bug and propagates.
    """
    limits = limits or IngestConfig()
    for batch in plan_batches([Path(s) for s in sources], int(limits.batch_mb * 2**20)):
        if isinstance(batch, Path):
            yield _alone(batch, out_dir, quarantine_dir, limits)
        else:
            yield from _ingest_batch(*batch, out_dir, quarantine_dir, limits)


def csv_bytes(path: Path) -> int:
    """The size of ``path``'s CSV text: a gzip file's uncompressed size from its trailer (modulo 4 GiB,
    so never taken below the compressed size)."""
    size = path.stat().st_size
    if size >= 4 and is_gzip(path):
        with open(path, "rb") as fh:
            fh.seek(-4, 2)
            return max(size, struct.unpack("<I", fh.read(4))[0])
    return size


def plan_batches(sources: list[Path], max_bytes: int) -> list[Path | tuple[list[Path], list[str]]]:
    """Consecutive runs of files with the same header and at most ``max_bytes`` of CSV together, as
    ``(files, header)``; a file to ingest alone (refused before reading, or larger than a batch) as its path.

    Keeps the order of ``sources``, so outputs are written in that order whichever way a file goes.
    """
    plan: list[Path | tuple[list[Path], list[str]]] = []
    run: list[Path] = []
    run_header: list[str] | None = None
    run_bytes = 0

    def close_run() -> None:
        nonlocal run, run_header, run_bytes
        if len(run) == 1:
            plan.append(run[0])  # one file: the per-file path, no batch to pay for
        elif run:
            plan.append((run, run_header))
        run, run_header, run_bytes = [], None, 0

    for path in sources:
        try:
            check_file(path)
            header = read_header(path)
            size = csv_bytes(path)
        except (LgsrFormatError, OSError):
            close_run()
            plan.append(path)  # the per-file path raises the same error
            continue
        if header != run_header or run_bytes + size > max_bytes:
            close_run()
        if size > max_bytes:
            plan.append(path)
            continue
        run.append(path)
        run_header, run_bytes = header, run_bytes + size
    close_run()
    return plan


def _alone(source: Path, out_dir: Path, quarantine_dir: Path, limits: IngestConfig) -> IngestOutcome:
    try:
        return IngestOutcome(source, result=ingest_weekly_file(source, out_dir, quarantine_dir, limits))
    except (LgsrFormatError, OSError) as exc:  # LossyCopyError is an LgsrFormatError
        return IngestOutcome(source, error=exc)


def _read(sources: list[Path], header: list[str]) -> tuple[pl.DataFrame, set[int]]:
    """The batch frame, and the files whose strict read failed (read one by one to find them).

    The files are read in one ``collect_all`` and joined by :func:`working_frame` (each row tagged
    with its file's index and week); tagging each scan before the concatenation costs ~25 % more.
    """
    scans = [typed_scan(path, header) for path in sources]
    try:
        frames, failed = pl.collect_all(scans), set()
    except (pl.exceptions.PolarsError, OSError):
        frames, failed = [], set()
        for i, scan in enumerate(scans):
            try:
                frames.append(scan.collect())
            except (pl.exceptions.PolarsError, OSError):
                failed.add(i)
                frames.append(pl.DataFrame(schema=typed_scan_schema(header)))
    return working_frame(frames, {
        FILE_COL: pl.Series(range(len(sources)), dtype=pl.UInt32),
        WEEK_COL: pl.Series([week_of_file(path.name) for path in sources], dtype=pl.Int32),
    }), failed


def _file_stats(df: pl.DataFrame, last_column: str) -> dict[int, dict]:
    """Per file of the batch (files without a data line are absent): rows, the counts the whole-file
    checks need, and the distinct non-empty values of each segment column."""
    return {row[FILE_COL]: row for row in df.group_by(FILE_COL).agg(
        pl.len().alias("rows"),
        pl.col(last_column).null_count().alias("empty_last"),
        (pl.col("SHOP_WEEK") != pl.col(WEEK_COL)).sum().alias("other_week"),
        *[pl.col(c).filter(pl.col(c) != "").unique().alias(c) for c in SEGMENT_COLUMNS],
    ).iter_rows(named=True)}


def _id_stats(spread: pl.DataFrame) -> dict[int, tuple[int, int]]:
    """Per file: its distinct non-null BASKET_IDs, and how many of them end in six or more zeros
    (from the baskets' spread: one row per file and BASKET_ID)."""
    return {file: (distinct, round_) for file, distinct, round_ in spread.group_by(FILE_COL).agg(
        pl.col("BASKET_ID").is_not_null().sum().alias("distinct"),
        (pl.col("BASKET_ID") % 1_000_000 == 0).sum().alias("round"),
    ).iter_rows()}


def _leaves_batch(stats: dict | None, ids: tuple[int, int]) -> str | None:
    """Why a file must take the per-file path (None: it stays), from its :func:`_file_stats` and
    :func:`_id_stats`."""
    if stats is None:
        return "no data line"
    if stats["empty_last"]:
        return "its last column has empty fields (maybe a short line)"
    if segment_family({c: set(stats[c]) for c in SEGMENT_COLUMNS}) == MIXED:
        return "it mixes segment code families"
    if ids_look_rounded(stats["rows"], *ids):
        return "its BASKET_IDs look rounded"
    if stats["other_week"] > MISNAMED_SHARE * stats["rows"]:
        return "most rows hold another week"
    return None


def _ingest_batch(sources: list[Path], header: list[str], out_dir: Path, quarantine_dir: Path,
                  limits: IngestConfig) -> Iterator[IngestOutcome]:
    df, unreadable = _read(sources, header)
    stats = _file_stats(df, header[-1])
    seen = {i: {c: set(s[c]) for c in SEGMENT_COLUMNS} for i, s in stats.items()}
    # Typing the card fields is exact for every file that does not mix the code families (the others leave).
    df = df.with_columns(card_field_columns(any(has_unknown_codes(v) for v in seen.values())))
    spread = basket_spread(df.lazy(), (FILE_COL,)).collect()
    ids = _id_stats(spread)
    alone = {i: "the strict read failed" for i in unreadable}
    for i in range(len(sources)):
        if i not in alone and (why := _leaves_batch(stats.get(i), ids.get(i, (0, 0)))):
            alone[i] = why
    if sci := scientific_columns(df):
        hit = df.filter(pl.any_horizontal(scientific_rows(c, df.columns) for c in sci))
        alone.update((i, "an id in scientific notation") for i in hit.get_column(FILE_COL).unique().to_list())
    for i, why in sorted(alone.items()):
        log.info("%s: ingested on its own (%s)", sources[i].name, why)
    if len(alone) == len(sources):
        for source in sources:
            yield _alone(source, out_dir, quarantine_dir, limits)
        return
    if alone:
        df = df.filter(~pl.col(FILE_COL).is_in(sorted(alone)))
        spread = spread.filter(~pl.col(FILE_COL).is_in(sorted(alone)))
    families = {i: segment_family(v) for i, v in seen.items() if i not in alone}

    accepted, bad = sort_rows(df, pl.col(WEEK_COL), limits, by=(FILE_COL,), spread=spread)
    # Each file's rows are one contiguous slice, files in batch order (slices are zero-copy).
    if not (accepted.get_column(FILE_COL).is_sorted() and bad.get_column(FILE_COL).is_sorted()):
        raise AssertionError(f"batch of {sources[0]} …: rows left file order")
    counts = {row.pop(FILE_COL): row for row in
              accepted.group_by(FILE_COL).agg(pl.len(), *accepted_counts()).iter_rows(named=True)}
    n_bad = dict(bad.group_by(FILE_COL).len().iter_rows())
    at_accepted = at_bad = 0
    for i, source in enumerate(sources):
        if i in alone:
            yield _alone(source, out_dir, quarantine_dir, limits)
            continue
        file_counts = counts.get(i, {"len": 0, "baskets": 0, "customers": 0})
        a, b = file_counts.pop("len"), n_bad.get(i, 0)
        if a + b != stats[i]["rows"]:  # row accounting: every line lands or is quarantined
            raise AssertionError(f"{source}: {stats[i]['rows']} lines read but {a} accepted + {b} rejected")
        rows, rejected = accepted.slice(at_accepted, a), bad.slice(at_bad, b)
        at_accepted, at_bad = at_accepted + a, at_bad + b
        try:
            outcome = IngestOutcome(source, result=write_outputs(
                source, rows.select(LGSR_COLUMNS), quarantine_rows(rejected, source.name, raw_available=False),
                families[i], out_dir, quarantine_dir, counts=file_counts,
            ))
        except OSError as exc:  # this file's outputs could not be written; the others still are
            outcome = IngestOutcome(source, error=exc)
        yield outcome
