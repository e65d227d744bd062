"""evaluation_report end to end on tiny (real training through Pipes, real MLflow), and the promotion rule."""

import json

import dagster as dg
import mlflow
import pytest

from retailsim_pipeline import tracking
from retailsim_pipeline.definitions import defs
from retailsim_pipeline.evaluation.promotion import decide_promotion
from retailsim_pipeline.defs.runner import materialize_selection
from retailsim_pipeline.evaluation.schema import validate_metrics

RULE = dict(metric="recall@10", margin=0.01)


def test_first_model_becomes_champion_only_if_it_passes_the_check():
    first = decide_promotion(challenger_version="1", challenger=0.3, champion_version=None, champion=None,
                             beats_baselines=True, **RULE)
    assert first["decision"] == "champion" and first["champion_version"] is None
    failing = decide_promotion(challenger_version="1", challenger=0.3, champion_version=None, champion=None,
                               beats_baselines=False, **RULE)
    assert failing["decision"] == "challenger" and "co-occurrence" in failing["reason"]


def test_promotion_both_ways_against_a_champion():
    up = decide_promotion(challenger_version="3", challenger=0.32, champion_version="2", champion=0.30,
                          beats_baselines=True, **RULE)
    assert up["decision"] == "champion" and up["champion"] == 0.30 and up["challenger"] == 0.32
    within_margin = decide_promotion(challenger_version="3", challenger=0.305, champion_version="2", champion=0.30,
                                     beats_baselines=True, **RULE)
    assert within_margin["decision"] == "challenger"
    worse_but_failing = decide_promotion(challenger_version="3", challenger=0.9, champion_version="2",
                                         champion=0.30, beats_baselines=False, **RULE)
    assert worse_but_failing["decision"] == "challenger"  # a model failing the check is never promoted


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def test_evaluation_report_end_to_end(tiny_copy, tiny_raw, instance, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import shutil

    shutil.copytree(tiny_raw.ground_truth, tiny_copy.ground_truth)  # generated data: the oracle is scored
    report = materialize_selection("*", tiny_copy, instance=instance, defs=defs, progress=False,
                                   training_preset="tiny")
    assert "evaluation_report" in report.assets_materialized, report.failures
    event = instance.get_latest_materialization_event(dg.AssetKey("evaluation_report"))
    meta = event.asset_materialization.metadata
    version = meta["model_version"].value
    folder = tiny_copy.root / "reports" / version
    doc = json.loads((folder / "metrics.json").read_text())
    validate_metrics(doc)
    assert doc["oracle"] is not None and doc["oracle"]["recall@10"] >= doc["baselines"]["popularity"]["recall@10"]
    assert set(doc["buckets"]["cold_start"]) <= {"anonymous", "0", "1-2", "3-9", "10+"}
    assert (folder / "report.html").read_text().count("data:image/png;base64,") >= 3
    assert json.loads((tiny_copy.root / "reports" / "latest" / "metrics.json").read_text()) == doc
    # The check and the registry agree with the decision.
    (check,) = [e for e in instance.get_latest_materialization_event(dg.AssetKey("evaluation_report"))
                .asset_materialization.metadata.items() if e[0] == "decision"]
    uri = f"sqlite:///{tiny_copy.mlflow / 'mlflow.db'}"
    beats = doc["model"]["recall@10"] > doc["baselines"]["cooccurrence"]["recall@10"]
    assert doc["promotion"]["passed_baseline_check"] == beats
    assert (tracking.get_alias_version("champion", tracking_uri=uri) == version) == beats
    assert check[1].value == ("champion" if beats else "challenger")
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(doc["meta"]["mlflow_run_id"])
    assert run.data.metrics["test/recall_at_10"] == pytest.approx(doc["model"]["recall@10"])
    assert run.data.tags["retailsim.promotion.decision"] == doc["promotion"]["decision"]
    # The CLI scores the same registered model and writes the same kind of report (no alias moves).
    from retailsim_pipeline.cli import main as cli_main

    monkeypatch.setenv("RETAILSIM_DATA_DIR", str(tiny_copy.root))
    out = tmp_path / "cli_report"
    champion_before = tracking.get_alias_version("champion", tracking_uri=uri)
    assert cli_main(["evaluate", "models:/retailsim-world-model@challenger", "--out", str(out)]) == 0
    cli_doc = json.loads((out / "metrics.json").read_text())
    validate_metrics(cli_doc)
    assert cli_doc["model"]["recall@10"] == pytest.approx(doc["model"]["recall@10"])  # same positions, same model
    assert tracking.get_alias_version("champion", tracking_uri=uri) == champion_before
