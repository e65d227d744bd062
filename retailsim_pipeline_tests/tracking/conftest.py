"""A real sqlite MLflow store in tmp_path for every tracking test, and two logged tiny models with the
serving features of the tiny data's tensor cache."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from retailsim_pipeline.model.world_model import WorldModel
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.requests import ServingFeatures
from retailsim_pipeline.tracking import MlflowLogger, log_world_model
from retailsim_pipeline_tests.tracking.world_models import tiny_model


@dataclass
class TinyServing:
    cache: TensorCache
    features: ServingFeatures
    samples: Path


@pytest.fixture(scope="session")
def tiny_serving(tiny_prepped) -> TinyServing:
    cache = TensorCache.latest(tiny_prepped.cache)
    return TinyServing(cache, ServingFeatures.from_cache(cache, tiny_prepped.samples), tiny_prepped.samples)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite database (creating the schema takes seconds; copying it does not)."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tracking_uri(empty_store, tmp_path, monkeypatch) -> str:
    """A fresh sqlite store; also the env default, so `models:/…` URIs resolve against it."""
    (tmp_path / "mlflow").mkdir()
    shutil.copy(empty_store, tmp_path / "mlflow" / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return uri


@dataclass
class LoggedModels:
    run_id: str
    experiment_id: str
    models: list[WorldModel]  # seeds 0 and 1, same config
    uris: list[str]  # their models:/m-<id>, in the same order
    serving: TinyServing


@pytest.fixture
def logged_models(tracking_uri, tiny_serving) -> LoggedModels:
    """Two tiny models logged by :func:`log_world_model` in one finished training run."""
    models = [tiny_model(0, tiny_serving.cache), tiny_model(1, tiny_serving.cache)]
    with MlflowLogger(tracking_uri, system_metrics=False) as logger:
        logger.log_params({"model": models[0].config.model_dump()})
        uris = [log_world_model(logger, models[0].config.model_dump(), m.state_dict(), tiny_serving.features)
                for m in models]
    return LoggedModels(logger.run_id, logger.experiment_id, models, uris, tiny_serving)
