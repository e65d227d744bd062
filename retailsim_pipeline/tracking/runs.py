"""The MLflow store, experiments and runs: where training and evaluation metrics go.

- **Store.** :func:`default_tracking_uri`: ``$MLFLOW_TRACKING_URI`` when set (a server), else a sqlite
  file ``<data_root>/mlflow/mlflow.db`` (no server needed; the registry works on it too). For a sqlite
  store, experiments created here keep their artifacts beside the database in ``<db folder>/artifacts``
  (not MLflow's default ``./mlruns`` under whatever the working directory happens to be).
  :func:`mlflow_client` is the one way the package makes a client: tracking and registry on that store.
- **Runs.** One experiment (:data:`EXPERIMENT`), one run per training. :class:`MlflowLogger` writes
  the flattened config as params (``model.d_model`` …), metrics per step in batches, tags (Dagster run
  id, asset key, cache version), dict/file artifacts, and system metrics (``system/cpu_…``, GPU ones
  when ``pynvml`` is importable). The training loop only sees the :class:`MetricsLogger` protocol, so
  it never imports mlflow. :func:`close_orphaned_runs` ends the runs of crashed trainings.
- **Experiment.** :func:`get_or_create_experiment` also gives :data:`EXPERIMENT` its description
  (:data:`EXPERIMENT_DESCRIPTION`, what the runs hold and how to compare model and baselines).
- **Evaluation.** :func:`metric_history` reads a run's training curves back for the report;
  :func:`log_evaluation` records the test metrics (linked to the LoggedModel), the gate, the report
  files and the promotion decision on the training run, and one child run per scorer (model, baselines,
  oracle) with the same metric keys, so the UI compares them in one table or chart.

All run-level calls go through an explicit :class:`mlflow.MlflowClient` with an explicit tracking
URI, never the fluent ``mlflow.start_run`` state, so nothing leaks between runs, threads or tests.
The one MLflow call that only knows the process-global URI (``mlflow.pyfunc.log_model``, and the
sqlite registry's lookup of a LoggedModel) runs inside :func:`global_tracking_uri`.
"""

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from retailsim_pipeline.config import DataPaths

log = logging.getLogger(__name__)

EXPERIMENT = "retailsim"

#: MLflow's description of an experiment or a run (a tag, rendered as markdown in the UI).
NOTE_TAG = "mlflow.note.content"
#: Tags of the evaluation's child runs: MLflow's parent link, and which scorer the run holds.
PARENT_RUN_TAG, SCORER_TAG = "mlflow.parentRunId", "retailsim.scorer"

EXPERIMENT_DESCRIPTION = """\
RetailSim world model: each basket being filled (customer card, store, date and hour, products so far) \
is completed by ranking the products most likely to be added.

- **One run per training**: the config as params (`model.d_model`, `cache_path`, …), the curves \
(`train/…`, `val/…`), system metrics, and the logged model `world_model`, registered as a version of \
`retailsim-world-model` (Models tab; the alias `champion` marks the version that serves).
- **After evaluation** the training run also holds the test metrics (`test/recall_at_10`, …), the gate \
(`test/gate/difference`, `ci_low`, `ci_high`: model − strongest baseline on recall@10, 95 % paired \
bootstrap), the decision (`promotion/champion`: 1 or 0) and the report under artifacts `evaluation/`.
- **Model against baselines**: under each training run, one child run per scorer (`model`, `blend`, \
`tifu_knn`, `personal_frequency`, `cooccurrence`, `popularity`, and `oracle` on generated data), all \
scored on the same masked test positions and with the same metric keys. Expand the training run, tick \
its child runs and open the chart view: `test/recall_at_10` shows the model beside every baseline.
"""

#: Tags that say which process owns a run, so a later start can tell a crashed run from a live one.
PID_TAG, HOST_TAG = "retailsim.pid", "retailsim.host"

# MLflow limits (mlflow.utils.validation): 100 params/tags and 1000 metrics per log_batch call,
# param values ≤ 6000 characters.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE_LEN = 6000


# --------------------------------------------------------------------------------------------
# Store and experiment
# --------------------------------------------------------------------------------------------


def default_tracking_uri(paths: DataPaths | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<data_root>/mlflow/mlflow.db`` (folder created)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    folder = (paths or DataPaths.from_env()).mlflow
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def mlflow_client(tracking_uri: str | None) -> MlflowClient:
    """A client whose registry is the tracking store too (``tracking_uri`` or :func:`default_tracking_uri`).

    ``MlflowClient(tracking_uri)`` alone takes its *registry* URI from the process-global default,
    which without ``$MLFLOW_TRACKING_URI`` is ``./mlflow.db``: registering a model logged to our store
    would then look for it in the working directory.
    """
    uri = tracking_uri or default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking URI at ``uri`` for one fluent call, then restore it.

    Not ``mlflow.tracking._tracking_service.utils._use_tracking_uri``: restoring an unset global URI
    through it also deletes ``$MLFLOW_TRACKING_URI`` from the environment (set_tracking_uri(None)
    unsets the variable), so later default lookups would land in ``./mlflow.db``.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_global = tracking_utils._tracking_uri
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _artifact_location(tracking_uri: str) -> str | None:
    """``<db folder>/artifacts`` for a sqlite store; None (the server's default) otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri.removeprefix("sqlite:///"))
    if not db_path.is_absolute():
        # sqlite:////abs has an absolute path after the prefix; sqlite:///rel is cwd-relative.
        db_path = db_path.resolve()
    folder = db_path.parent / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str,
                             description: str | None = None) -> str:
    """The id of experiment ``name``, created (with our artifact location) if it does not exist yet.

    ``description`` (for :data:`EXPERIMENT`, :data:`EXPERIMENT_DESCRIPTION` unless given) is the
    experiment's description in the UI (tag :data:`NOTE_TAG`): set at creation, and filled in on an
    existing experiment that has none. A description someone wrote in the UI is left alone.
    """
    if description is None and name == EXPERIMENT:
        description = EXPERIMENT_DESCRIPTION
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri),
                                            tags={NOTE_TAG: description} if description else None)
        except MlflowException as err:
            # Another process (a parallel Dagster run) created it between our two calls.
            if (exp := client.get_experiment_by_name(name)) is None:
                raise err
    _fill_description(client, exp, description)
    return exp.experiment_id


def _fill_description(client: MlflowClient, experiment, description: str | None) -> None:
    if description and not (experiment.tags or {}).get(NOTE_TAG, "").strip():
        client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, description)


# --------------------------------------------------------------------------------------------
# Metric logging
# --------------------------------------------------------------------------------------------


@runtime_checkable
class MetricsLogger(Protocol):
    """What a training may log. Implementation: :class:`MlflowLogger`.

    The trainer itself calls only ``log_metrics``; when no logger is injected it uses
    ``training.trainer.NullMetrics``, the project's one no-op logger.
    """

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, dictionary: Mapping[str, Any], name: str) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def flatten_params(params: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, str]:
    """Nested config → flat ``{"model.d_model": "128", …}``; pydantic models are dumped first.

    Lists and other non-dict values become JSON (or ``str``); values are cut to MLflow's 6000
    characters (with a warning) so one long value cannot fail the whole batch.
    """
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else _to_text(value)
        if len(text) > _MAX_PARAM_VALUE_LEN:
            log.warning("param %s is %d characters; truncated to %d", name, len(text), _MAX_PARAM_VALUE_LEN)
            text = text[:_MAX_PARAM_VALUE_LEN]
        flat[name] = text
    return flat


def _to_text(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value)
        except TypeError:
            return str(value)
    return str(value)


class MlflowLogger:
    """A MLflow run for one training, driven through :class:`MlflowClient` (no fluent active run).

    Starts a new run in ``experiment`` (created if needed), or resumes ``run_id`` (marked RUNNING again;
    params already logged with the same value are skipped). With ``system_metrics`` on, MLflow's
    ``SystemMetricsMonitor`` samples CPU, memory, disk, network (and NVIDIA GPUs when ``pynvml`` is
    installed) every ``system_metrics_interval`` seconds into ``system/…`` metrics of this run; the
    environment variable ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides the interval (MLflow's
    rule). Use it as a context manager, or call :meth:`close` (the run ends FAILED on an exception).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = EXPERIMENT,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        system_metrics: bool = True,
        run_id: str | None = None,
        system_metrics_interval: float = 10.0,
    ):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = mlflow_client(self.tracking_uri)
        self._closed = False
        if run_id is None:
            from mlflow.tracking.context.registry import resolve_tags

            self.experiment_id = get_or_create_experiment(self.client, experiment, self.tracking_uri)
            # resolve_tags adds what mlflow.start_run would: user, source file, git commit.
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags=resolve_tags({k: str(v) for k, v in (tags or {}).items()}),
            )
            self._logged_params: dict[str, str] = {}
        else:
            run = self.client.get_run(run_id)
            self.experiment_id = run.info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
            self._logged_params = dict(run.data.params)
            if tags:
                self.set_tags(tags)
        self.run_id: str = run.info.run_id
        self._monitor = None
        if system_metrics:
            self._monitor = _start_system_metrics(
                self.run_id, self.tracking_uri, system_metrics_interval, resume=run_id is not None
            )
        log.info("MLflow run %s (%s)", self.run_id, self.run_url())

    def run_url(self, ui_base: str = "http://127.0.0.1:5000") -> str:
        """Where the run is in the MLflow UI (``mlflow ui --backend-store-uri <uri>`` serves :5000)."""
        return f"{ui_base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_params(self, params: Mapping[str, Any] | BaseModel) -> None:
        flat = flatten_params(params)
        new = {}
        for key, value in flat.items():
            old = self._logged_params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                raise ValueError(
                    f"run {self.run_id}: param {key!r} was logged as {old!r}, now {value!r}; MLflow params "
                    "are immutable: resume with the same config or start a new run"
                )
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])
        self._logged_params.update(new)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        items = [Metric(key, float(value), timestamp, int(step)) for key, value in metrics.items()]
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _MAX_PARAMS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_dict(self, dictionary: Mapping[str, Any], name: str) -> None:
        """``dictionary`` as the artifact file ``name`` (``.json``, or ``.yaml``/``.yml``)."""
        self.client.log_dict(self.run_id, dict(dictionary), name)

    def close(self, status: str = "FINISHED") -> None:
        """Stop system metrics (flushing the last samples), then end the run with ``status``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._monitor is not None:
            self._monitor.finish()
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "MlflowLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


def _start_system_metrics(run_id: str, tracking_uri: str, interval: float, resume: bool):
    """MLflow's monitor bound to ``run_id`` explicitly (``mlflow.start_run`` is not needed for it)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=tracking_uri
        )
    except ImportError as err:  # psutil missing
        log.warning("system metrics off: %s (pip install psutil)", err)
        return None
    monitor.start()
    return monitor


def close_orphaned_runs(tracking_uri: str | None, is_alive) -> list[str]:
    """End as KILLED every RUNNING run of :data:`EXPERIMENT` whose owning process is gone.

    ``is_alive(pid, host)`` decides; runs without a pid tag (logged by something else) are left alone.
    Returns the run ids it closed.
    """
    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    closed = []
    for run in client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000):
        pid, host = run.data.tags.get(PID_TAG), run.data.tags.get(HOST_TAG)
        if pid is not None and not is_alive(int(pid), host):
            client.set_tag(run.info.run_id, "retailsim.ended_by", "recovery: the training process was gone")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def metric_name(name: str) -> str:
    """Our metric names (``recall@10``) as MLflow accepts them (``recall_at_10``: no ``@`` allowed)."""
    return name.replace("@", "_at_")


def metric_history(run_id: str, *, tracking_uri: str | None = None,
                   keys: Sequence[str] = ("train/total", "val/loss", "val/recall_at_10")) -> list[dict]:
    """The training curves of a run as rows ``{"step": s, key: value, …}`` (for the report's plot)."""
    client = mlflow_client(tracking_uri)
    rows: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            rows.setdefault(m.step, {"step": m.step})[key] = m.value
    return [rows[s] for s in sorted(rows)]


#: The scorers of an evaluation in the order their child runs are listed: the model, the baselines from
#: the most elaborate to the simplest, the oracle (generated data only).
SCORER_ORDER = ("model", "blend", "tifu_knn", "personal_frequency", "cooccurrence", "popularity", "oracle")


def scorer_metrics(doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Each scorer's ranking metrics of ``doc`` (``metrics.json``) under MLflow keys ``<split>/<metric>``
    (``test/recall_at_10``, ``test/mrr`` …): the same keys for every scorer, so MLflow's run comparison
    and charts put them side by side. Scorers in :data:`SCORER_ORDER`; the oracle only where it was scored;
    ``n`` and the model's auxiliary heads are left out (the heads are the model's alone)."""
    split = doc["meta"]["split"]
    scorers = {"model": doc["model"], **doc["baselines"]}
    if doc.get("oracle"):
        scorers["oracle"] = doc["oracle"]
    order = [s for s in SCORER_ORDER if s in scorers] + [s for s in scorers if s not in SCORER_ORDER]
    return {
        name: {f"{split}/{metric_name(k)}": float(v) for k, v in scorers[name].items()
               if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name in order
    }


def gate_metrics(doc: Mapping[str, Any]) -> dict[str, float]:
    """The promotion gate and decision as metrics of the training run (what the model-version compare view
    shows): model − strongest baseline on the gate metric with its interval (``<split>/gate/difference``,
    ``ci_low``, ``ci_high``), whether the gate passed (1/0) and whether the version became champion (1/0)."""
    split = doc["meta"]["split"]
    comparison = doc["significance"][doc["baseline_choice"]["strongest"]]
    promotion = doc["promotion"]
    return {
        f"{split}/gate/difference": float(comparison["difference"]),
        f"{split}/gate/ci_low": float(comparison["ci_low"]),
        f"{split}/gate/ci_high": float(comparison["ci_high"]),
        f"{split}/gate/passed": float(bool(promotion["passed_baseline_check"])),
        "promotion/champion": 1.0 if promotion["decision"] == "champion" else 0.0,
    }


def interval_text(doc: Mapping[str, Any], baseline: str | None = None) -> str:
    """``recall@10 model − blend: +0.0170 [+0.0110, +0.0230] 95%`` (``baseline``: the strongest by default)."""
    baseline = baseline or doc["baseline_choice"]["strongest"]
    c = doc["significance"][baseline]
    return (f"{doc['baseline_choice']['metric']} model − {baseline}: {c['difference']:+.4f} "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] {c['confidence']:.0%}")


def weeks_text(weeks: Sequence[int] | None) -> str | None:
    """``(200643, 200646)`` → ``200643–200646`` (first and last week of a split, YYYYWW)."""
    if not weeks:
        return None
    return str(weeks[0]) if len(weeks) == 1 or weeks[0] == weeks[-1] else f"{weeks[0]}–{weeks[-1]}"


def log_evaluation(run_id: str, doc: Mapping[str, Any], files: Mapping[str, Path], *,
                   tracking_uri: str | None = None, model_id: str | None = None,
                   weeks: Sequence[int] | None = None) -> dict[str, str]:
    """Record an evaluation (``doc``, the ``metrics.json`` document) on the training run ``run_id``.

    - The training run: the model's test metrics (``test/recall_at_10`` …) and the gate
      (:func:`gate_metrics`), linked to the LoggedModel ``model_id`` when given (MLflow 3 attaches a
      metric logged with a ``model_id`` to that model too: its page's Metrics tab); each baseline's and
      the oracle's ``test/<scorer>/recall_at_10`` (kept for older dashboards); the decision as tags
      ``retailsim.promotion.*``; the data scored as params ``evaluation.cache_key`` and
      ``evaluation.<split>_weeks`` (``weeks``: first and last week of the split); the report ``files``
      as artifacts under ``evaluation/``.
    - One child run per scorer (tag ``mlflow.parentRunId``; run name = scorer, :data:`SCORER_ORDER`),
      each with the same metric keys (:func:`scorer_metrics`), so model and baselines are compared in one
      table or chart. A second evaluation of the same run updates its child runs instead of adding more.
    - The experiment's description, when it has none.

    Returns the child run id of each scorer.
    """
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    split = doc["meta"]["split"]
    now = int(time.time() * 1000)
    per_scorer = scorer_metrics(doc)
    own = {**per_scorer["model"], **gate_metrics(doc)}
    metrics = [Metric(k, v, now, 0, model_id=model_id) for k, v in own.items()]
    metrics += [Metric(f"{split}/{name}/recall_at_10", values[f"{split}/recall_at_10"], now, 0)
                for name, values in per_scorer.items() if name != "model" and f"{split}/recall_at_10" in values]
    for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i: i + _MAX_METRICS_PER_BATCH])
    promotion = doc["promotion"]
    tags = {f"retailsim.promotion.{key}": str(promotion.get(key))
            for key in ("decision", "reason", "champion_version", "challenger_version")}
    tags["retailsim.promotion.gate"] = interval_text(doc)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    params = {"evaluation.cache_key": doc["meta"]["cache_key"]}
    if (span := weeks_text(weeks)) is not None:
        params[f"evaluation.{split}_weeks"] = span
    _log_new_params(client, run, params)
    for path in files.values():
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    children = _log_scorer_runs(client, run, doc, per_scorer, now)
    experiment = client.get_experiment(run.info.experiment_id)
    if experiment.name == EXPERIMENT:
        _fill_description(client, experiment, EXPERIMENT_DESCRIPTION)
    return children


def _log_new_params(client: MlflowClient, run, params: Mapping[str, str]) -> None:
    """Params are immutable in MLflow: log those the run lacks; one logged with another value is kept (warned)."""
    new = {}
    for key, value in params.items():
        old = run.data.params.get(key)
        if old is None:
            new[key] = value
        elif old != value:
            log.warning("run %s: param %s stays %r (MLflow params are immutable), not %r", run.info.run_id, key,
                        old, value)
    if new:
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in new.items()])


def _log_scorer_runs(client: MlflowClient, parent, doc: Mapping[str, Any],
                     per_scorer: Mapping[str, Mapping[str, float]], now: int) -> dict[str, str]:
    """One finished child run per scorer under ``parent`` (reused when it exists); the model's is created
    last so that the UI, newest first, lists it on top."""
    parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
    existing = {r.data.tags.get(SCORER_TAG): r for r in client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_id}'", max_results=1000)}
    chosen = doc.get("baseline_choice", {}).get("params", {})
    ids = {}
    for i, name in enumerate(reversed(list(per_scorer))):
        tags = {PARENT_RUN_TAG: parent_id, SCORER_TAG: name, **_scorer_tags(doc, name)}
        if (child := existing.get(name)) is None:
            child = client.create_run(experiment_id, start_time=now + i, tags=tags, run_name=name)
        else:
            client.log_batch(child.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        child_id = child.info.run_id
        client.log_batch(child_id, metrics=[Metric(k, v, now, 0) for k, v in per_scorer[name].items()])
        if name in chosen:
            _log_new_params(client, child, {k: str(v) for k, v in chosen[name].items()})
        client.set_terminated(child_id, status="FINISHED", end_time=now + i)
        ids[name] = child_id
    return {name: ids[name] for name in per_scorer}


def _scorer_tags(doc: Mapping[str, Any], name: str) -> dict[str, str]:
    meta = doc["meta"]
    where = (f"{meta['n_positions']:,} masked {meta['split']} positions ({meta['n_baskets']:,} baskets) of tensor "
             f"cache {meta['cache_key']}")
    tags = {"retailsim.model_version": str(meta["model_version"]), "retailsim.cache_key": str(meta["cache_key"])}
    if name == "model":
        tags["retailsim.role"] = "model"
        note = f"The world model, version {meta['model_version']} of {meta['model_name']}, on {where}."
    elif name == "oracle":
        tags["retailsim.role"] = "oracle"
        note = (f"The data generator's ground truth as a scorer, on the model's {where}: the ceiling any model "
                "could reach on generated data.")
    else:
        tags["retailsim.role"] = "baseline"
        strongest = name == doc["baseline_choice"]["strongest"]
        tags["retailsim.strongest_baseline"] = str(strongest).lower()
        note = f"Baseline {name}, scored on the model's {where}."
        if name in doc.get("significance", {}):
            tags["retailsim.model_minus_this"] = interval_text(doc, name)
            note += f" {interval_text(doc, name)} (paired bootstrap over baskets)."
        if strongest:
            note += " The strongest baseline on validation: the promotion gate compares the model with it."
    tags[NOTE_TAG] = note
    return tags
