"""What an evaluation leaves in MLflow, on a real sqlite store: metrics on the LoggedModel, the registered
version's tags and description, one child run per scorer with the same metric keys, the descriptions of
the experiment and of the registered model."""

import copy
import json

import pytest
from mlflow import MlflowClient

from retailsim_pipeline import tracking
from retailsim_pipeline.evaluation.schema import BASELINES, validate_metrics
from retailsim_pipeline_tests.evaluation.conftest import sample_doc


@pytest.fixture
def doc() -> dict:
    """The realistic metrics.json of the evaluation tests."""
    return sample_doc()


OLD_DESCRIPTION = "RetailSim world model: basket (+ context) → next products. See DESIGN §5."
WEEKS = (200643, 200646)
RANKING_KEYS = {"test/accuracy", "test/mrr", "test/ndcg_at_10", *(f"test/{m}_at_{k}" for m in ("precision", "recall")
                                                                     for k in (1, 5, 10, 20))}


def _evaluated(doc: dict, run_id: str, version: str) -> dict:
    """The fixture's document as the evaluation of registered ``version`` logged by run ``run_id``."""
    out = copy.deepcopy(doc)
    out["meta"] |= {"model_version": version, "model_uri": f"models:/{tracking.REGISTERED_MODEL}/{version}",
                    "mlflow_run_id": run_id}
    out["promotion"]["challenger_version"] = version
    validate_metrics(out)
    return out


def test_an_evaluation_is_told_on_the_model_the_version_and_one_run_per_scorer(tracking_uri, logged_models, doc,
                                                                                tmp_path):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment(logged_models.experiment_id)
    assert experiment.name == tracking.EXPERIMENT
    assert experiment.tags[tracking.NOTE_TAG] == tracking.EXPERIMENT_DESCRIPTION  # set at creation
    client.set_experiment_tag(experiment.experiment_id, tracking.NOTE_TAG, "")  # an experiment made before
    # A registered model created by an earlier version of this code, with its old description.
    client.create_registered_model(tracking.REGISTERED_MODEL, description=OLD_DESCRIPTION)

    v1 = tracking.register_world_model(logged_models.uris[0], tracking_uri=tracking_uri)
    v2 = tracking.register_world_model(logged_models.uris[1], tracking_uri=tracking_uri)
    first_id, second_id = (uri.removeprefix("models:/") for uri in logged_models.uris)
    # The logged model lists its registered version (the tag the UI reads), each its own.
    for model_id, version in ((first_id, v1.version), (second_id, v2.version)):
        listed = json.loads(client.get_logged_model(model_id).tags[tracking.MODEL_VERSIONS_TAG])
        assert [(v["name"], str(v["version"])) for v in listed] == [(tracking.REGISTERED_MODEL, version)]
    registered = client.get_registered_model(tracking.REGISTERED_MODEL)
    assert registered.description == tracking.REGISTERED_DESCRIPTION and "DESIGN" not in registered.description

    evaluation = _evaluated(doc, logged_models.run_id, v1.version)
    report = tmp_path / "metrics.json"
    report.write_text(json.dumps(evaluation))
    recorded = tracking.record_evaluation(v1.version, evaluation, weeks=WEEKS, tracking_uri=tracking_uri)
    assert recorded.model_id == first_id
    children = tracking.log_evaluation(logged_models.run_id, evaluation, {"metrics.json": report},
                                       model_id=recorded.model_id, weeks=WEEKS, tracking_uri=tracking_uri)

    # The LoggedModel carries the model's test metrics and the gate; the other logged model none.
    model_metrics = {m.key: m.value for m in client.get_logged_model(first_id).metrics}
    assert model_metrics["test/recall_at_10"] == pytest.approx(0.213)
    assert set(model_metrics) == RANKING_KEYS | {"test/gate/difference", "test/gate/ci_low", "test/gate/ci_high",
                                                 "test/gate/passed", "promotion/champion"}
    assert model_metrics["test/gate/ci_low"] == pytest.approx(0.213 - 0.196 - 0.006)
    assert not client.get_logged_model(second_id).metrics
    note = client.get_logged_model(first_id).tags[tracking.NOTE_TAG]  # the logged model's description
    assert note.startswith(f"Version {v1.version} of {tracking.REGISTERED_MODEL}.") and "**champion**" in note

    # The version: test metrics, data, gate with its interval, decision, and a description saying so.
    mv = client.get_model_version(tracking.REGISTERED_MODEL, v1.version)
    assert mv.tags["test/recall_at_10"] == "0.2130" and mv.tags["test/mrr"] == "0.1065"
    assert mv.tags["retailsim.cache_key"] == "c0ffee1234"
    assert mv.tags["retailsim.test_weeks"] == "200643–200646"
    assert mv.tags["retailsim.promotion.decision"] == "champion"
    assert mv.tags["retailsim.promotion.gate"] == "recall@10 model − blend: +0.0170 [+0.0110, +0.0230] 95%"
    assert {k for k in mv.tags if k.startswith("test/")} == {"test/recall_at_10", "test/recall_at_20", "test/mrr",
                                                           "test/ndcg_at_10"}
    for text in ("**champion**", "recall@10 0.2130", "c0ffee1234", "200643–200646", "+0.0170 [+0.0110, +0.0230]",
                 "version 2, recall@10 0.1910"):
        assert text in mv.description, (text, mv.description)
    assert "DESIGN" not in mv.description
    assert not client.get_model_version(tracking.REGISTERED_MODEL, v2.version).description  # not evaluated

    # One finished child run per scorer under the training run, all with the same metric keys.
    runs = client.search_runs([logged_models.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{logged_models.run_id}'")
    by_name = {r.info.run_name: r for r in runs}
    assert list(children) == ["model", "blend", "tifu_knn", "personal_frequency", "cooccurrence", "popularity",
                              "oracle"]
    assert set(by_name) == set(children) and len(runs) == 7
    assert {children[name] for name in children} == {r.info.run_id for r in runs}
    for name, run in by_name.items():
        assert set(run.data.metrics) == RANKING_KEYS, name
        source = evaluation["model"] if name == "model" else (
            evaluation["oracle"] if name == "oracle" else evaluation["baselines"][name])
        for key in ("recall@10", "recall@20", "mrr", "ndcg@10"):
            assert run.data.metrics[f"test/{tracking.metric_name(key)}"] == pytest.approx(source[key]), (name, key)
        assert run.info.status == "FINISHED" and run.data.tags[tracking.SCORER_TAG] == name
        assert run.data.tags["retailsim.role"] == ("model" if name == "model" else
                                                   "oracle" if name == "oracle" else "baseline")
        assert "DESIGN" not in run.data.tags[tracking.NOTE_TAG]
    assert by_name["blend"].data.tags["retailsim.strongest_baseline"] == "true"
    assert by_name["blend"].data.params == {"w_cooc": "0.03", "w_pop": "0.0"}
    assert by_name["tifu_knn"].data.tags["retailsim.model_minus_this"].startswith("recall@10 model − tifu_knn: +0.0220")
    # The newest-first run list puts the model on top.
    assert max(runs, key=lambda r: r.info.start_time).info.run_name == "model"

    # The training run keeps its test/… metrics and gets the gate, the decision and the data scored.
    training = client.get_run(logged_models.run_id)
    assert training.data.metrics["test/recall_at_10"] == pytest.approx(0.213)
    assert {f"test/{b}/recall_at_10" for b in (*BASELINES, "oracle")} <= set(training.data.metrics)
    assert training.data.metrics["promotion/champion"] == 1.0
    assert training.data.tags["retailsim.promotion.decision"] == "champion"
    assert training.data.params["evaluation.cache_key"] == "c0ffee1234"
    assert training.data.params["evaluation.test_weeks"] == "200643–200646"
    assert [a.path for a in client.list_artifacts(logged_models.run_id, "evaluation")] == ["evaluation/metrics.json"]

    # Described: the experiment (filled in, it had none) and the registered model (the old text replaced).
    assert client.get_experiment(logged_models.experiment_id).tags[tracking.NOTE_TAG] == tracking.EXPERIMENT_DESCRIPTION
    assert "DESIGN" not in tracking.EXPERIMENT_DESCRIPTION + tracking.REGISTERED_DESCRIPTION

    # Evaluating the same run again updates its child runs rather than adding seven more; the version's
    # LoggedModel is listed once.
    again = tracking.log_evaluation(logged_models.run_id, evaluation, {}, model_id=first_id, tracking_uri=tracking_uri)
    assert again == children
    tracking.record_evaluation(v1.version, evaluation, weeks=WEEKS, tracking_uri=tracking_uri)
    assert len(json.loads(client.get_logged_model(first_id).tags[tracking.MODEL_VERSIONS_TAG])) == 1


def test_a_description_written_by_a_person_is_kept(tracking_uri, logged_models):
    client = MlflowClient(tracking_uri)
    client.create_registered_model(tracking.REGISTERED_MODEL, description="Ours, written in the UI.")
    tracking.register_world_model(logged_models.uris[0], tracking_uri=tracking_uri)
    assert client.get_registered_model(tracking.REGISTERED_MODEL).description == "Ours, written in the UI."
    client.set_experiment_tag(logged_models.experiment_id, tracking.NOTE_TAG, "Team notes.")
    tracking.get_or_create_experiment(client, tracking.EXPERIMENT, tracking_uri)
    assert client.get_experiment(logged_models.experiment_id).tags[tracking.NOTE_TAG] == "Team notes."


def test_real_data_has_no_oracle_run(doc):
    doc = copy.deepcopy(doc)
    doc["oracle"] = None
    per_scorer = tracking.scorer_metrics(doc)
    assert list(per_scorer) == ["model", "blend", "tifu_knn", "personal_frequency", "cooccurrence", "popularity"]
    assert all(set(m) == RANKING_KEYS for m in per_scorer.values())
    assert tracking.weeks_text((200643, 200646)) == "200643–200646" and tracking.weeks_text(None) is None
