"""The graph-backed trained_world_model asset, materialized for real: Pipes subprocess, MLflow, registry."""

import dagster as dg
import mlflow
import pytest

from retailsim_pipeline import tracking
from retailsim_pipeline.definitions import defs
from retailsim_pipeline.defs.runner import materialize_selection
from retailsim_pipeline.defs.training_assets import TrainSettings, resolve_training_config, training_command


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def test_launchpad_settings_resolve_to_the_preset_plus_overrides():
    cfg = resolve_training_config(TrainSettings(preset="tiny", epochs=5, model={"d_model": 48}))
    assert cfg.preset == "tiny" and cfg.epochs == 5 and cfg.model.d_model == 48
    assert cfg.model.mamba_num_layers == 1  # untouched fields keep the preset's value
    assert resolve_training_config(TrainSettings()).model.d_model == 128  # demo by default
    assert training_command(cfg)[1:] == ["-m", "retailsim_pipeline.training"]
    torchrun = training_command(cfg.model_copy(update={"n_gpus": 4}))
    assert "--nproc-per-node=4" in torchrun and torchrun[-1] == "retailsim_pipeline.training"


def test_trained_world_model_through_pipes_and_mlflow(tiny_copy, instance, tmp_path, monkeypatch):
    # The project's default store: sqlite under the data root (no MLFLOW_TRACKING_URI), and nothing
    # may land in the working directory.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tiny_copy.mlflow / 'mlflow.db'}"
    report = materialize_selection("key:tensor_cache+ or key:raw_transactions or key:basket_samples",
                                   tiny_copy, instance=instance, defs=defs, progress=False,
                                   training_preset="tiny")
    assert report.success, report.failures
    assert "trained_world_model" in report.assets_materialized

    event = instance.get_latest_materialization_event(dg.AssetKey("trained_world_model"))
    meta = event.asset_materialization.metadata
    assert meta["model_version"].value == "1" and meta["preset"].value == "tiny"
    assert meta["parameters"].value > 10_000 and meta["best_val_loss"].value > 0
    assert meta["mlflow_run"].value.startswith("http://127.0.0.1:5000/")
    run_id = meta["mlflow_run_id"].value

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "32"
    assert run.data.tags["dagster.asset_key"] == "trained_world_model"
    assert run.data.tags["dagster.run_id"] == event.run_id
    assert "val/loss" in run.data.metrics and "train/total" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"training_curves.png", "training_config.json"} <= artifacts
    assert tracking.get_alias_version("challenger", tracking_uri=uri) == "1"
    model, vocabulary = tracking.load_world_model("models:/retailsim-world-model@challenger", tracking_uri=uri)
    assert len(vocabulary) == model.config.n_products
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
