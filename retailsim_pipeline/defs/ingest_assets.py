"""Group ``ingest``: the weekly LGSR files, validated into typed parquet (one partition per file)."""

import dagster as dg
import polars as pl

from retailsim_pipeline.defs.metadata import column_schema, counts_table, markdown_table
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.defs.settings import IngestSettings
from retailsim_pipeline.prep.ingest import ingest_weekly_file
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.schema import TRANSACTION_SCHEMA, weekly_file_name

#: One dynamic partition per weekly file; the key is its shop week, e.g. ``200607``.
weekly_files = dg.DynamicPartitionsDefinition(name="weekly_files")

INGEST_CODE_VERSION = "1"
QUARANTINE_CHECK = "quarantine_rate_below_threshold"


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
            description="Share of the file's rows quarantined stays under IngestSettings.max_quarantine_rate.",
        )
    ],
)
def raw_transactions(
    context: dg.AssetExecutionContext, config: IngestSettings, retailsim_data: RetailSimData
) -> dg.MaterializeResult:
    """One weekly LGSR transaction file (`raw/transactions_YYYYWW.csv`), validated against the data
    contract and written as typed parquet (`transactions/transactions_YYYYWW.parquet`).

    Rows that break the contract (unparsable number, missing field, quantity ≤ 0, unknown code,
    malformed id, impossible date) go to `quarantine/transactions_YYYYWW.parquet` with file, line,
    column, reason and value. A file that is not in this format fails the run with an error that
    names the file and its missing columns. The data version is the file's content hash.
    """
    paths = retailsim_data.paths()
    week = int(context.partition_key)
    source = paths.raw / weekly_file_name(week)
    if not source.exists():
        raise FileNotFoundError(f"{source}: the weekly file of partition {week} is gone; re-add it or "
                                "delete the partition")
    stat = source.stat()
    sha = file_sha256(source)
    result = ingest_weekly_file(source, paths.transactions, paths.quarantine)
    preview = pl.read_parquet(result.output, n_rows=5)
    reasons = counts_table(result.reasons, "reason") if result.reasons else "none"
    passed = result.quarantine_rate <= config.max_quarantine_rate
    context.log.info(f"{source.name}: {result.rows:,} rows accepted, {result.quarantined:,} quarantined")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.rows,
            "rows": result.rows,
            "baskets": result.baskets,
            "customers": result.customers,
            "quarantined": result.quarantined,
            "quarantine_rate": float(result.quarantine_rate),
            "quarantine_reasons": dg.MetadataValue.md(reasons),
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
                    f"{result.quarantined:,} of {result.rows + result.quarantined:,} rows quarantined "
                    f"({result.quarantine_rate:.2%} > {config.max_quarantine_rate:.2%}); see {result.quarantine}"
                ),
            )
        ],
    )
