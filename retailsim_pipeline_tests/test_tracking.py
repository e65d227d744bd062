"""Tracking against a real sqlite MLflow store in tmp_path: runs, system metrics, logged and registered models."""

import ast
import json
import math
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import mlflow
from mlflow import MlflowClient
from retailsim_pipeline import tracking
from retailsim_pipeline.config import MODEL_PRESETS, DataPaths, TrainingConfig, training_preset
from retailsim_pipeline.model.world_model import WorldModel
from retailsim_pipeline.training.curves import write_training_curves
from retailsim_pipeline.tracking import (
    REGISTERED_MODEL,
    MetricsLogger,
    MlflowLogger,
    NullLogger,
    get_alias_version,
    load_world_model,
    log_world_model,
    register_world_model,
    set_alias,
)

N_PRODUCTS = 20  # vocabulary = 3 specials + 20 products
VOCABULARY = [f"PRD09{i:05d}" for i in range(N_PRODUCTS)]


@pytest.fixture(scope="module")
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


def _tiny_model(seed: int) -> WorldModel:
    torch.manual_seed(seed)
    config = MODEL_PRESETS["tiny"].model_copy(update={"n_products": 3 + N_PRODUCTS})
    table = torch.randn(config.n_products, config.product_dim)
    model = WorldModel(config, product_embeddings=table)
    # Untrained heads rank nearly at random; perturb every weight so scores clearly differ per product.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# --------------------------------------------------------------------------------------------
# Contracts
# --------------------------------------------------------------------------------------------


def test_only_tracking_imports_mlflow():
    package = Path(tracking.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path == Path(tracking.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == [], f"only tracking.py may import mlflow: {offenders}"


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.default_tracking_uri(DataPaths(tmp_path))
    assert uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert (tmp_path / "mlflow").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.default_tracking_uri(DataPaths(tmp_path)) == "http://127.0.0.1:5999"


def test_flatten_params():
    flat = tracking.flatten_params({"cfg": training_preset("tiny"), "tags": [1, 2], "long": "x" * 7000})
    assert flat["cfg.model.d_model"] == "32"
    assert flat["cfg.loss_weights.focal"] == "0.6"
    assert flat["cfg.max_steps"] == "None"
    assert flat["tags"] == "[1, 2]"
    assert len(flat["long"]) == 6000
    assert all(isinstance(v, str) for v in flat.values())


def test_null_logger(tmp_path):
    logger = NullLogger()
    assert isinstance(logger, MetricsLogger)
    with logger as lg:
        lg.log_params({"a": {"b": 1}})
        lg.log_metrics({"train/loss": 1.0}, step=0)
        lg.set_tags({"x": "y"})
        lg.log_dict({"a": 1}, "a.json")
        lg.log_artifact(tmp_path / "missing.png")
    logger.close()
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def test_run_logs_params_metrics_tags_artifacts_and_system_metrics(tracking_uri, tmp_path, monkeypatch):
    # MLflow's environment variables override the monitor's arguments: pin them to a short interval.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    config = TrainingConfig()
    history = []
    with MlflowLogger(tracking_uri, run_name="unit", tags={"dagster/run_id": "abc"},
                      system_metrics_interval=0.2) as logger:
        assert isinstance(logger, MetricsLogger)
        logger.log_params(config.model_dump(mode="json"))
        for step in (0, 5, 10):
            row = {"train/loss": 3.0 - 0.1 * step, "train/focal": 2.0 - 0.1 * step}
            logger.log_metrics(row, step=step)
            history.append({"step": step, **row})
        logger.log_metrics({"val/loss": 2.5}, step=10)
        history.append({"step": 10, "val/loss": 2.5, "train/loss": math.nan})
        logger.set_tags({"cache_version": "v1", "asset_key": "trained_world_model"})
        logger.log_dict({"preset": "tiny", "n": 3}, "config/training.json")
        logger.log_artifact(write_training_curves(history, tmp_path / "curves.png"), artifact_path="plots")
        time.sleep(1.0)  # > several sampling intervals of the system metrics monitor
        run_id = logger.run_id
        assert logger.run_url().endswith(f"/#/experiments/{logger.experiment_id}/runs/{run_id}")

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unit"
    params = run.data.params
    assert params["model.d_model"] == str(config.model.d_model)
    assert params["loss_weights.focal"] == "0.6"
    assert params["epochs"] == "20"
    assert len(params) == len(tracking.flatten_params(config))
    history_loss = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in history_loss] == [(0, 3.0), (5, 2.5), (10, 2.0)]
    assert run.data.metrics["val/loss"] == 2.5
    tags = run.data.tags
    assert tags["dagster/run_id"] == "abc" and tags["cache_version"] == "v1"
    assert tags["asset_key"] == "trained_world_model"

    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert system, f"no system metrics logged; metrics: {sorted(run.data.metrics)}"
    assert "system/cpu_utilization_percentage" in system

    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == tracking.EXPERIMENT
    assert exp.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()
    assert json.loads(Path(client.download_artifacts(run_id, "config/training.json", str(tmp_path))).read_text()) \
        == {"preset": "tiny", "n": 3}
    png = Path(client.download_artifacts(run_id, "plots/curves.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_run_and_failed_status(tracking_uri):
    with pytest.raises(RuntimeError):
        with MlflowLogger(tracking_uri, system_metrics=False) as logger:
            logger.log_params({"model": {"d_model": 32}})
            logger.log_metrics({"train/loss": 1.0}, step=1)
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri)
    assert client.get_run(logger.run_id).info.status == "FAILED"

    resumed = MlflowLogger(tracking_uri, run_id=logger.run_id, system_metrics=False)
    assert client.get_run(logger.run_id).info.status == "RUNNING"
    resumed.log_params({"model": {"d_model": 32}, "epochs": 2})  # same value again: skipped, new one added
    with pytest.raises(ValueError, match="model.d_model"):
        resumed.log_params({"model": {"d_model": 64}})
    resumed.log_metrics({"train/loss": 0.5}, step=2)
    resumed.close()
    resumed.close()  # idempotent
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.d_model": "32", "epochs": "2"}
    assert [m.step for m in client.get_metric_history(logger.run_id, "train/loss")] == [1, 2]


def test_training_curves_tolerate_gaps(tmp_path):
    path = write_training_curves(
        [{"step": 0, "train/loss": 1.0}, {"step": 1, "train/loss": float("inf"), "val/loss": 2.0}, {"x": "a"}],
        tmp_path / "sub" / "c.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert write_training_curves([], tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()


# --------------------------------------------------------------------------------------------
# Logged and registered models
# --------------------------------------------------------------------------------------------


def test_log_register_and_serve_world_model(tracking_uri, empty_store, tmp_path, monkeypatch):
    client = MlflowClient(tracking_uri)
    models = [_tiny_model(0), _tiny_model(1)]
    uris = []
    with MlflowLogger(tracking_uri, system_metrics=False) as logger:
        logger.log_params({"model": models[0].config.model_dump()})
        for model in models:
            uris.append(log_world_model(logger, models[0].config.model_dump(), model.state_dict(), VOCABULARY))
    assert all(u.startswith("models:/m-") for u in uris) and uris[0] != uris[1]
    # Logging used MLflow's global URI for one call only: the environment default is left as it was.
    assert os.environ["MLFLOW_TRACKING_URI"] == tracking_uri == mlflow.get_tracking_uri()

    # LoggedModel: in the run's experiment, attached to the run, READY, with the run's params.
    logged = client.get_logged_model(uris[0].removeprefix("models:/"))
    assert logged.source_run_id == logger.run_id
    assert logged.experiment_id == logger.experiment_id
    assert str(logged.status) in ("READY", "LoggedModelStatus.READY")
    assert logged.params["model.d_model"] == "32"
    assert logged.artifact_location.startswith((tmp_path / "mlflow" / "artifacts").as_uri())
    run = client.get_run(logger.run_id)
    assert {o.model_id for o in run.outputs.model_outputs} == {u.removeprefix("models:/") for u in uris}

    # Artifacts: config, safetensors weights, vocabulary; no pickled weights anywhere.
    local = Path(mlflow.artifacts.download_artifacts(uris[0], dst_path=str(tmp_path / "m0")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"artifacts/config.json", "artifacts/weights.safetensors", "artifacts/vocabulary.json", "MLmodel",
            "requirements.txt"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".ckpt"))]
    pickles = [f for f in files if f.endswith((".pkl", ".pickle"))]
    assert pickles == ["python_model.pkl"]  # the stateless wrapper (see tracking's docstring), tiny
    assert (local / "python_model.pkl").stat().st_size < 20_000
    assert json.loads((local / "artifacts/vocabulary.json").read_text())[3:] == VOCABULARY
    requirements = (local / "requirements.txt").read_text()
    assert "safetensors==" in requirements and "retailsim_pipeline==" in requirements
    assert "input_example.json" in files or "serving_input_example.json" in files
    signature = mlflow.models.Model.load(str(local / "MLmodel")).signature
    assert signature.inputs.input_names() == ["products", "context"]
    assert signature.outputs.input_names() == ["top_k"] and signature.params.to_dict()[0]["name"] == "k"

    # Registry: v1 challenger, then v2 takes the alias.
    v1 = register_world_model(uris[0], tags={"cache_version": "v1"}, tracking_uri=tracking_uri)
    assert v1.version == "1" and v1.tags["cache_version"] == "v1" and v1.aliases == ("challenger",)
    assert v1.run_id == logger.run_id and v1.uri == "models:/retailsim-world-model/1"
    assert get_alias_version("challenger", tracking_uri=tracking_uri) == "1"
    assert get_alias_version("champion", tracking_uri=tracking_uri) is None
    v2 = register_world_model(uris[1], tracking_uri=tracking_uri)
    assert v2.version == "2" and v2.model_id == uris[1].removeprefix("models:/")
    assert get_alias_version("challenger", tracking_uri=tracking_uri) == "2"
    set_alias("1", "champion", tracking_uri=tracking_uri)
    assert get_alias_version("champion") == "1"  # env default store
    assert get_alias_version("challenger", name="no-such-model") is None
    assert tracking.registered_model_uri(v2.version) == "models:/retailsim-world-model/2"

    # Serving through pyfunc equals scoring the torch module directly.
    baskets = pd.DataFrame({"products": [VOCABULARY[:3], [VOCABULARY[5], "PRD_NOT_IN_VOCAB"], []]})
    served = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@challenger")
    out = served.predict(baskets)
    assert list(out.columns) == ["top_k"] and len(out) == 3
    for basket, top in zip(baskets["products"], out["top_k"]):
        assert len(top) == 10 and len(set(top)) == 10
        assert set(top) <= set(VOCABULARY)
        assert not set(top) & set(basket)
    direct = tracking.top_k_codes(models[1], [*tracking.SPECIAL_CODES, *VOCABULARY], baskets, k=10)
    assert [list(t) for t in out["top_k"]] == direct
    assert [list(t) for t in out["top_k"]] != tracking.top_k_codes(
        models[0], [*tracking.SPECIAL_CODES, *VOCABULARY], baskets, k=10)  # the alias really moved

    # K via params; an explicit context changes the ranking input.
    assert all(len(t) == 15 for t in served.predict(baskets, params={"k": 15})["top_k"])
    with_ctx = baskets.assign(context=[[0.5] * 400] * 3)
    assert [list(t) for t in served.predict(with_ctx)["top_k"]] == tracking.top_k_codes(
        models[1], [*tracking.SPECIAL_CODES, *VOCABULARY], with_ctx, k=10)

    # The raw module for batched scoring: the same weights, rebuilt from safetensors. The explicit store
    # wins over the environment's (pointed at another, empty store here).
    shutil.copy(empty_store, tmp_path / "other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert get_alias_version("champion") is None
    module, vocabulary = load_world_model(f"models:/{REGISTERED_MODEL}@champion", tracking_uri=tracking_uri)
    assert isinstance(module, WorldModel) and not module.training
    assert vocabulary[3:] == VOCABULARY
    for key, value in models[0].state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
    for uri in (uris[1], v2.uri):
        module, _ = load_world_model(uri, tracking_uri=tracking_uri)
        torch.testing.assert_close(module.state_dict()["product_table"], models[1].state_dict()["product_table"])


def test_log_world_model_rejects_mismatches(tracking_uri):
    model = _tiny_model(0)
    with MlflowLogger(tracking_uri, system_metrics=False) as logger:
        with pytest.raises(ValueError, match="n_products = 23"):
            log_world_model(logger, model.config.model_dump(), model.state_dict(), VOCABULARY[:-1])
        wrong = model.config.model_copy(update={"d_model": 64}).model_dump()
        with pytest.raises(RuntimeError, match="size mismatch"):
            log_world_model(logger.run_id, wrong, model.state_dict(), VOCABULARY)
    assert MlflowClient(tracking_uri).search_logged_models([logger.experiment_id]) == []
