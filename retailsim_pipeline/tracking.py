"""MLflow tracking and the model registry: the only module in the project that imports mlflow.

What goes where (DESIGN §8):

- **Store.** :func:`default_tracking_uri`: ``$MLFLOW_TRACKING_URI`` when set (a server), else a sqlite
  file ``<data_root>/mlflow/mlflow.db`` (no server needed; the registry works on it too). For a sqlite
  store, experiments created here keep their artifacts beside the database in ``<db folder>/artifacts``
  (not MLflow's default ``./mlruns`` under whatever the working directory happens to be).
- **Runs.** One experiment (:data:`EXPERIMENT`), one run per training. :class:`MlflowLogger` writes
  the flattened config as params (``model.d_model`` …), metrics per step in batches, tags (Dagster run
  id, asset key, cache version), dict/file artifacts, and system metrics (``system/cpu_…``, GPU ones
  when ``pynvml`` is importable). The training loop only sees the :class:`MetricsLogger` protocol, so
  it never imports mlflow; :class:`NullLogger` stands in for tests and standalone runs.
- **Models.** :func:`log_world_model` logs a pyfunc *LoggedModel* (``models:/m-<id>``) attached to
  the training run, whose artifacts are ``config.json`` (ModelConfig), ``weights.safetensors`` (the
  state dict) and ``vocabulary.json`` (product code of every token id). :func:`register_world_model`
  turns it into a version of :data:`REGISTERED_MODEL` and points an alias (``challenger``; the
  evaluation moves ``champion``) at it.

Why no pickle: unpickling runs arbitrary code, and a pickled ``nn.Module`` also breaks as soon as the
class changes. The weights are safetensors (plain tensors, safe to load from anyone), rebuilt into
``WorldModel(ModelConfig(**config.json))``. MLflow itself still cloudpickles the small
:class:`WorldModelPyfunc` wrapper (``python_model.pkl``); it holds no weights or state, only a
reference to this module's class, which is why the project package is one of the model's pip
requirements. MLflow's ``pytorch`` flavor is not used: it either pickles the module or exports a
``torch.export`` graph that loads back as a ``GraphModule`` instead of our class.

All run-level calls go through an explicit :class:`mlflow.MlflowClient` with an explicit tracking
URI, never the fluent ``mlflow.start_run`` state, so nothing leaks between runs, threads or tests.
"""

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import mlflow
import mlflow.pyfunc
import pandas as pd  # an mlflow dependency; the pyfunc's input type
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from pydantic import BaseModel

from retailsim_pipeline.config import N_SPECIAL, PAD, SPECIAL_CODES, UNK, DataPaths, ModelConfig

log = logging.getLogger(__name__)

EXPERIMENT = "retailsim"
REGISTERED_MODEL = "retailsim-world-model"

#: Token ids of the special tokens; the same as ``prep.cache`` (not imported: the pyfunc's serving
#: environment should not need polars). A test checks they agree.

DEFAULT_TOP_K = 10

# MLflow limits (mlflow.utils.validation): 100 params/tags and 1000 metrics per log_batch call,
# param values ≤ 6000 characters.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE_LEN = 6000

# Artifact file names inside the logged model (keys of ``context.artifacts`` in the pyfunc).
_CONFIG = "config.json"
_WEIGHTS = "weights.safetensors"
_VOCABULARY = "vocabulary.json"


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


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (with our artifact location) if it does not exist yet."""
    if (exp := client.get_experiment_by_name(name)) is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri))
    except MlflowException as err:
        # Another process (a parallel Dagster run) created it between our two calls.
        if (exp := client.get_experiment_by_name(name)) is not None:
            return exp.experiment_id
        raise err


# --------------------------------------------------------------------------------------------
# Metric loggers
# --------------------------------------------------------------------------------------------


@runtime_checkable
class MetricsLogger(Protocol):
    """What the training loop may log. Implementations: :class:`MlflowLogger`, :class:`NullLogger`."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, dictionary: Mapping[str, Any], name: str) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    """Logs nothing: for tests and for training without a tracking store."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, dictionary: Mapping[str, Any], name: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


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
        self.client = _client(self.tracking_uri)
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


#: Tags that say which process owns a run, so a later start can tell a crashed run from a live one.
PID_TAG, HOST_TAG = "retailsim.pid", "retailsim.host"


def close_orphaned_runs(tracking_uri: str | None, is_alive) -> list[str]:
    """End as KILLED every RUNNING run of :data:`EXPERIMENT` whose owning process is gone.

    ``is_alive(pid, host)`` decides; runs without a pid tag (logged by something else) are left alone.
    Returns the run ids it closed.
    """
    client = _client(tracking_uri)
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


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The world model as an MLflow pyfunc
# --------------------------------------------------------------------------------------------


def _build_world_model(config: dict, weights_path: str | Path, device: str = "cpu"):
    """``WorldModel(ModelConfig(**config))`` with the safetensors weights loaded strictly, in eval mode."""
    from safetensors.torch import load_file

    from retailsim_pipeline.model.world_model import WorldModel

    model = WorldModel(ModelConfig(**config))
    model.load_state_dict(load_file(str(weights_path), device=device), strict=True)
    return model.to(device).eval()


def _read_artifacts(config_path, weights_path, vocabulary_path, device: str = "cpu"):
    config = json.loads(Path(config_path).read_text())
    vocabulary = json.loads(Path(vocabulary_path).read_text())
    model = _build_world_model(config, weights_path, device)
    return model, vocabulary


def encode_baskets(
    baskets: Sequence[Sequence[str]],
    token_of: Mapping[str, int],
    max_len: int,
):
    """Product-code baskets → ``tokens`` [B, S] int64 (PAD = 0, unknown codes = UNK) and ``attention_mask`` [B, S].

    Baskets are cut to their first ``max_len`` products (the seed's rule for training baskets). S is at
    least 1, so an empty basket is one padding position.
    """
    import torch

    ids = [[token_of.get(str(code), UNK) for code in list(basket)[:max_len]] for basket in baskets]
    S = max(1, max((len(b) for b in ids), default=0))
    tokens = torch.full((len(ids), S), PAD, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens, tokens != PAD


class WorldModelPyfunc(mlflow.pyfunc.PythonModel):
    """Serves the world model as "basket → top-k next products".

    ``load_context`` rebuilds the torch module from the logged artifacts (``config.json``,
    ``weights.safetensors``, ``vocabulary.json``): nothing model-specific is pickled. This object itself
    is cloudpickled by MLflow (``python_model.pkl``), which is acceptable because it holds no weights,
    only a reference to this class.

    Input: a DataFrame with ``products`` (list of product codes: the visible basket) and optionally
    ``context`` (400 floats per row: customer | temporal | store | trip; zeros when absent). Unknown
    codes map to UNK; price features are zero (a served basket has no observed prices).
    Output: a DataFrame with ``top_k`` (list of K product codes, best first, none of them in the
    basket). ``params={"k": 20}`` changes K (default 10).
    """

    def load_context(self, context) -> None:
        self.model, self.vocabulary = _read_artifacts(
            context.artifacts["config"], context.artifacts["weights"], context.artifacts["vocabulary"]
        )
        self.token_of = {code: i for i, code in enumerate(self.vocabulary) if i >= N_SPECIAL}

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", DEFAULT_TOP_K))
        top = top_k_codes(self.model, self.vocabulary, model_input, k, token_of=self.token_of)
        return pd.DataFrame({"top_k": top})


def top_k_codes(model, vocabulary: Sequence[str], frame, k: int = DEFAULT_TOP_K, token_of=None) -> list[list[str]]:
    """The pyfunc's scoring on a loaded torch module: DataFrame (``products``, ``context``?) → K codes per row.

    Shared by :class:`WorldModelPyfunc` and callers that hold the raw module (tests, batch scoring).
    """
    import numpy as np
    import torch

    from retailsim_pipeline.model.world_model import top_k_products

    cfg = model.config
    token_of = token_of or {code: i for i, code in enumerate(vocabulary) if i >= N_SPECIAL}
    k = max(1, min(k, len(vocabulary) - N_SPECIAL))
    baskets = list(frame["products"])
    # The model has max_basket_len + 1 positions: the extra one is for the MASK top_k_products appends.
    tokens, attention_mask = encode_baskets(baskets, token_of, max_len=cfg.max_basket_len)
    B, S = tokens.shape  # baskets, longest basket
    price = torch.zeros(B, S, cfg.price_dim)
    context = torch.zeros(B, cfg.context_dim)
    if "context" in frame.columns:
        for i, row in enumerate(frame["context"]):
            if row is None or (isinstance(row, float) and math.isnan(row)):
                continue
            vec = np.asarray(row, dtype=np.float32)
            if vec.shape != (cfg.context_dim,):
                raise ValueError(f"row {i}: context has shape {vec.shape}, expected ({cfg.context_dim},)")
            context[i] = torch.from_numpy(vec)
    device = next(model.parameters()).device
    with torch.no_grad():
        ids = top_k_products(
            model, tokens.to(device), price.to(device), context.to(device), attention_mask.to(device), k
        )
    return [[vocabulary[int(t)] for t in row] for row in ids.cpu()]


def _signature(k: int = DEFAULT_TOP_K) -> ModelSignature:
    """Input ``products`` (required) and ``context`` (optional), output ``top_k``, param ``k``.

    Written out rather than inferred from the input example: inference would make ``context`` required.
    """
    return ModelSignature(
        inputs=Schema([
            ColSpec(Array(DataType.string), "products"),
            ColSpec(Array(DataType.double), "context", required=False),
        ]),
        outputs=Schema([ColSpec(Array(DataType.string), "top_k")]),
        params=ParamSchema([ParamSpec("k", DataType.long, k)]),
    )


def _pip_requirements() -> list[str]:
    """Pinned to what is installed, so MLflow never pip-freezes or infers (slow, may hit the network)."""
    reqs = []
    for dist in ("torch", "safetensors", "numpy", "pandas", "pydantic", "retailsim_pipeline"):
        try:
            reqs.append(f"{dist}=={importlib_metadata.version(dist)}")
        except importlib_metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _full_vocabulary(vocabulary: Sequence[str], n_products: int) -> list[str]:
    """The code of every token id (specials included); accepts products only and prepends the specials."""
    vocab = [str(v) for v in vocabulary]
    if len(vocab) == n_products - N_SPECIAL:
        vocab = [*SPECIAL_CODES, *vocab]
    if len(vocab) != n_products:
        raise ValueError(
            f"vocabulary has {len(vocabulary)} entries but model_config n_products = {n_products}: pass the code "
            f"of every token id (the cache's vocabulary.parquet PROD_CODE column) or only the "
            f"{n_products - N_SPECIAL} product codes"
        )
    return vocab


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
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


def _run_id_of(logger_or_run_id: "MlflowLogger | str") -> tuple[str, str]:
    if isinstance(logger_or_run_id, MlflowLogger):
        return logger_or_run_id.run_id, logger_or_run_id.tracking_uri
    return str(logger_or_run_id), default_tracking_uri()


def log_world_model(
    logger_or_run_id: "MlflowLogger | str",
    model_config: Mapping[str, Any] | ModelConfig,
    state_dict: Mapping[str, Any],
    vocabulary: Sequence[str],
    *,
    name: str = "world_model",
    input_example=None,
    step: int = 0,
) -> str:
    """Log the world model as a pyfunc LoggedModel of the training run; returns its ``models:/m-<id>`` URI.

    Artifacts: ``config.json`` (``model_config``), ``weights.safetensors`` (``state_dict`` as CPU copies:
    safetensors refuses tensors that share storage) and ``vocabulary.json`` (code of
    every token id; a products-only list gets the three specials prepended). The model carries the
    signature of :func:`_signature`, an input example (two vocabulary products by default) and pinned
    pip requirements. The LoggedModel is created in the run's experiment and recorded as the run's
    output at ``step``, with the run's params.
    """
    from safetensors.torch import save_file

    run_id, tracking_uri = _run_id_of(logger_or_run_id)
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    config = ModelConfig.model_validate(dict(model_config) if isinstance(model_config, Mapping) else model_config)
    vocab = _full_vocabulary(vocabulary, config.n_products)
    if input_example is None:
        input_example = pd.DataFrame({"products": [vocab[N_SPECIAL : N_SPECIAL + 2]]})

    with tempfile.TemporaryDirectory(prefix="world_model_") as tmp:
        config_path = Path(tmp, _CONFIG)
        weights_path = Path(tmp, _WEIGHTS)
        vocabulary_path = Path(tmp, _VOCABULARY)
        config_path.write_text(json.dumps(config.model_dump(mode="json"), indent=2))
        vocabulary_path.write_text(json.dumps(vocab))
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}, str(weights_path))
        # Rebuild once from the files (strict load) before anything is logged: MLflow's own check of the
        # input example only warns, so a config/weights mismatch would otherwise be registered silently.
        _build_world_model(config.model_dump(), weights_path)

        # mlflow.pyfunc.log_model takes no run_id (it uses the fluent active run and the global URI), so
        # the LoggedModel is created here in the run's experiment and passed by model_id, and the run's
        # output is recorded explicitly: no mlflow.start_run, no run ended as a side effect.
        logged = client.create_logged_model(
            experiment_id=run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params={k: str(v) for k, v in run.data.params.items()},
            model_type="retailsim-world-model",
        )
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        with _global_tracking_uri(tracking_uri):
            # Marks the LoggedModel READY on success, FAILED on an exception.
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=WorldModelPyfunc(),
                artifacts={
                    "config": str(config_path),
                    "weights": str(weights_path),
                    "vocabulary": str(vocabulary_path),
                },
                signature=_signature(),
                input_example=input_example,
                pip_requirements=_pip_requirements(),
                model_id=logged.model_id,
            )
    log.info("logged world model %s in run %s", info.model_uri, run_id)
    return info.model_uri


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _client(tracking_uri: str | None) -> MlflowClient:
    """A client whose registry is the tracking store too.

    ``MlflowClient(tracking_uri)`` alone takes its *registry* URI from the process-global default,
    which without ``$MLFLOW_TRACKING_URI`` is ``./mlflow.db``: registering a model logged to our store
    would then look for it in the working directory.
    """
    uri = tracking_uri or default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model (MLflow's ``ModelVersion.version`` is an int on some stores)."""

    name: str
    version: str
    run_id: str | None
    model_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``."""
        return registered_model_uri(self.version, self.name)


def register_world_model(
    model_uri: str,
    *,
    name: str = REGISTERED_MODEL,
    alias: str | None = "challenger",
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> RegisteredVersion:
    """Register ``model_uri`` (``models:/m-<id>``) as a new version of ``name``, point ``alias`` at it, tag it.

    The registered model is created on first use. Setting the alias moves it from whichever version held
    it (an alias names one version at a time). The version records the LoggedModel's source run.
    """
    client = _client(tracking_uri)
    try:
        client.create_registered_model(
            name, description="RetailSim world model: basket (+ context) → next products. See DESIGN §5."
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    run_id = client.get_logged_model(model_id).source_run_id if model_id else None
    # mlflow 3.17's sqlite registry looks the LoggedModel up through a *default* MlflowClient (the
    # process-global tracking URI), not through this client: point the global URI at our store.
    with _global_tracking_uri(client.tracking_uri):
        created = client.create_model_version(
            name,
            source=model_uri,
            run_id=run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
            model_id=model_id,
        )
    if alias:
        client.set_registered_model_alias(name, alias, str(created.version))
    log.info("registered %s version %s (alias %s)", name, created.version, alias)
    mv = client.get_model_version(name, str(created.version))
    return RegisteredVersion(
        name=name,
        version=str(mv.version),
        run_id=mv.run_id,
        model_id=model_id,
        source=mv.source,
        aliases=tuple(mv.aliases),
        tags=dict(mv.tags),
    )


def registered_model_uri(version: str | int, name: str = REGISTERED_MODEL) -> str:
    return f"models:/{name}/{version}"


def get_alias_version(alias: str, name: str = REGISTERED_MODEL, tracking_uri: str | None = None) -> str | None:
    """The version number ``alias`` points at, or None when the alias (or the registered model) is absent."""
    try:
        return str(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def set_alias(version: str | int, alias: str, name: str = REGISTERED_MODEL, tracking_uri: str | None = None) -> None:
    """Point ``alias`` (``champion``/``challenger``) at ``version``; an alias names one version at a time."""
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def load_world_model(model_uri: str, *, tracking_uri: str | None = None, device: str = "cpu"):
    """``(torch module in eval mode, vocabulary)`` from a logged or registered model, for batched scoring.

    ``model_uri``: ``models:/m-<id>``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``, or any
    artifact URI/path of a logged model folder. Only the three artifacts are downloaded and read; the
    pyfunc wrapper is not unpickled.

    Registered URIs are resolved here with an explicit client: MLflow's own ``models:/<name>@<alias>``
    resolution asks the process-global registry and ignores the ``tracking_uri``/``registry_uri``
    passed to ``download_artifacts`` (mlflow 3.17, ``ModelsArtifactRepository._get_model_uri_infos``).
    """
    tracking_uri = tracking_uri or default_tracking_uri()
    location = model_artifact_location(model_uri, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="world_model_") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/artifacts", dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        return _read_artifacts(local / _CONFIG, local / _WEIGHTS, local / _VOCABULARY, device=device)


def model_artifact_location(model_uri: str, *, tracking_uri: str | None = None) -> str:
    """Where a model's files are: a ``models:/…`` URI resolved to its LoggedModel's artifact location."""
    if not model_uri.startswith("models:/"):
        return model_uri
    client = _client(tracking_uri)
    ref = model_uri.removeprefix("models:/").strip("/")
    if ref.startswith("m-") and "/" not in ref:
        model_id = ref
    else:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise ValueError(
                f"{model_uri}: expected models:/m-<id>, models:/<name>@<alias> or models:/<name>/<version>"
            )
        model_id = version.model_id or version.source.removeprefix("models:/")
    return client.get_logged_model(model_id).artifact_location


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def metric_name(name: str) -> str:
    """Our metric names (``recall@10``) as MLflow accepts them (``recall_at_10``: no ``@`` allowed)."""
    return name.replace("@", "_at_")


def metric_history(run_id: str, *, tracking_uri: str | None = None,
                   keys: Sequence[str] = ("train/total", "val/loss", "val/recall_at_10")) -> list[dict]:
    """The training curves of a run as rows ``{"step": s, key: value, …}`` (for the report's plot)."""
    client = _client(tracking_uri)
    rows: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            rows.setdefault(m.step, {"step": m.step})[key] = m.value
    return [rows[s] for s in sorted(rows)]


def log_evaluation(run_id: str, doc: Mapping[str, Any], files: Mapping[str, Path], *,
                   tracking_uri: str | None = None) -> None:
    """Test metrics (``test/…``) on the training run, the report files as artifacts, the decision as tags."""
    client = _client(tracking_uri)
    split = doc["meta"]["split"]
    model = doc["model"]
    metrics = [Metric(f"{split}/{metric_name(k)}", float(v), int(time.time() * 1000), 0)
               for k, v in model.items() if isinstance(v, (int, float)) and k != "n"]
    for name, values in doc["baselines"].items():
        metrics.append(Metric(f"{split}/{name}/recall_at_10", float(values["recall@10"]), int(time.time() * 1000), 0))
    if doc.get("oracle"):
        metrics.append(Metric(f"{split}/oracle/recall_at_10", float(doc["oracle"]["recall@10"]),
                              int(time.time() * 1000), 0))
    for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i: i + _MAX_METRICS_PER_BATCH])
    promotion = doc["promotion"]
    for key in ("decision", "reason", "champion_version", "challenger_version"):
        client.set_tag(run_id, f"retailsim.promotion.{key}", str(promotion.get(key)))
    for path in files.values():
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
