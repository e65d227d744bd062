"""The world model as an MLflow pyfunc: what a logged model holds, what it takes and what it returns.

The contract of a served model, which every serving model added here keeps:

- **Logged as** a pyfunc *LoggedModel* (``models:/m-<id>``) attached to its training run by
  :func:`log_world_model`. Its artifacts are ``config.json`` (the :class:`ModelConfig`),
  ``weights.safetensors`` (the state dict), ``vocabulary.json`` (the product code of every token id, the
  specials first) and ``features/`` (:class:`~retailsim_pipeline.prep.requests.ServingFeatures`: the
  tensor cache's fitted tables and the basket log, in JSON, parquet and safetensors). It carries an
  explicit signature (:func:`_signature`, written out rather than inferred), an input example and pinned
  pip requirements (:func:`_pip_requirements`).
- **No pickled state.** ``load_context`` rebuilds ``WorldModel(ModelConfig(**config.json))`` from the
  safetensors weights (strict load, eval mode, CPU) and reads the features folder. Unpickling runs
  arbitrary code and a pickled ``nn.Module`` breaks as soon as the class changes; safetensors are plain
  tensors, safe to load from anyone. MLflow's ``pytorch`` flavor is not used: it either pickles the
  module or exports a ``torch.export`` graph that loads back as a ``GraphModule`` instead of our class.
- **The class path is part of every logged model.** MLflow cloudpickles the small, stateless wrapper
  (``python_model.pkl``) *by reference*: it records ``retailsim_pipeline.tracking.serving.WorldModelPyfunc``
  and imports it when the model is loaded, which is why this project is one of the model's pip
  requirements. Moving or renaming a serving class breaks every model logged with the old path unless
  that path still resolves: models logged before ``tracking`` became a package name
  ``retailsim_pipeline.tracking.WorldModelPyfunc``, which ``tracking/__init__.py`` re-exports for them.
- **Input**: what a store system knows while a basket is filled, one row per basket: ``customer_code``
  (optional), ``store_code``, ``timestamp`` (ISO text, date and hour), ``products`` (the basket so far,
  product codes), optionally ``quantities`` and ``spend`` per line and the till's ``basket_id``
  (:mod:`~retailsim_pipeline.prep.requests` has the exact rules). Over HTTP (``mlflow models serve``) an
  optional column goes in every record of a request or in none: MLflow's schema enforcement runs before
  ``predict`` and rejects a record that lacks it (NaN); a null list (``quantities``, ``spend``) is "not
  given", a null ``basket_id`` is rejected too. A request the model cannot read
  raises :class:`RequestError` (HTTP 400, the message names row and column). The customer's memory, trip context,
  profile, the store and the time features are computed from the model's own ``features/`` by the
  functions that built its tensor cache.
- **Output**: a DataFrame with ``top_k`` (per row K product codes, best first, never a special token and
  never a product of the basket), ``scores`` (their logits) and ``unknown_products`` (how many of the
  row's products the model's vocabulary does not hold; they enter as UNK). **Param** ``k`` (default
  :data:`DEFAULT_TOP_K`), clipped to 1 … number of products; a ``k`` above the products left outside
  some row's basket is a ``ValueError``.
- **One scoring function.** ``predict`` is :func:`rank_requests`, which asks the model exactly what the
  evaluation asks it (:func:`~retailsim_pipeline.evaluation.positions.completion_batch`: the visible
  products, then one slot to fill). So the served ranking of a basket is the evaluated one, and batch
  scoring (``retailsim predict``) and the champion's re-scoring go through the same function.

Loading a model back for batched scoring, and the registry, are in :mod:`retailsim_pipeline.tracking.registry`.
"""

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd  # an mlflow dependency; the pyfunc's input type
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from retailsim_pipeline.config import N_SPECIAL, SPECIAL_CODES, ModelConfig
from retailsim_pipeline.tracking.runs import MlflowLogger, default_tracking_uri, global_tracking_uri, mlflow_client

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 10

# Artifact names inside the logged model (``artifacts/<name>``; ``context.artifacts`` keys are
# ``config``, ``weights``, ``vocabulary``, ``features``).
_CONFIG = "config.json"
_WEIGHTS = "weights.safetensors"
_VOCABULARY = "vocabulary.json"
_FEATURES = "features"


# --------------------------------------------------------------------------------------------
# Rebuilding the torch module from the artifacts
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


def read_world_model(artifacts_dir: str | Path, device: str = "cpu"):
    """``(torch module in eval mode, vocabulary)`` from a downloaded model's ``artifacts/`` folder."""
    folder = Path(artifacts_dir)
    return _read_artifacts(folder / _CONFIG, folder / _WEIGHTS, folder / _VOCABULARY, device=device)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """A logged model read back: the torch module (eval mode), its vocabulary and its serving features."""

    model: Any
    vocabulary: list[str]
    features: Any  # ServingFeatures, or None for a model logged without them

    def rank(self, requests, k: int = DEFAULT_TOP_K, **kwargs) -> pd.DataFrame:
        if self.features is None:
            raise ValueError("this model was logged without its serving features (artifacts/features): "
                             "it cannot turn requests into inputs; log it again with log_world_model(features=…)")
        return rank_requests(self.model, self.features, requests, k, **kwargs)


def read_served_model(artifacts_dir: str | Path, device: str = "cpu") -> ServedModel:
    """:class:`ServedModel` from a downloaded model's ``artifacts/`` folder."""
    from retailsim_pipeline.prep.requests import ServingFeatures

    folder = Path(artifacts_dir)
    model, vocabulary = read_world_model(folder, device=device)
    features = ServingFeatures.load(folder / _FEATURES) if (folder / _FEATURES).is_dir() else None
    return ServedModel(model, vocabulary, features)


def rank_requests(model, features, requests, k: int = DEFAULT_TOP_K, *, batch_size: int = 512,
                  device: str | None = None) -> pd.DataFrame:
    """The served ranking: requests (see :mod:`~retailsim_pipeline.prep.requests`) → ``top_k``, ``scores``,
    ``unknown_products`` per row, in request order; the scores are
    :func:`~retailsim_pipeline.evaluation.positions.request_logits`, the evaluation's own computation.
    """
    import torch

    from retailsim_pipeline.evaluation.positions import request_logits

    vocabulary = features.product_codes
    V = len(vocabulary)
    if V != model.config.n_products:
        raise ValueError(f"the serving features hold {V} tokens, the model {model.config.n_products}")
    k = max(1, min(int(k), V - N_SPECIAL))
    unknown = features.count_unknown(requests)
    top, scores = [], []
    for rows, logits, tokens in request_logits(model, features, requests, batch_size=batch_size, device=device):
        logits[:, :N_SPECIAL] = float("-inf")
        logits.scatter_(1, tokens, float("-inf"))  # the basket's own products (PAD and MASK are specials)
        allowed = torch.isfinite(logits).sum(dim=1)
        if int(allowed.min()) < k:
            i = int(rows[int(allowed.argmin())])
            raise ValueError(f"k={k} exceeds the {int(allowed.min())} products outside request row {i}'s basket")
        value, index = logits.topk(k, dim=1)
        top += [[vocabulary[int(t)] for t in row] for row in index.cpu()]
        scores += value.cpu().tolist()
    return pd.DataFrame({"top_k": top, "scores": scores, "unknown_products": unknown})


class RequestError(MlflowException, ValueError):
    """A request the model cannot score (the message names the row and column): HTTP 400 from
    ``mlflow models serve``, a ``ValueError`` in process."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class WorldModelPyfunc(mlflow.pyfunc.PythonModel):
    """Serves the world model as "what the client knows about a basket → top-k next products" (see the
    module docstring).

    ``load_context`` rebuilds the torch module and reads the serving features from the logged artifacts;
    ``predict`` is :func:`rank_requests`. The instance holds no state before ``load_context``, so the
    cloudpickled wrapper is a reference to this class and nothing more.
    """

    def load_context(self, context) -> None:
        from retailsim_pipeline.prep.requests import ServingFeatures

        self.model, self.vocabulary = _read_artifacts(
            context.artifacts["config"], context.artifacts["weights"], context.artifacts["vocabulary"]
        )
        self.features = ServingFeatures.load(Path(context.artifacts["features"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", DEFAULT_TOP_K))
        try:
            return rank_requests(self.model, self.features, model_input, k)
        except ValueError as err:
            # The scoring server answers any other exception with a generic message and a stack trace:
            # an MlflowException of INVALID_PARAMETER_VALUE becomes an HTTP 400 that carries our message
            # (row and column). Still a ValueError for in-process callers.
            raise RequestError(str(err)) from err


# --------------------------------------------------------------------------------------------
# Logging the model
# --------------------------------------------------------------------------------------------


def _signature(k: int = DEFAULT_TOP_K) -> ModelSignature:
    """The request columns of :mod:`~retailsim_pipeline.prep.requests` in, ``top_k``/``scores``/
    ``unknown_products`` out, param ``k``. Written out rather than inferred from the input example:
    inference would make the optional columns required."""
    return ModelSignature(
        inputs=Schema([
            ColSpec(DataType.string, "customer_code", required=False),
            ColSpec(DataType.string, "store_code"),
            ColSpec(DataType.string, "timestamp"),
            ColSpec(Array(DataType.string), "products"),
            ColSpec(Array(DataType.long), "quantities", required=False),
            ColSpec(Array(DataType.double), "spend", required=False),
            ColSpec(DataType.long, "basket_id", required=False),
        ]),
        outputs=Schema([ColSpec(Array(DataType.string), "top_k"), ColSpec(Array(DataType.double), "scores"),
                        ColSpec(DataType.long, "unknown_products")]),
        params=ParamSchema([ParamSpec("k", DataType.long, k)]),
    )


def _pip_requirements() -> list[str]:
    """Pinned to what is installed, so MLflow never pip-freezes or infers (slow, may hit the network)."""
    reqs = []
    for dist in ("torch", "safetensors", "numpy", "pandas", "polars", "pydantic", "retailsim_pipeline"):
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


def _input_example(features) -> pd.DataFrame:
    """One request: the log's last basket (customer, store, time, first two products, their spend)."""
    last = features.baskets.sort("date", "hour", "basket_id").tail(1).row(0, named=True)
    return pd.DataFrame({
        "customer_code": [None if last["cust_code"] is None else str(last["cust_code"])],
        "store_code": [str(last["store_code"])],
        "timestamp": [f"{last['date'].isoformat()}T{int(last['hour']):02d}:00:00"],
        "products": [[str(c) for c in last["products"][:2]]],
        "quantities": [[int(q) for q in last["quantity"][:2]]],
        "spend": [[float(v) for v in last["spend"][:2]]],
    }) if features.baskets.height else pd.DataFrame({"store_code": ["0"], "timestamp": ["2007-01-01T10:00:00"],
                                                        "products": [[]]})


def _run_id_of(logger_or_run_id: MlflowLogger | str) -> tuple[str, str]:
    if isinstance(logger_or_run_id, MlflowLogger):
        return logger_or_run_id.run_id, logger_or_run_id.tracking_uri
    return str(logger_or_run_id), default_tracking_uri()


def log_world_model(
    logger_or_run_id: MlflowLogger | str,
    model_config: Mapping[str, Any] | ModelConfig,
    state_dict: Mapping[str, Any],
    features,
    *,
    name: str = "world_model",
    input_example=None,
    step: int = 0,
) -> str:
    """Log the world model as a pyfunc LoggedModel of the training run; returns its ``models:/m-<id>`` URI.

    Artifacts: ``config.json`` (``model_config``), ``weights.safetensors`` (``state_dict`` as CPU copies:
    safetensors refuses tensors that share storage), ``vocabulary.json`` (the code of every token id) and
    ``features/`` (``features``: the :class:`~retailsim_pipeline.prep.requests.ServingFeatures` of the
    tensor cache the model was trained on). The model carries the signature of :func:`_signature`, an
    input example (by default the log's last basket's customer, store, time and first two products;
    MLflow scores it, a check of the whole path) and pinned pip requirements. The LoggedModel is created
    in the run's experiment and recorded as the run's output at ``step``, with the run's params.
    """
    from safetensors.torch import save_file

    run_id, tracking_uri = _run_id_of(logger_or_run_id)
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    config = ModelConfig.model_validate(dict(model_config) if isinstance(model_config, Mapping) else model_config)
    vocab = _full_vocabulary(features.product_codes, config.n_products)
    if input_example is None:
        input_example = _input_example(features)

    with tempfile.TemporaryDirectory(prefix="world_model_") as tmp:
        config_path = Path(tmp, _CONFIG)
        weights_path = Path(tmp, _WEIGHTS)
        vocabulary_path = Path(tmp, _VOCABULARY)
        config_path.write_text(json.dumps(config.model_dump(mode="json"), indent=2))
        vocabulary_path.write_text(json.dumps(vocab))
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}, str(weights_path))
        features_path = Path(tmp, _FEATURES)
        features.save(features_path)
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
        with global_tracking_uri(tracking_uri):
            # Marks the LoggedModel READY on success, FAILED on an exception.
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=WorldModelPyfunc(),
                artifacts={
                    "config": str(config_path),
                    "weights": str(weights_path),
                    "vocabulary": str(vocabulary_path),
                    "features": str(features_path),
                },
                signature=_signature(),
                input_example=input_example,
                pip_requirements=_pip_requirements(),
                model_id=logged.model_id,
            )
    log.info("logged world model %s in run %s", info.model_uri, run_id)
    return info.model_uri
