"""The world model as an MLflow pyfunc: what a logged model holds, and that serving it equals scoring the module."""

import json
import os
import pickle
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from retailsim_pipeline import tracking
from retailsim_pipeline.config import PAD, SPECIAL_CODES, UNK
from retailsim_pipeline.tracking import MlflowLogger, log_world_model, top_k_codes
from retailsim_pipeline.tracking.serving import WorldModelPyfunc, encode_baskets
from retailsim_pipeline_tests.tracking.world_models import VOCABULARY, tiny_model

FULL_VOCABULARY = [*SPECIAL_CODES, *VOCABULARY]


def test_encode_baskets_pads_cuts_and_maps_unknown_codes():
    token_of = {code: i for i, code in enumerate(FULL_VOCABULARY) if i >= len(SPECIAL_CODES)}
    tokens, mask = encode_baskets([VOCABULARY[:4], ["nope"], []], token_of, max_len=3)
    assert tokens.tolist() == [[3, 4, 5], [UNK, PAD, PAD], [PAD, PAD, PAD]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert encode_baskets([[]], token_of, max_len=3)[0].shape == (1, 1)  # S ≥ 1


def test_logged_model_holds_config_weights_vocabulary_and_its_contract(tracking_uri, logged_models, tmp_path):
    client = MlflowClient(tracking_uri)
    uris = logged_models.uris
    assert all(u.startswith("models:/m-") for u in uris) and uris[0] != uris[1]
    # Logging used MLflow's global URI for one call only: the environment default is left as it was.
    assert os.environ["MLFLOW_TRACKING_URI"] == tracking_uri == mlflow.get_tracking_uri()

    # LoggedModel: in the run's experiment, attached to the run, READY, with the run's params.
    logged = client.get_logged_model(uris[0].removeprefix("models:/"))
    assert logged.source_run_id == logged_models.run_id
    assert logged.experiment_id == logged_models.experiment_id
    assert str(logged.status) in ("READY", "LoggedModelStatus.READY")
    assert logged.params["model.d_model"] == "32"
    assert logged.artifact_location.startswith((tmp_path / "mlflow" / "artifacts").as_uri())
    run = client.get_run(logged_models.run_id)
    assert {o.model_id for o in run.outputs.model_outputs} == {u.removeprefix("models:/") for u in uris}

    # Artifacts: config, safetensors weights, vocabulary; no pickled weights anywhere.
    local = Path(mlflow.artifacts.download_artifacts(uris[0], dst_path=str(tmp_path / "m0")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"artifacts/config.json", "artifacts/weights.safetensors", "artifacts/vocabulary.json", "MLmodel",
            "requirements.txt"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".ckpt"))]
    pickles = [f for f in files if f.endswith((".pkl", ".pickle"))]
    assert pickles == ["python_model.pkl"]  # the stateless wrapper (see serving's docstring), tiny
    wrapper = (local / "python_model.pkl").read_bytes()
    assert len(wrapper) < 20_000
    # Pickled by reference to the class's module path: moving the class changes what logged models import.
    assert b"retailsim_pipeline.tracking.serving" in wrapper and b"WorldModelPyfunc" in wrapper
    assert json.loads((local / "artifacts/vocabulary.json").read_text()) == FULL_VOCABULARY
    requirements = (local / "requirements.txt").read_text()
    assert "safetensors==" in requirements and "retailsim_pipeline==" in requirements
    assert "input_example.json" in files or "serving_input_example.json" in files
    signature = mlflow.models.Model.load(str(local / "MLmodel")).signature
    assert signature.inputs.input_names() == ["products", "context"]
    assert signature.outputs.input_names() == ["top_k"] and signature.params.to_dict()[0]["name"] == "k"

    # The raw module read back from the artifacts is the logged one.
    module, vocabulary = tracking.read_world_model(local / "artifacts")
    assert vocabulary == FULL_VOCABULARY and not module.training
    assert module.state_dict()["product_table"].equal(logged_models.models[0].state_dict()["product_table"])


def test_pyfunc_serves_what_top_k_codes_scores(logged_models):
    models, uris = logged_models.models, logged_models.uris
    baskets = pd.DataFrame({"products": [VOCABULARY[:3], [VOCABULARY[5], "PRD_NOT_IN_VOCAB"], []]})
    served = mlflow.pyfunc.load_model(uris[1])
    out = served.predict(baskets)
    assert list(out.columns) == ["top_k"] and len(out) == 3
    for basket, top in zip(baskets["products"], out["top_k"]):
        assert len(top) == 10 and len(set(top)) == 10
        assert set(top) <= set(VOCABULARY)
        assert not set(top) & set(basket)
    assert [list(t) for t in out["top_k"]] == top_k_codes(models[1], FULL_VOCABULARY, baskets, k=10)
    assert [list(t) for t in out["top_k"]] != top_k_codes(models[0], FULL_VOCABULARY, baskets, k=10)

    # K via params (clipped to the number of products); an explicit context changes the ranking input.
    assert all(len(t) == 15 for t in served.predict(baskets, params={"k": 15})["top_k"])
    assert [len(t) for t in served.predict(pd.DataFrame({"products": [[]]}), params={"k": 500})["top_k"]] \
        == [len(VOCABULARY)]
    with_ctx = baskets.assign(context=[[0.5] * 400] * 3)
    assert [list(t) for t in served.predict(with_ctx)["top_k"]] == top_k_codes(models[1], FULL_VOCABULARY, with_ctx)
    with pytest.raises(ValueError, match="row 0: context has shape"):
        top_k_codes(models[1], FULL_VOCABULARY, baskets.assign(context=[[0.5] * 3] * 3))


def test_models_logged_before_the_package_split_still_find_their_class():
    # Their python_model.pkl names the class by its old module path, the package itself.
    assert pickle.loads(b"cretailsim_pipeline.tracking\nWorldModelPyfunc\n.") is WorldModelPyfunc


def test_log_world_model_rejects_mismatches(tracking_uri):
    model = tiny_model(0)
    with MlflowLogger(tracking_uri, system_metrics=False) as logger:
        with pytest.raises(ValueError, match="n_products = 23"):
            log_world_model(logger, model.config.model_dump(), model.state_dict(), VOCABULARY[:-1])
        wrong = model.config.model_copy(update={"d_model": 64}).model_dump()
        with pytest.raises(RuntimeError, match="size mismatch"):
            log_world_model(logger.run_id, wrong, model.state_dict(), VOCABULARY)
    assert MlflowClient(tracking_uri).search_logged_models([logger.experiment_id]) == []
