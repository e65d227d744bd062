"""In-process materialization for ``retailsim run``: what is missing or stale, and nothing else.

The runs it launches are the code location's declared jobs, so the UI's Runs page reads as what happened:

1. Every ``raw/transactions_YYYYWW.csv`` (or ``.csv.gz``) without a partition is registered as one.
   A week present under both names, or a weekly-file name that is a symbolic link, stops the run
   with an error naming the files.
2. The weekly partitions to (re)ingest run as **one** ``ingest_job`` run over their partition range (one
   run per contiguous range of the registered weeks; the first ``retailsim run`` is one run), each week
   reported as its own materialization. A week is ingested when it was never materialized, its file
   changed (size/mtime differ and then the content hash differs: Dagster cannot see a file on disk
   change by itself) or its recorded code version is not the asset's.
3. Any week whose latest ingest failed its blocking quarantine check (this run or an earlier one)
   stops the run before anything downstream: the report names, per week, the file, the quarantined
   share and the top three reasons with counts, and ``retailsim run`` exits non-zero.
4. The selected unpartitioned assets that are stale run together as one ``retrain_job`` run (limited to
   them), in dependency order. Stale is first Dagster's own verdict, the one the UI's badges show
   (missing, code version changed, an upstream data version changed), and then what Dagster does not
   track: a parent materialized after the asset (in this invocation or before) — Dagster stops comparing
   a partitioned parent's data versions past a hundred partitions, and the full dataset has 117 weeks.

First, :func:`~retailsim_pipeline.defs.recovery.recover` cleans up after a crashed earlier run (runs
left STARTED, MLflow runs left RUNNING, temporaries). Runs execute in this process on the given
instance, tagged with this process's pid and host, and appear in the UI's run list and asset catalog
exactly like runs launched there.
"""

import logging
import warnings
from dataclasses import dataclass, field

import dagster as dg

from retailsim_pipeline.config import DataPaths
from retailsim_pipeline.defs.ingest_assets import failed_weeks, weekly_files
from retailsim_pipeline.defs.recovery import process_tags, recover
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.schema import RawFileError, raw_file_of_week, raw_weekly_files

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    registered: list[str] = field(default_factory=list)
    partitions_materialized: list[str] = field(default_factory=list)
    partitions_current: int = 0
    assets_materialized: list[str] = field(default_factory=list)
    assets_current: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    failed_weeks: list[str] = field(default_factory=list)
    checks_passed: list[str] = field(default_factory=list)
    checks_failed: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failures and not self.failed_weeks

    def lines(self) -> list[str]:
        out = [*self.recovered,
            f"registered {len(self.registered)} new weekly partition(s)",
            f"materialized {len(self.partitions_materialized)} partition(s); "
            f"{self.partitions_current} already up to date",
            f"materialized: {', '.join(self.assets_materialized) or 'nothing'}",
        ]
        if self.checks_passed:
            out.append(f"checks passed: {', '.join(self.checks_passed)}")
        if self.checks_failed:
            out.append(f"CHECKS FAILED (see the Dagster UI): {', '.join(self.checks_failed)}")
        if self.assets_current:
            out.append(f"up to date: {', '.join(self.assets_current)}")
        if self.failed_weeks:
            out.append(f"STOPPED: {len(self.failed_weeks)} week(s) failed the blocking quarantine check "
                       "(quarantine/<file>.parquet lists every row with its line, column and reason); "
                       "nothing downstream ran:")
            out += [f"  {w}" for w in self.failed_weeks]
        out += [f"FAILED: {f}" for f in self.failures]
        return out


def register_weekly_files(instance: dg.DagsterInstance, paths: DataPaths) -> tuple[list[str], list[str]]:
    """(all partition keys on disk, the ones newly registered)."""
    keys = [str(w) for w in raw_weekly_files(paths.raw)]
    existing = set(instance.get_dynamic_partitions(weekly_files.name))
    new = [k for k in keys if k not in existing]
    if new:
        instance.add_dynamic_partitions(weekly_files.name, new)
    return keys, new


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0] if records else None


def _partition_is_current(record, paths: DataPaths, partition: str, code_version: str | None) -> bool:
    if record is None:
        return False
    mat = record.asset_materialization
    if code_version is not None and mat.tags and mat.tags.get("dagster/code_version") not in (None, code_version):
        return False
    meta = mat.metadata
    try:
        source = raw_file_of_week(paths.raw, int(partition))
    except FileNotFoundError:
        return False  # the asset run itself reports the missing file
    if "source" in meta and meta["source"].value != str(source):
        return False  # e.g. the week was re-added compressed
    stat = source.stat()
    if "source_size" in meta and meta["source_size"].value == stat.st_size and \
            meta.get("source_mtime_ns") is not None and meta["source_mtime_ns"].value == str(stat.st_mtime_ns):
        return True
    return "source_sha256" in meta and meta["source_sha256"].value == file_sha256(source)


def materialize_selection(
    select: str,
    paths: DataPaths,
    *,
    instance: dg.DagsterInstance | None = None,
    defs: dg.Definitions | None = None,
    progress: bool = True,
    log_level: str = "WARNING",
    training_preset: str | None = None,
) -> RunReport:
    if defs is None:
        from retailsim_pipeline.definitions import defs as project_defs

        defs = project_defs
    instance = instance or dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    with warnings.catch_warnings():  # from_string resolves through a beta code path that warns
        warnings.simplefilter("ignore", dg.BetaWarning)
        selected = dg.AssetSelection.from_string(select).resolve(graph)
    assets = list(defs.assets or []) + list(defs.asset_checks or [])
    resources = {"retailsim_data": RetailSimData(data_dir=str(paths.root)), **{
        k: v for k, v in (defs.resources or {}).items() if k != "retailsim_data"}}
    run_config: dict = {"loggers": {"console": {"config": {"log_level": log_level.upper()}}}}
    train_key = dg.AssetKey("trained_world_model")
    report = RunReport()
    report.recovered = recover(instance, paths).lines()
    try:
        keys, report.registered = register_weekly_files(instance, paths)
    except RawFileError as exc:  # a week present twice, a symbolic link
        report.failures.append(str(exc))
        return report
    ran: set[dg.AssetKey] = set()
    jobs = _jobs(defs, assets, resources)

    for key in graph.toposorted_asset_keys:
        if key not in selected or graph.get(key).partitions_def is None:
            continue
        code_version = graph.get(key).code_version
        todo = [k for k in keys if not _partition_is_current(_latest(instance, key, k), paths, k, code_version)]
        report.partitions_current += len(keys) - len(todo)
        order = instance.get_dynamic_partitions(weekly_files.name)  # a range follows the registration order
        for weeks in _contiguous(order, todo):
            log.info("ingesting %d week(s): %s … %s", len(weeks), weeks[0], weeks[-1])
            config = {**run_config, "ops": {key.to_python_identifier(): {"config": {"progress": progress}}}}
            job = jobs.get("ingest_job") if key == INGEST_KEY else None
            tags = {**process_tags(), **_partition_tags(weeks)}
            if job is not None:
                result = job.execute_in_process(instance=instance, run_config=config, tags=tags,
                                                raise_on_error=False)
            else:  # a partitioned asset outside the declared jobs (only in tests' own definitions)
                result = dg.materialize(assets, selection=[key], instance=instance, resources=resources,
                                        run_config=config, tags=tags, raise_on_error=False)
            report.run_ids.append(result.run_id)
            done = sorted({m.partition for m in result.asset_materializations_for_node(key.to_python_identifier())
                           if m.partition is not None})
            report.partitions_materialized += done
            if done:
                ran.add(key)
            error = _first_error(result, ignore=("DagsterAssetCheckFailedError",)) if not result.success else None
            if error is not None:  # a blocking check's failure is reported with the weeks below
                report.failures.append(f"{key.to_user_string()}[{weeks[0]}…{weeks[-1]}]: {error}")
    report.failed_weeks = [w.message() for w in failed_weeks(instance, keys)]
    if report.failures or report.failed_weeks:
        return report

    to_run: list[dg.AssetKey] = []
    stale_in_dagster = dagster_stale(instance, graph, [k for k in selected if graph.get(k).partitions_def is None])
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if key not in selected or node.partitions_def is not None or not node.is_materializable:
            continue
        latest = _latest(instance, key)
        stale = (
            latest is None
            or key in stale_in_dagster
            or (node.code_version is not None and (latest.asset_materialization.tags or {}).get(
                "dagster/code_version") not in (None, node.code_version))
            or any(p in ran or p in to_run for p in node.parent_keys)
            or any((pl := _latest(instance, p)) is not None and pl.timestamp > latest.timestamp
                   for p in node.parent_keys)
        )
        (to_run.append(key) if stale else report.assets_current.append(key.to_user_string()))
    if to_run:
        log.info("materializing %s", ", ".join(k.to_user_string() for k in to_run))
        if training_preset and train_key in to_run:
            run_config["ops"] = {"trained_world_model": {"ops": {"train_world_model": {
                "config": {"preset": training_preset}}}}}
        job = jobs.get("retrain_job")
        if job is not None and set(to_run) <= set(job.asset_layer.selected_asset_keys):
            result = job.execute_in_process(instance=instance, run_config=run_config, tags=process_tags(),
                                            asset_selection=to_run, raise_on_error=False)
        else:  # assets outside the declared jobs (only in tests' own definitions)
            result = dg.materialize(assets, selection=to_run, instance=instance, resources=resources,
                                    run_config=run_config, raise_on_error=False, tags=process_tags())
        report.run_ids.append(result.run_id)
        if result.success:
            report.assets_materialized += [k.to_user_string() for k in to_run]
            for e in result.get_asset_check_evaluations():
                name = f"{e.asset_key.to_user_string()}:{e.check_name}"
                # A failed blocking check fails the run itself (downstream steps do not execute); a
                # non-blocking one (e.g. model_beats_baselines) is reported, the outputs stay.
                (report.checks_passed if e.passed else report.checks_failed).append(name)
        else:
            report.failures.append(_first_error(result))
    return report


def _first_error(result: dg.ExecuteInProcessResult, ignore: tuple[str, ...] = ()) -> str | None:
    """The first step failure's own message (the user code's error, not Dagster's wrapper); ``None`` when
    every failure is of a class in ``ignore``."""
    failures = [e for e in result.all_events if e.is_step_failure]
    for event in failures:
        error = event.step_failure_data.error
        while error.cause is not None:
            error = error.cause
        if event.step_failure_data.error.cls_name in ignore or error.cls_name in ignore:
            continue
        return f"{event.step_key}: {error.message.strip()}"
    return None if failures else "run failed"


INGEST_KEY = dg.AssetKey("raw_transactions")


def _jobs(defs: dg.Definitions, assets: list, resources: dict) -> dict[str, dg.JobDefinition]:
    """The declared jobs of ``defs``, resolved against its assets with ``resources`` (the data folder)."""
    declared = [j for j in (defs.jobs or []) if j.name in ("ingest_job", "retrain_job")]
    if not declared:
        return {}
    bound = dg.Definitions(assets=assets, jobs=declared, resources=resources)
    return {j.name: bound.resolve_job_def(j.name) for j in declared}


def _contiguous(order: list[str], todo: list[str]) -> list[list[str]]:
    """``todo`` split into runs of consecutive keys of ``order`` (a partition range must be contiguous)."""
    position = {k: i for i, k in enumerate(order)}
    groups: list[list[str]] = []
    for key in sorted(todo, key=position.__getitem__):
        if groups and position[key] == position[groups[-1][-1]] + 1:
            groups[-1].append(key)
        else:
            groups.append([key])
    return groups


def _partition_tags(weeks: list[str]) -> dict[str, str]:
    if len(weeks) == 1:
        return {"dagster/partition": weeks[0]}
    return {"dagster/asset_partition_range_start": weeks[0], "dagster/asset_partition_range_end": weeks[-1]}


def dagster_stale(instance: dg.DagsterInstance, graph, keys: list[dg.AssetKey]) -> set:
    """The keys Dagster itself reports STALE or MISSING (the UI's badges). Dagster's resolver is not public
    API; if it cannot be built or answer, the runner's own rule alone decides (and says so in the log)."""
    try:
        from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
        from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
        from dagster._time import get_current_datetime

        view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(),
                                                               last_event_id=None),
                              instance=instance, asset_graph=graph)
        resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
        return {k for k in keys if resolver.get_status(k) in (StaleStatus.STALE, StaleStatus.MISSING)}
    except Exception as exc:  # noqa: BLE001 - an internal API moved: degrade to the runner's own rule
        log.warning("Dagster's staleness could not be read (%s); using the runner's own rule", exc)
        return set()
