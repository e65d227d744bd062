"""The world model as an MLflow pyfunc: what a logged model holds, what it takes and what it returns.

The contract of a served model (DESIGN §8), which every serving model added here keeps:

- **Logged as** a pyfunc *LoggedModel* (``models:/m-<id>``) attached to its training run by
  :func:`log_world_model`. Its artifacts are ``config.json`` (the :class:`ModelConfig`),
  ``weights.safetensors`` (the state dict) and ``vocabulary.json`` (the product code of every token
  id, the specials first); it carries an explicit signature (:func:`_signature`, written out rather
  than inferred), an input example and pinned pip requirements (:func:`_pip_requirements`: torch,
  safetensors, numpy, pandas, pydantic and this project; no polars, no dagster).
- **No pickled state.** ``load_context`` rebuilds ``WorldModel(ModelConfig(**config.json))`` from the
  safetensors weights (strict load, eval mode, CPU). Unpickling runs arbitrary code and a pickled
  ``nn.Module`` breaks as soon as the class changes; safetensors are plain tensors, safe to load from
  anyone. MLflow's ``pytorch`` flavor is not used: it either pickles the module or exports a
  ``torch.export`` graph that loads back as a ``GraphModule`` instead of our class.
- **The class path is part of every logged model.** MLflow cloudpickles the small, stateless wrapper
  (``python_model.pkl``) *by reference*: it records ``retailsim_pipeline.tracking.serving.WorldModelPyfunc``
  and imports it when the model is loaded, which is why this project is one of the model's pip
  requirements. Moving or renaming a serving class breaks every model logged with the old path unless
  that path still resolves: models logged before ``tracking`` became a package name
  ``retailsim_pipeline.tracking.WorldModelPyfunc``, which ``tracking/__init__.py`` re-exports for them.
- **Input** (:class:`WorldModelPyfunc`): a DataFrame with ``products`` (required: list of product
  codes, the visible basket; cut to ``max_basket_len``; unknown codes map to UNK) and ``context``
  (optional: 400 floats per row, customer | temporal | store | trip; zeros when absent or null).
  Price features are zero: a served basket has no observed prices.
- **Output**: a DataFrame with ``top_k``: per row a list of K product codes, best first, never a special
  token and never a product of the basket. **Param** ``k`` (default :data:`DEFAULT_TOP_K`), clipped to
  1 … number of products; a ``k`` above the products left outside some row's basket is a ``ValueError``.
- **One scoring function.** The wrapper's ``predict`` is :func:`top_k_codes` on the loaded module, so
  batch scoring and tests can score the raw module (``registry.load_world_model``) exactly as served.

Loading a model back for batched scoring, and the registry, are in :mod:`retailsim_pipeline.tracking.registry`.
"""

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd  # an mlflow dependency; the pyfunc's input type
from mlflow.entities import LoggedModelOutput
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from retailsim_pipeline.config import N_SPECIAL, PAD, SPECIAL_CODES, UNK, ModelConfig
from retailsim_pipeline.tracking.runs import MlflowLogger, default_tracking_uri, global_tracking_uri, mlflow_client

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 10

# Artifact file names inside the logged model (``artifacts/<name>``; ``context.artifacts`` keys are
# ``config``, ``weights``, ``vocabulary``).
_CONFIG = "config.json"
_WEIGHTS = "weights.safetensors"
_VOCABULARY = "vocabulary.json"


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


class WorldModelPyfunc(mlflow.pyfunc.PythonModel):
    """Serves the world model as "basket (+ context) → top-k next products" (see the module docstring).

    ``load_context`` rebuilds the torch module from the logged artifacts; ``predict`` is
    :func:`top_k_codes`. The instance holds no state before ``load_context``, so the cloudpickled
    wrapper is a reference to this class and nothing more.
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


# --------------------------------------------------------------------------------------------
# Logging the model
# --------------------------------------------------------------------------------------------


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


def _run_id_of(logger_or_run_id: MlflowLogger | str) -> tuple[str, str]:
    if isinstance(logger_or_run_id, MlflowLogger):
        return logger_or_run_id.run_id, logger_or_run_id.tracking_uri
    return str(logger_or_run_id), default_tracking_uri()


def log_world_model(
    logger_or_run_id: MlflowLogger | str,
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
    client = mlflow_client(tracking_uri)
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
        with global_tracking_uri(tracking_uri):
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
