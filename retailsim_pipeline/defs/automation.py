"""Jobs, the new-data sensor and the weekly retraining schedule."""

import json
import os

import dagster as dg

from retailsim_pipeline.defs.evaluation_assets import evaluation_report
from retailsim_pipeline.defs.ingest_assets import raw_transactions, weekly_files
from retailsim_pipeline.defs.recovery import recover
from retailsim_pipeline.defs.prep_assets import basket_samples, tensor_cache
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.defs.training_assets import trained_world_model
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.schema import (
    duplicate_week_message,
    scan_raw_files,
    unsafe_file_message,
    unsafe_raw_files,
)

#: Ingest the weekly partitions of raw_transactions (one run per week).
ingest_job = dg.define_asset_job(
    "ingest_job", selection=dg.AssetSelection.assets(raw_transactions),
    description="Validate weekly LGSR files into typed parquet (one partition per file).",
)

#: Everything downstream of the weekly partitions: samples → cache → model → report.
retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets(basket_samples, tensor_cache, trained_world_model, evaluation_report),
    description="Rebuild samples and the tensor cache, train and register a model, evaluate and promote it.",
)

RETRAIN_CRON_ENV = "RETAILSIM_RETRAIN_CRON"
DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00 UTC


@dg.sensor(job=ingest_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="New or changed weekly files in raw/ (.csv or .csv.gz): adds their partitions and requests "
                       "their ingestion (run key = week + content hash of the file as stored, so nothing is "
                       "ingested twice and a corrected file is ingested again). A week present as both .csv and "
                       ".csv.gz is skipped with an error naming both files.")
def new_raw_files_sensor(context: dg.SensorEvaluationContext, retailsim_data: RetailSimData) -> dg.SensorResult:
    raw = retailsim_data.paths().raw
    # Cursor: {file name: [size, mtime_ns, sha256]} so an unchanged file is never hashed again.
    seen: dict[str, list] = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(weekly_files.name))
    files, duplicates = scan_raw_files(raw)  # symbolic links are never among the files
    unsafe = unsafe_raw_files(raw)
    for path in unsafe:
        context.log.error(unsafe_file_message(path) + "; not ingested")
    for week, paths in duplicates.items():
        context.log.error(duplicate_week_message(week, paths) + "; not ingested until then")
    new_partitions, requests, cursor = [], [], {}
    for week, path in files.items():
        stat = path.stat()
        previous = seen.get(path.name)
        if previous and previous[0] == stat.st_size and previous[1] == stat.st_mtime_ns:
            sha = previous[2]
        else:
            sha = file_sha256(path)
        cursor[path.name] = [stat.st_size, stat.st_mtime_ns, sha]
        key = str(week)
        if key not in known:
            new_partitions.append(key)
        if not previous or previous[2] != sha or key not in known:
            requests.append(dg.RunRequest(partition_key=key, run_key=f"{key}:{sha[:16]}",
                                          tags={"retailsim/source_sha256": sha}))
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[weekly_files.build_add_request(new_partitions)] if new_partitions else [],
        cursor=json.dumps(cursor, sort_keys=True),
        skip_reason=None if requests else "; ".join(
            ["no new or changed weekly files"]
            + (["weeks present as both .csv and .csv.gz: " + ", ".join(map(str, duplicates))] if duplicates else [])
            + (["not regular files (links?), not ingested: " + ", ".join(p.name for p in unsafe)] if unsafe else [])),
    )


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Housekeeping: marks failed the runs whose worker process is gone (freeing their pool "
                       "slots), ends orphaned MLflow training runs as KILLED, removes temporaries left by a crash. "
                       "Requests nothing.")
def recover_crashed_runs_sensor(context: dg.SensorEvaluationContext, retailsim_data: RetailSimData) -> dg.SkipReason:
    report = recover(context.instance, retailsim_data.paths())
    for line in report.lines():
        context.log.warning(line)
    return dg.SkipReason("; ".join(report.lines()) or "nothing to recover")


def _latest_timestamp(instance: dg.DagsterInstance, key: dg.AssetKey) -> float | None:
    event = instance.get_latest_materialization_event(key)
    return event.timestamp if event is not None else None


@dg.schedule(job=retrain_job, cron_schedule=os.environ.get(RETRAIN_CRON_ENV, DEFAULT_RETRAIN_CRON),
             execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Retrain weekly (cron from $RETAILSIM_RETRAIN_CRON, default Monday 03:00 UTC); "
                         "skips, saying why, when no weekly file was ingested since the current model.")
def weekly_retrain_schedule(context: dg.ScheduleEvaluationContext):
    data_at = _latest_timestamp(context.instance, raw_transactions.key)
    model_at = _latest_timestamp(context.instance, dg.AssetKey("trained_world_model"))
    if data_at is None:
        return dg.SkipReason("no weekly file has been ingested yet")
    if model_at is not None and data_at <= model_at:
        return dg.SkipReason("no new data since the current model was trained")
    stamp = context.scheduled_execution_time.strftime("%Y-%m-%d") if context.scheduled_execution_time else "now"
    return dg.RunRequest(run_key=f"retrain-{stamp}", tags={"dagster/max_retries": "1"})
