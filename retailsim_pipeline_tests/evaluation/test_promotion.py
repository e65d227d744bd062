"""The metrics.json document built once for the asset and the CLI: expected values written by hand
from the inputs, never read back from the output."""

import copy
from datetime import datetime, timezone

import pytest

from retailsim_pipeline.config import EvaluationConfig
from retailsim_pipeline.evaluation.promotion import metrics_document
from retailsim_pipeline.evaluation.schema import SCHEMA, validate_metrics

CREATED = datetime(2025, 11, 21, 8, 30, tzinfo=timezone.utc)


@pytest.fixture
def result(doc) -> dict:
    """An evaluation result as evaluate() returns it (recall@10: model 0.213, the strongest baseline on
    validation is the blend, 0.196 on test: +0.017 [+0.011, +0.023])."""
    return {"model": doc["model"], "baselines": doc["baselines"], "oracle": doc["oracle"],
            "buckets": doc["buckets"], "baseline_choice": doc["baseline_choice"], "significance": doc["significance"],
            "n_positions": 25000, "n_baskets": 16000, "_setup": object()}


def _document(result, **kwargs):
    facts = dict(config=EvaluationConfig(), challenger_version="3", champion_version="2", champion=0.191,
                 model_name="retailsim-world-model", model_uri="models:/retailsim-world-model/3",
                 mlflow_run_id="8f2c1e0d9b7a4c3e", cache_key="c0ffee1234", created=CREATED)
    return metrics_document(copy.deepcopy(result), **(facts | kwargs))


def test_the_document_is_the_contract_with_the_inputs_in_it(result):
    doc = _document(result)
    validate_metrics(doc)
    assert doc["schema"] == SCHEMA == "retailsim.evaluation/2"
    assert doc["baseline_choice"]["strongest"] == "blend" and doc["significance"]["blend"]["significant"]
    assert doc["meta"] == {
        "split": "test", "model_name": "retailsim-world-model", "model_version": "3",
        "model_uri": "models:/retailsim-world-model/3", "mlflow_run_id": "8f2c1e0d9b7a4c3e", "cache_key": "c0ffee1234",
        "n_baskets": 16000, "n_positions": 25000, "created": "2025-11-21T08:30:00+00:00", "eval_seed": 1234,
    }  # fmt: skip
    assert "_setup" not in doc
    assert doc["promotion"] == {
        "metric": "recall@10", "margin": 0.0, "challenger_version": "3", "challenger": 0.213,
        "champion_version": "2", "champion": 0.191, "passed_baseline_check": True, "decision": "champion",
        "reason": "recall@10 0.2130 > champion 0.1910 + 0.0",
    }  # fmt: skip


def test_the_rule_comes_from_the_config(result):
    # 0.213 does not beat 0.191 by more than 0.05; on MRR (0.1065) the challenger is compared on MRR.
    held = _document(result, config=EvaluationConfig(promotion_margin=0.05))["promotion"]
    assert (held["decision"], held["margin"]) == ("challenger", 0.05)
    on_mrr = _document(result, config=EvaluationConfig(promotion_metric="mrr"), champion=0.2)["promotion"]
    assert (on_mrr["metric"], on_mrr["challenger"], on_mrr["decision"]) == ("mrr", 0.1065, "challenger")
    validation = _document(result, config=EvaluationConfig(split="validation", seed=7))["meta"]
    assert (validation["split"], validation["eval_seed"]) == ("validation", 7)


def test_a_model_whose_interval_reaches_zero_is_never_promoted(result):
    # Ahead of the strongest baseline (the blend) by 0.004, but its 95 % interval reaches below zero.
    result["model"]["recall@10"] = 0.2
    for name in result["significance"]:
        c = result["significance"][name]
        c["difference"] = round(0.2 - result["baselines"][name]["recall@10"], 10)
        c["ci_low"], c["ci_high"] = c["difference"] - 0.006, c["difference"] + 0.006
        c["significant"] = c["ci_low"] > 0
    doc = _document(result, champion_version=None, champion=None, reason_note="reports only")
    assert doc["promotion"]["passed_baseline_check"] is False
    assert doc["promotion"]["decision"] == "challenger"
    assert doc["promotion"]["reason"] == ("does not beat the strongest baseline significantly: recall@10 vs blend "
                                          "(strongest on validation): +0.0040 [-0.0020, +0.0100] 95% (reports only)")
    validate_metrics(doc)
    # It is ahead of co-occurrence significantly, but the gate asks about the strongest baseline only.
    assert doc["significance"]["cooccurrence"]["significant"]


def test_a_gate_verdict_that_contradicts_the_interval_is_rejected(result):
    doc = _document(result)
    doc["significance"]["blend"]["ci_low"] = -0.001  # the interval now reaches zero: not significant
    with pytest.raises(ValueError, match=r"significance\.blend\.significant: is True but ci_low is -0\.001"):
        validate_metrics(doc)
    doc = _document(result)
    doc["significance"]["tifu_knn"]["difference"] = 0.5
    with pytest.raises(ValueError, match=r"significance\.tifu_knn\.difference: is 0\.5 but model − baseline"):
        validate_metrics(doc)


def test_a_wrong_number_planted_in_the_document_is_rejected(result):
    doc = _document(result)
    doc["model"]["recall@10"] = 0.25  # the ranking table and the decision would now disagree
    # Caught twice over: the decision's value and every model − baseline difference disagree with it.
    with pytest.raises(ValueError, match=r"significance\.popularity\.difference: is 0\.093 but model − baseline "
                                         r"recall@10 is 0\.13"):
        validate_metrics(doc)
    for name in doc["significance"]:
        doc["significance"][name]["difference"] += 0.25 - 0.213
    with pytest.raises(ValueError, match=r"promotion\.challenger: is 0\.213 but model\.recall@10 is 0\.25"):
        validate_metrics(doc)
