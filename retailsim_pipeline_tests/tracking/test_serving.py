"""The world model as an MLflow pyfunc: what a logged model holds, what it takes (what a client knows),
and that serving it equals scoring the module through :func:`rank_requests`."""

import json
import os
import pickle
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from retailsim_pipeline import tracking
from retailsim_pipeline.config import N_SPECIAL
from retailsim_pipeline.tracking import MlflowLogger, log_world_model, rank_requests
from retailsim_pipeline.tracking.serving import WorldModelPyfunc
from retailsim_pipeline_tests.tracking.world_models import client_requests, tiny_model


def test_logged_model_holds_config_weights_vocabulary_features_and_its_contract(tracking_uri, logged_models,
                                                                                tmp_path):
    client = MlflowClient(tracking_uri)
    uris = logged_models.uris
    features = logged_models.serving.features
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

    # Artifacts: config, safetensors weights, vocabulary, the serving features; no pickled data anywhere.
    local = Path(mlflow.artifacts.download_artifacts(uris[0], dst_path=str(tmp_path / "m0")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"artifacts/config.json", "artifacts/weights.safetensors", "artifacts/vocabulary.json", "MLmodel",
            "requirements.txt", "artifacts/features/manifest.json", "artifacts/features/tables.safetensors",
            "artifacts/features/baskets.parquet", "artifacts/features/vocabulary.parquet",
            "artifacts/features/customers.parquet", "artifacts/features/stores.parquet"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".ckpt", ".npy"))]
    pickles = [f for f in files if f.endswith((".pkl", ".pickle"))]
    assert pickles == ["python_model.pkl"]  # the stateless wrapper (see serving's docstring), tiny
    wrapper = (local / "python_model.pkl").read_bytes()
    assert len(wrapper) < 20_000
    # Pickled by reference to the class's module path: moving the class changes what logged models import.
    assert b"retailsim_pipeline.tracking.serving" in wrapper and b"WorldModelPyfunc" in wrapper
    assert json.loads((local / "artifacts/vocabulary.json").read_text()) == features.product_codes
    requirements = (local / "requirements.txt").read_text()
    assert "safetensors==" in requirements and "retailsim_pipeline==" in requirements and "polars==" in requirements
    assert "input_example.json" in files or "serving_input_example.json" in files
    signature = mlflow.models.Model.load(str(local / "MLmodel")).signature
    assert signature.inputs.input_names() == ["customer_code", "store_code", "timestamp", "products", "quantities",
                                              "spend", "basket_id"]
    assert signature.outputs.input_names() == ["top_k", "scores", "unknown_products"]
    assert signature.params.to_dict()[0]["name"] == "k"

    # The raw module and the features read back from the artifacts are the logged ones.
    served = tracking.read_served_model(local / "artifacts")
    assert served.vocabulary == features.product_codes and not served.model.training
    assert served.model.state_dict()["product_table"].equal(logged_models.models[0].state_dict()["product_table"])
    assert served.features.baskets.equals(features.baskets)


def test_pyfunc_serves_what_rank_requests_scores(logged_models):
    models, uris, features = logged_models.models, logged_models.uris, logged_models.serving.features
    requests = client_requests(logged_models.serving.samples, n=3)
    # An anonymous shopper at an unknown store, with a product the model never saw.
    requests.loc[len(requests)] = {"customer_code": None, "store_code": "STORE_NOT_SEEN",
                                   "timestamp": "2007-03-01T10:00:00",
                                   "products": [requests["products"][0][0], "PRD_NOT_IN_VOCAB"],
                                   "quantities": None, "spend": None}
    served = mlflow.pyfunc.load_model(uris[1])
    out = served.predict(requests)
    assert list(out.columns) == ["top_k", "scores", "unknown_products"] and len(out) == 4
    codes = set(features.product_codes[N_SPECIAL:])
    for basket, top, scores in zip(requests["products"], out["top_k"], out["scores"]):
        assert len(top) == 10 and len(set(top)) == 10
        assert set(top) <= codes and not set(top) & set(basket)
        assert list(scores) == sorted(scores, reverse=True)
    assert list(out["unknown_products"]) == [0, 0, 0, 1]
    expected = rank_requests(models[1], features, requests, k=10)
    assert [list(t) for t in out["top_k"]] == [list(t) for t in expected["top_k"]]
    assert [list(t) for t in out["top_k"]] != [list(t) for t in rank_requests(models[0], features, requests)["top_k"]]

    # K via params (clipped to the number of products); a K above what some basket leaves is an error.
    assert all(len(t) == 15 for t in served.predict(requests, params={"k": 15})["top_k"])
    n_products = len(codes)
    empty = pd.DataFrame({"store_code": ["1"], "timestamp": ["2007-03-01T10:00:00"], "products": [[]]})
    assert [len(t) for t in served.predict(empty, params={"k": 10 ** 6})["top_k"]] == [n_products]
    with pytest.raises(ValueError, match="exceeds the"):
        rank_requests(models[1], features, requests, k=n_products)


def test_the_context_is_computed_from_what_the_client_knows(logged_models):
    """The customer, the store and the time change the ranking: they reach the model (a client cannot pass
    a context vector any more, and does not need to)."""
    model, features = logged_models.models[1], logged_models.serving.features
    base = client_requests(logged_models.serving.samples, n=1)
    carded = base.loc[0, "customer_code"]
    assert carded is not None
    variants = {
        "as is": base,
        "anonymous": base.assign(customer_code=[None]),
        "another store": base.assign(store_code=["STORE_NOT_SEEN"]),
        "another hour": base.assign(timestamp=[base.loc[0, "timestamp"][:11] + "20:00:00"]),
    }
    scores = {name: rank_requests(model, features, frame, k=20)["scores"][0] for name, frame in variants.items()}
    for name in ("anonymous", "another store", "another hour"):
        assert scores[name] != scores["as is"], name


def test_models_logged_before_the_package_split_still_find_their_class():
    # Their python_model.pkl names the class by its old module path, the package itself.
    assert pickle.loads(b"cretailsim_pipeline.tracking\nWorldModelPyfunc\n.") is WorldModelPyfunc


def test_log_world_model_rejects_mismatches(tracking_uri, tiny_serving):
    model = tiny_model(0, tiny_serving.cache)
    with MlflowLogger(tracking_uri, system_metrics=False) as logger:
        wrong_vocab = model.config.model_copy(update={"n_products": model.config.n_products + 1})
        with pytest.raises(ValueError, match=f"n_products = {model.config.n_products + 1}"):
            log_world_model(logger, wrong_vocab.model_dump(), model.state_dict(), tiny_serving.features)
        wrong = model.config.model_copy(update={"d_model": 64}).model_dump()
        with pytest.raises(RuntimeError, match="size mismatch"):
            log_world_model(logger.run_id, wrong, model.state_dict(), tiny_serving.features)
    assert MlflowClient(tracking_uri).search_logged_models([logger.experiment_id]) == []
