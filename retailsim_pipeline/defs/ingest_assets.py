"""Group ``ingest``: the weekly LGSR files, validated into typed parquet (one partition per file)."""

import json
from dataclasses import dataclass

import dagster as dg
import polars as pl

from retailsim_pipeline.defs.metadata import column_schema, counts_table, markdown_table
from retailsim_pipeline.defs.resources import RetailSimData, writer_lock
from retailsim_pipeline.defs.settings import IngestSettings
from retailsim_pipeline.prep.ingest import ingest_weekly_file
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.schema import TRANSACTION_SCHEMA, raw_file_of_week

#: One dynamic partition per weekly file; the key is its shop week, e.g. ``200607``.
weekly_files = dg.DynamicPartitionsDefinition(name="weekly_files")

# 2: .csv.gz weeks, coded segment values, quoted empties, basket-consistency rule, lossy-copy refusal.
INGEST_CODE_VERSION = "2"
QUARANTINE_CHECK = "quarantine_rate_below_threshold"


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


@dg.asset(
    partitions_def=weekly_files,
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
            description="Blocking: the share of the file's rows quarantined stays under "
                        "IngestSettings.max_quarantine_rate, and the file holds at least one valid row.",
        )
    ],
)
def raw_transactions(
    context: dg.AssetExecutionContext, config: IngestSettings, retailsim_data: RetailSimData
) -> dg.MaterializeResult:
    """One weekly LGSR transaction file (`raw/transactions_YYYYWW.csv` or `.csv.gz`), validated against
    the data contract and written as typed parquet (`transactions/transactions_YYYYWW.parquet`).

    Rows that break the contract (unparsable number, missing field, quantity ≤ 0, unknown code,
    malformed id, impossible date, a BASKET_ID shared by different stores/dates/customers) go to
    `quarantine/transactions_YYYYWW.parquet` with file, line, column, reason and value. A file that is
    not in this format, or a lossy copy (ids rounded by a spreadsheet), fails the run with an error
    that names the file, and writes nothing. The blocking check fails when more than
    `max_quarantine_rate` of the rows were quarantined (or none is valid): nothing downstream runs.
    The data version is the file's content hash (of the file as stored, compressed or not).
    """
    paths = retailsim_data.paths()
    week = int(context.partition_key)
    source = raw_file_of_week(paths.raw, week)
    stat = source.stat()
    sha = file_sha256(source)
    with writer_lock(context, retailsim_data):  # one writer per data folder
        result = ingest_weekly_file(source, paths.transactions, paths.quarantine, limits=config)
    preview = pl.read_parquet(result.output, n_rows=5)
    reasons = counts_table(result.reasons, "reason") if result.reasons else "none"
    passed = result.quarantine_rate <= config.max_quarantine_rate and result.rows > 0
    top = list(result.reasons.items())[:3]
    context.log.info(f"{source.name}: {result.rows:,} rows accepted, {result.quarantined:,} quarantined")
    return dg.MaterializeResult(
        metadata={
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
        },
        data_version=dg.DataVersion(sha[:16]),
        check_results=[
            dg.AssetCheckResult(
                check_name=QUARANTINE_CHECK,
                passed=passed,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "quarantine_rate": float(result.quarantine_rate),
                    "threshold": config.max_quarantine_rate,
                    "quarantined": result.quarantined,
                },
                description=None if passed else (
                    f"{source.name}: {result.quarantined:,} of {result.lines:,} rows quarantined "
                    f"({result.quarantine_rate:.2%} > {config.max_quarantine_rate:.2%}"
                    f"{'; no valid row' if result.rows == 0 else ''}); top reasons: "
                    + ("; ".join(f"{r}: {n:,}" for r, n in top) or "none (the file holds no data line)")
                    + f"; see {result.quarantine}"
                ),
            )
        ],
    )
