"""Group ``ingest``: the weekly LGSR files, validated into typed parquet (one partition per file)."""

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import polars as pl
from tqdm import tqdm

from retailsim_pipeline.defs.metadata import column_schema, counts_table, markdown_table
from retailsim_pipeline.defs.resources import RetailSimData, writer_lock
from retailsim_pipeline.defs.settings import IngestSettings
from retailsim_pipeline.prep.ingest import LgsrFormatError
from retailsim_pipeline.prep.ingest_batch import ingest_weekly_files
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.schema import TRANSACTION_SCHEMA, RawFileError, raw_file_of_week

#: One dynamic partition per weekly file; the key is its shop week, e.g. ``200607``.
weekly_files = dg.DynamicPartitionsDefinition(name="weekly_files")

# 2: .csv.gz weeks, coded segment values, quoted empties, basket-consistency rule, lossy-copy refusal.
# 3: one run ingests a range of weeks, each week its own materialization.
INGEST_CODE_VERSION = "3"
QUARANTINE_CHECK = "quarantine_rate_below_threshold"
#: Dagster's own tags on a materialization: what its staleness (and the UI's badges) compare.
DATA_VERSION_TAG, CODE_VERSION_TAG = "dagster/data_version", "dagster/code_version"


@dataclass(frozen=True)
class FailedWeek:
    """A week whose latest ingest failed its blocking quarantine check (read back from its metadata)."""

    week: str
    source: str
    rows: int
    quarantined: int
    rate: float
    threshold: float
    top_reasons: list[tuple[str, int]]

    def message(self) -> str:
        if self.rows + self.quarantined == 0:
            return f"week {self.week} ({self.source}): the file holds no data line (header only?)"
        reasons = "; ".join(f"{reason}: {n:,}" for reason, n in self.top_reasons) or "no reason recorded"
        share = f"{self.rate:.2%} > {self.threshold:.2%}" if self.rows else "every row"
        return (f"week {self.week} ({self.source}): {self.quarantined:,} of {self.rows + self.quarantined:,} rows "
                f"quarantined ({share}); top reasons: {reasons}")


def failed_weeks(instance: dg.DagsterInstance, weeks: list[str] | None = None) -> list[FailedWeek]:
    """Weeks whose latest ``raw_transactions`` materialization failed the quarantine check.

    Read from the materialization's own metadata (``quarantine_check_passed``), so a week that failed
    once keeps blocking until it is ingested again (fixed file, or a higher threshold), whether or
    not this run ingests it. ``weeks`` defaults to every registered partition.
    """
    keys = weeks if weeks is not None else instance.get_dynamic_partitions(weekly_files.name)
    out = []
    for key in keys:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=raw_transactions.key, asset_partitions=[key]), limit=1
        ).records
        if not records:
            continue
        meta = records[0].asset_materialization.metadata
        if "quarantine_check_passed" not in meta or meta["quarantine_check_passed"].value:
            continue
        out.append(FailedWeek(
            week=key,
            source=meta["source"].value if "source" in meta else key,
            rows=int(meta["rows"].value),
            quarantined=int(meta["quarantined"].value),
            rate=float(meta["quarantine_rate"].value),
            threshold=float(meta["quarantine_threshold"].value),
            top_reasons=[tuple(r) for r in json.loads(meta["top_reasons"].value)],
        ))
    return out


def _week_metadata(result, source, sha: str, stat, config: IngestSettings, passed: bool, top) -> dict:
    preview = pl.read_parquet(result.output, n_rows=5)
    reasons = counts_table(result.reasons, "reason") if result.reasons else "none"
    return {
        "dagster/row_count": result.rows,
        "rows": result.rows,
        "baskets": result.baskets,
        "customers": result.customers,
        "quarantined": result.quarantined,
        "quarantine_rate": float(result.quarantine_rate),
        "quarantine_threshold": float(config.max_quarantine_rate),
        "quarantine_check_passed": passed,
        "top_reasons": json.dumps(top),
        "quarantine_reasons": dg.MetadataValue.md(reasons),
        "lines": result.lines,
        "segment_codes": result.segment_codes or "none",
        "preview": dg.MetadataValue.md(markdown_table(preview)),
        "path": dg.MetadataValue.path(str(result.output)),
        "quarantine_path": dg.MetadataValue.path(str(result.quarantine)),
        "source": dg.MetadataValue.path(str(source)),
        "source_sha256": sha,
        "source_size": stat.st_size,
        "source_mtime_ns": str(stat.st_mtime_ns),
    }


def _week_problem(source, result, config: IngestSettings, top) -> str:
    return (f"{source.name}: {result.quarantined:,} of {result.lines:,} rows quarantined "
            f"({result.quarantine_rate:.2%} > {config.max_quarantine_rate:.2%}"
            f"{'; no valid row' if result.rows == 0 else ''}); top reasons: "
            + ("; ".join(f"{r}: {n:,}" for r, n in top) or "none (the file holds no data line)")
            + f"; see {result.quarantine}")


# ``backfill_policy`` is beta in Dagster 1.13 (a warning at every import); it is what makes a UI backfill of
# many weeks one run.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)

    @dg.asset(
        partitions_def=weekly_files,
        # A backfill of many weeks is one run (its partition range), not one run per week.
        backfill_policy=dg.BackfillPolicy.single_run(),
        # Each week's materialization is reported with its own metadata (below), not by one output for the range.
        output_required=False,
        group_name="ingest",
        kinds={"polars", "parquet"},
        code_version=INGEST_CODE_VERSION,
        owners=["team:retailsim"],
        metadata={"dagster/column_schema": column_schema(TRANSACTION_SCHEMA)},
        check_specs=[
            dg.AssetCheckSpec(
                QUARANTINE_CHECK,
                asset="raw_transactions",
                blocking=True,
                description="Blocking: in every week of the run, the share of the file's rows quarantined stays "
                            "under IngestSettings.max_quarantine_rate, and the file holds at least one valid row.",
            )
        ],
    )
    def raw_transactions(
        context: dg.AssetExecutionContext, config: IngestSettings, retailsim_data: RetailSimData
    ) -> Iterator:
        """Weekly LGSR transaction files (`raw/transactions_YYYYWW.csv` or `.csv.gz`), each validated against
        the data contract and written as typed parquet (`transactions/transactions_YYYYWW.parquet`).

        One run ingests one week or a range of weeks (a backfill, `retailsim run`): each week is reported as its
        own materialization with its own metadata (rows, quarantine share and reasons, source hash) and its data
        version, the file's content hash (of the file as stored, compressed or not). The weeks of a range are
        validated together in batches (up to `batch_mb` of CSV), with per week the same outputs as alone.

        Rows that break the contract (unparsable number, missing field, quantity ≤ 0, unknown code,
        malformed id, impossible date, a BASKET_ID shared by different stores/dates/customers) go to
        `quarantine/transactions_YYYYWW.parquet` with file, line, column, reason and value. A file that is
        not in this format, or a lossy copy (ids rounded by a spreadsheet), writes nothing for its week and
        fails the run with an error that names the file; the other weeks of the run are still ingested. The
        blocking check fails when, in any week, more than `max_quarantine_rate` of the rows were quarantined
        (or none is valid), naming those weeks: nothing downstream runs.
        """
        paths = retailsim_data.paths()
        weeks = context.partition_keys
        problems: list[str] = []
        errors: list[tuple[str, Exception]] = []
        checked, worst, quarantined = 0, 0.0, 0
        with writer_lock(context, retailsim_data):  # one writer per data folder
            found = []  # (week, file, its stat and hash as stored, taken before it is read)
            for key in weeks:
                try:
                    source = raw_file_of_week(paths.raw, int(key))
                    found.append((key, source, source.stat(), file_sha256(source)))
                except (LgsrFormatError, RawFileError, OSError) as exc:
                    context.log.error(f"week {key}: {exc}")
                    errors.append((key, exc))
            # The weeks are validated in batches (IngestSettings.batch_mb), each written as its own partition.
            outcomes = ingest_weekly_files([source for _, source, _, _ in found], paths.transactions,
                                           paths.quarantine, limits=config)
            progress = tqdm(zip(found, outcomes), total=len(found), desc="raw_transactions", unit="week",
                            disable=not config.progress or len(found) < 2)
            for (key, source, stat, sha), outcome in progress:
                if outcome.error is not None:  # LossyCopyError is an LgsrFormatError
                    context.log.error(f"week {key}: {outcome.error}")
                    errors.append((key, outcome.error))
                    continue
                result = outcome.result
                passed = result.quarantine_rate <= config.max_quarantine_rate and result.rows > 0
                top = list(result.reasons.items())[:3]
                checked, quarantined = checked + 1, quarantined + result.quarantined
                worst = max(worst, float(result.quarantine_rate) if result.rows else 1.0)
                if not passed:
                    problems.append(_week_problem(source, result, config, top))
                context.log.info(f"{source.name}: {result.rows:,} rows accepted, {result.quarantined:,} quarantined")
                yield dg.AssetMaterialization(
                    asset_key=context.asset_key, partition=key,
                    metadata=_week_metadata(result, source, sha, stat, config, passed, top),
                    tags={DATA_VERSION_TAG: sha[:16], CODE_VERSION_TAG: INGEST_CODE_VERSION},
                )
        yield dg.AssetCheckResult(
            check_name=QUARANTINE_CHECK,
            passed=not problems,
            severity=dg.AssetCheckSeverity.ERROR,
            # quarantine_rate: the worst week's share (1.0 for a week without a valid row).
            metadata={"quarantine_rate": worst, "threshold": float(config.max_quarantine_rate),
                      "quarantined": quarantined, "weeks_checked": checked, "weeks_failed": len(problems)},
            description="; ".join(problems) or None,
        )
        errors.sort(key=lambda error: weeks.index(error[0]))  # in week order, however each was found
        if len(errors) == 1:
            raise errors[0][1]
        if errors:
            raise dg.Failure(description=f"{len(errors)} week(s) could not be ingested: "
                             + " | ".join(f"week {k}: {e}" for k, e in errors))
