"""Runs against a real sqlite MLflow store: params, metrics, tags, artifacts, system metrics, resume, recovery."""

import ast
import json
import math
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import retailsim_pipeline
from retailsim_pipeline import tracking
from retailsim_pipeline.config import DataPaths, TrainingConfig, training_preset
from retailsim_pipeline.tracking import MetricsLogger, MlflowLogger
from retailsim_pipeline.training.curves import write_training_curves


def test_only_tracking_imports_mlflow():
    package = Path(retailsim_pipeline.__file__).parent
    tracking_package = Path(tracking.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.is_relative_to(tracking_package):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == [], f"only tracking/ may import mlflow: {offenders}"


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
    # The report's curves read the same history back, one row per step.
    curves = tracking.metric_history(run_id, tracking_uri=tracking_uri, keys=("train/loss", "val/loss"))
    assert [(r["step"], round(r["train/loss"], 6)) for r in curves] == [(0, 3.0), (5, 2.5), (10, 2.0)]
    assert curves[-1]["val/loss"] == 2.5 and "val/loss" not in curves[0]
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


def test_close_orphaned_runs_ends_only_runs_of_dead_processes(tracking_uri):
    def running(pid: int | None) -> str:
        tags = {} if pid is None else {tracking.PID_TAG: pid, tracking.HOST_TAG: "here"}
        return MlflowLogger(tracking_uri, tags=tags, system_metrics=False).run_id

    dead, alive, untagged = running(111), running(222), running(None)
    assert tracking.close_orphaned_runs(tracking_uri, lambda pid, host: pid == 222) == [dead]
    client = MlflowClient(tracking_uri)
    status = {run_id: client.get_run(run_id).info.status for run_id in (dead, alive, untagged)}
    assert status == {dead: "KILLED", alive: "RUNNING", untagged: "RUNNING"}
    assert client.get_run(dead).data.tags["retailsim.ended_by"].startswith("recovery")
