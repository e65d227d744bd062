"""The registry on a real sqlite store: versions, aliases, serving by alias, loading a model back."""

import shutil

import mlflow
import pytest
import torch

from retailsim_pipeline import tracking
from retailsim_pipeline.model.world_model import WorldModel
from retailsim_pipeline.tracking import (
    REGISTERED_MODEL,
    get_alias_version,
    load_world_model,
    rank_requests,
    register_world_model,
    set_alias,
)
from retailsim_pipeline_tests.tracking.world_models import client_requests


def test_versions_and_aliases(tracking_uri, logged_models):
    uris = logged_models.uris
    # v1 challenger, then v2 takes the alias.
    v1 = register_world_model(uris[0], tags={"cache_version": "v1"}, tracking_uri=tracking_uri)
    assert v1.version == "1" and v1.tags["cache_version"] == "v1" and v1.aliases == ("challenger",)
    assert v1.run_id == logged_models.run_id and v1.uri == "models:/retailsim-world-model/1"
    assert get_alias_version("challenger", tracking_uri=tracking_uri) == "1"
    assert get_alias_version("champion", tracking_uri=tracking_uri) is None
    v2 = register_world_model(uris[1], tracking_uri=tracking_uri)
    assert v2.version == "2" and v2.model_id == uris[1].removeprefix("models:/")
    assert get_alias_version("challenger", tracking_uri=tracking_uri) == "2"
    set_alias("1", "champion", tracking_uri=tracking_uri)
    assert get_alias_version("champion") == "1"  # env default store
    assert get_alias_version("challenger", name="no-such-model") is None
    assert tracking.registered_model_uri(v2.version) == "models:/retailsim-world-model/2"

    # Serving by alias: the alias really moved to v2's model.
    requests = client_requests(logged_models.serving.samples, n=3)
    served = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@challenger")
    top = [list(t) for t in served.predict(requests)["top_k"]]
    models, features = logged_models.models, logged_models.serving.features
    assert top == [list(t) for t in rank_requests(models[1], features, requests)["top_k"]]
    assert top != [list(t) for t in rank_requests(models[0], features, requests)["top_k"]]


def test_load_world_model_from_the_explicit_store(tracking_uri, logged_models, empty_store, tmp_path, monkeypatch):
    models, uris = logged_models.models, logged_models.uris
    register_world_model(uris[0], alias="champion", tracking_uri=tracking_uri)
    v2 = register_world_model(uris[1], tracking_uri=tracking_uri)
    # The explicit store wins over the environment's (pointed at another, empty store here).
    shutil.copy(empty_store, tmp_path / "other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert get_alias_version("champion") is None
    module, vocabulary = load_world_model(f"models:/{REGISTERED_MODEL}@champion", tracking_uri=tracking_uri)
    assert isinstance(module, WorldModel) and not module.training
    assert vocabulary == logged_models.serving.features.product_codes
    for key, value in models[0].state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
    for uri in (uris[1], v2.uri):
        module, _ = load_world_model(uri, tracking_uri=tracking_uri)
        torch.testing.assert_close(module.state_dict()["product_table"], models[1].state_dict()["product_table"])


def test_model_artifact_location(tracking_uri, logged_models):
    logged = tracking.mlflow_client(tracking_uri).get_logged_model(logged_models.uris[0].removeprefix("models:/"))
    assert tracking.model_artifact_location(logged_models.uris[0], tracking_uri=tracking_uri) \
        == logged.artifact_location
    assert tracking.model_artifact_location("file:///some/folder") == "file:///some/folder"  # not models:/
    with pytest.raises(ValueError, match="expected models:/m-<id>"):
        tracking.model_artifact_location("models:/just-a-name", tracking_uri=tracking_uri)


def test_a_champion_of_an_older_layout_is_reported_not_loaded(tracking_uri, logged_models, monkeypatch):
    """A registered model whose weights miss a parameter of today's WorldModel (as a model logged before
    the co-occurrence path does) loads as (None, why); while the code matches, it loads."""
    import torch.nn as nn

    from retailsim_pipeline.model import world_model

    version = register_world_model(logged_models.uris[0], tracking_uri=tracking_uri).version
    served, why = tracking.load_champion(version, tracking_uri=tracking_uri)
    assert why is None and isinstance(served.model, WorldModel)
    assert served.features.product_codes == logged_models.serving.features.product_codes

    class Newer(WorldModel):  # today's code, one parameter more than the logged weights hold
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.newer_gate = nn.Linear(2, 1)

    monkeypatch.setattr(world_model, "WorldModel", Newer)
    model, why = tracking.load_champion(version, tracking_uri=tracking_uri)
    assert model is None
    assert f"champion v{version}" in why and "newer_gate" in why
