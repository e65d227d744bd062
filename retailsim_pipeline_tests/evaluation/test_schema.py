"""The metrics.json contract: evaluation/schema.py accepts a realistic document and names the exact key
path of every break."""

import copy

import pytest

from retailsim_pipeline.config import AUX_HEADS
from retailsim_pipeline.evaluation.buckets import COLD_START_BUCKETS
from retailsim_pipeline.evaluation.schema import (
    BASELINES,
    RANKING_KEYS,
    MetricsDocument,
    json_ready,
    validate_metrics,
)

# ---- the contract ---------------------------------------------------------------------------------


def test_validate_accepts_the_realistic_document(doc):
    validate_metrics(doc)


def test_validate_accepts_a_document_without_oracle_and_champion(doc):
    doc["oracle"] = None
    for group in doc["buckets"].values():
        for entry in group.values():
            entry["oracle"] = None
    doc["promotion"] |= {"champion_version": None, "champion": None}
    validate_metrics(doc)


def test_validate_accepts_empty_buckets_with_null_metrics(doc):
    empty = {key: None for key in doc["model"] if key not in ("aux", "n")} | {"n": 0}
    for scorer in ("model", *BASELINES, "oracle"):
        doc["buckets"]["cold_start"]["anonymous"][scorer] = dict(empty)
    validate_metrics(doc)


def _broken(doc, edit):
    bad = copy.deepcopy(doc)
    edit(bad)
    return bad


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("promotion"), "document: missing key 'promotion'"),
        (lambda d: d.__setitem__("schema", "retailsim.evaluation/0"), "schema: expected 'retailsim.evaluation/2'"),
        (lambda d: d["model"].pop("recall@20"), "model: missing key 'recall@20'"),
        (lambda d: d["baselines"]["popularity"].pop("mrr"), "baselines.popularity: missing key 'mrr'"),
        (lambda d: d["model"].__setitem__("recall@10", "0.21"), "model.recall@10: expected a number in [0, 1], got '0.21' (str)"),
        (lambda d: d["model"].__setitem__("mrr", 1.5), "model.mrr: expected a number in [0, 1], got 1.5"),
        (lambda d: d["model"].__setitem__("ndcg@10", float("nan")), "model.ndcg@10: expected a number in [0, 1]"),
        (lambda d: d["model"].__setitem__("accuracy", None), "model.accuracy: expected a number in [0, 1], got None"),
        (lambda d: d["model"].__setitem__("n", 25000.0), "model.n: expected a non-negative integer, got 25000.0 (float)"),
        (lambda d: d["model"].__setitem__("n", True), "model.n: expected a non-negative integer, got True (bool)"),
        (lambda d: d["baselines"].__setitem__("bm25", d["baselines"]["popularity"]),
         "baselines: unknown scorer 'bm25' (expected popularity, personal_frequency, cooccurrence, blend, tifu_knn)"),
        (lambda d: d["buckets"]["cold_start"]["3-9"].__setitem__("random", d["model"]),
         "buckets.cold_start.3-9: unknown scorer 'random'"),
        (lambda d: d["buckets"]["basket_length"]["5-9"].pop("cooccurrence"),
         "buckets.basket_length.5-9: missing scorer 'cooccurrence'"),
        (lambda d: d["buckets"]["cold_start"].pop("10+"), "buckets.cold_start: missing bucket '10+'"),
        (lambda d: d["buckets"]["cold_start"]["1-2"]["model"].pop("n"), "buckets.cold_start.1-2.model: missing key 'n'"),
        (lambda d: d["buckets"]["repeat_vs_explore"]["repeat"].__setitem__("oracle", None),
         "buckets.repeat_vs_explore.repeat.oracle: is null but the top-level oracle is not"),
        (lambda d: d["model"]["aux"].pop("mission_type"), "model.aux: missing auxiliary head 'mission_type'"),
        (lambda d: d["model"]["aux"]["basket_size"]["confusion"][2].pop(), "model.aux.basket_size.confusion[2]: expected a list of 4 counts"),
        (lambda d: d["model"]["aux"]["basket_size"]["confusion"][1].__setitem__(0, -3),
         "model.aux.basket_size.confusion[1][0]: expected a non-negative integer, got -3"),
        (lambda d: d["model"]["aux"]["mission_focus"].__setitem__("labels", "Fresh"),
         "model.aux.mission_focus.labels: expected a non-empty list of strings"),
        (lambda d: d["meta"].pop("cache_key"), "meta: missing key 'cache_key'"),
        (lambda d: d["meta"].__setitem__("model_version", 3), "meta.model_version: expected str, got 3 (int)"),
        (lambda d: d["meta"].__setitem__("created", "yesterday"), "meta.created: expected an ISO-8601 timestamp, got 'yesterday'"),
        (lambda d: d["promotion"].__setitem__("decision", "promote"), "promotion.decision: expected one of champion, challenger, got 'promote'"),
        (lambda d: d["promotion"].__setitem__("metric", "recall@100"), "promotion.metric: expected one of accuracy"),
        (lambda d: d["promotion"].__setitem__("champion", None), "promotion: champion_version and champion must both be null"),
        (lambda d: d["promotion"].__setitem__("passed_baseline_check", "yes"), "promotion.passed_baseline_check: expected true or false"),
        (lambda d: d.__setitem__("extra", 1), "document: unknown key 'extra'"),
        (lambda d: d.__setitem__("model", [0.2]), "model: expected an object, got [0.2] (list)"),
    ],
)
def test_validate_rejects_broken_documents_precisely(doc, edit, message):
    with pytest.raises(ValueError) as err:
        validate_metrics(_broken(doc, edit))
    assert str(err.value).startswith("metrics document: ")
    assert message in str(err.value)


def test_validate_rejects_numpy_integers_with_a_hint(doc):
    np = pytest.importorskip("numpy")
    doc["model"]["n"] = np.int64(25000)
    with pytest.raises(ValueError, match=r"model\.n: expected a non-negative integer.*int\(\)"):
        validate_metrics(doc)


def test_nan_outside_an_empty_bucket_is_still_rejected(doc):
    doc["model"]["mrr"] = float("nan")
    with pytest.raises(ValueError, match=r"model\.mrr: expected a number in \[0, 1\], got nan"):
        validate_metrics(json_ready(doc))


def test_validate_requires_null_bucket_oracles_without_top_level_oracle(doc):
    doc["oracle"] = None
    with pytest.raises(ValueError, match=r"buckets\.cold_start\.anonymous\.oracle: must be null"):
        validate_metrics(doc)


# ---- numbers that disagree with each other ------------------------------------------------------
# A document whose every value has the right type can still be wrong: these plant one wrong number
# each, and the contract must notice (the end-to-end evaluation test relies on it).


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["promotion"].__setitem__("challenger", 0.3),
         "promotion.challenger: is 0.3 but model.recall@10 is 0.213"),
        (lambda d: d["meta"].__setitem__("n_positions", 24999), "meta.n_positions: is 24,999 but model.n is 25,000"),
        (lambda d: d["baselines"]["cooccurrence"].__setitem__("n", 12000),
         "baselines.cooccurrence.n: is 12,000 but model.n is 25,000: every scorer answers the same positions"),
        (lambda d: d["oracle"].__setitem__("n", 0), "oracle.n: is 0 but model.n is 25,000"),
        (lambda d: d["buckets"]["basket_length"]["5-9"]["oracle"].__setitem__("n", 6999),
         "buckets.basket_length.5-9.oracle.n: is 6,999 but buckets.basket_length.5-9.model.n is 7,000"),
        (lambda d: d["promotion"].__setitem__("passed_baseline_check", False),
         "promotion.decision: is champion but passed_baseline_check is false"),
    ],
)
def test_validate_rejects_numbers_that_disagree(doc, edit, message):
    with pytest.raises(ValueError) as err:
        validate_metrics(_broken(doc, edit))
    assert str(err.value).startswith(f"metrics document: {message}")


def test_validate_rejects_tuples_and_unknown_keys_deep_down(doc):
    doc["model"]["aux"]["basket_size"]["confusion"] = [tuple(row) for row in doc["model"]["aux"]["basket_size"]["confusion"]]
    with pytest.raises(ValueError, match=r"basket_size\.confusion\[0\]: expected a list of 4 counts .*\(tuple\)"):
        validate_metrics(doc)
    doc["model"]["aux"]["basket_size"]["confusion"] = [list(row) for row in doc["model"]["aux"]["basket_size"]["confusion"]]
    doc["model"]["aux"]["basket_size"]["f2"] = 0.5
    with pytest.raises(ValueError, match=r"^metrics document: model\.aux\.basket_size: unknown key 'f2'"):
        validate_metrics(doc)


def test_the_schema_documents_every_key():
    schema = MetricsDocument.model_json_schema(by_alias=True)
    ranking = schema["$defs"]["RankingMetrics"]
    assert set(ranking["properties"]) == set(RANKING_KEYS)
    assert ranking["additionalProperties"] is False
    assert all(p.get("description") for p in ranking["properties"].values())
    assert ranking["properties"]["recall@10"]["anyOf"][0] == {"maximum": 1.0, "minimum": 0.0, "type": "number"}
    assert list(schema["$defs"]["Buckets_cold_start"]["properties"]) == list(COLD_START_BUCKETS)
    assert list(schema["$defs"]["AuxHeads"]["properties"]) == list(AUX_HEADS)
