"""evaluation_report end to end on tiny (real training through Pipes, real MLflow), and the promotion rule."""

import copy
import json
from collections import Counter

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest

from retailsim_pipeline import tracking
from retailsim_pipeline.config import EvaluationConfig, training_preset
from retailsim_pipeline.definitions import defs
from retailsim_pipeline.evaluation.positions import eval_positions
from retailsim_pipeline.evaluation.promotion import decide_promotion
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.defs.runner import materialize_selection
from retailsim_pipeline.evaluation.schema import BASELINES, validate_metrics
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.requests import ServingFeatures
from retailsim_pipeline.training.trainer import build_model

RULE = dict(metric="recall@10", margin=0.01)


def test_first_model_becomes_champion_only_if_it_passes_the_check():
    first = decide_promotion(challenger_version="1", challenger=0.3, champion_version=None, champion=None,
                             beats_baselines=True, **RULE)
    assert first["decision"] == "champion" and first["champion_version"] is None
    failing = decide_promotion(challenger_version="1", challenger=0.3, champion_version=None, champion=None,
                               beats_baselines=False, **RULE)
    assert failing["decision"] == "challenger" and "strongest baseline" in failing["reason"]


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
    # A champion that this code cannot score (trained for an older layout): a passing model replaces it.
    unscorable = decide_promotion(challenger_version="3", challenger=0.2, champion_version="2", champion=None,
                                  beats_baselines=True, **RULE)
    assert unscorable["decision"] == "champion" and "cannot be re-scored" in unscorable["reason"]
    assert decide_promotion(challenger_version="3", challenger=0.2, champion_version="2", champion=None,
                            beats_baselines=False, **RULE)["decision"] == "challenger"


def assert_counts_match_the_inputs(doc: dict, cache: TensorCache, config: EvaluationConfig) -> None:
    """The report's counts against values computed here from the inputs alone (the cache's split, the
    samples, the config's masking), not read back from the report: positions, baskets, and the cold-start
    bucket of every position by the customer's trips before the basket, in any split (thresholds written
    out by hand)."""
    positions = eval_positions(cache.split(config.split), seed=config.seed, mask_prob=config.mask_rate,
                               split=config.split)
    assert doc["meta"]["n_positions"] == doc["model"]["n"] == len(positions.target) > 0
    assert doc["meta"]["n_baskets"] == len(np.unique(positions.sample))
    assert doc["meta"]["cache_key"] == cache.manifest["key"]
    # The customer's baskets strictly before this one, in any split, by (date, hour, basket id).
    columns = ["basket_id", "cust_code", "date", "hour"]
    everything = pl.concat([pl.read_parquet(cache.samples_dir / f"{s}.parquet", columns=columns)
                            .with_columns(pl.col("cust_code").cast(pl.String)) for s in ("train", "validation", "test")])
    seen, before = Counter(), {}
    for basket_id, code, *_ in sorted(everything.rows(), key=lambda r: (r[2], r[3], r[0])):
        before[basket_id] = seen[code] if code is not None else None
        if code is not None:
            seen[code] += 1
    scored = pl.read_parquet(cache.samples_dir / f"{config.split}.parquet", columns=["basket_id"])
    scored = scored.get_column("basket_id").to_list()

    def bucket(i: int) -> str:
        n = before[scored[i]]
        if n is None:
            return "anonymous"
        return "0" if n == 0 else "1-2" if n <= 2 else "3-9" if n <= 9 else "10+"

    expected = Counter(bucket(i) for i in positions.sample.tolist())
    reported = {name: entry["model"]["n"] for name, entry in doc["buckets"]["cold_start"].items()}
    assert reported == {name: expected[name] for name in ("anonymous", "0", "1-2", "3-9", "10+")}


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
    assert_counts_match_the_inputs(doc, TensorCache.latest(tiny_copy.cache), EvaluationConfig())
    planted = copy.deepcopy(doc)
    planted["baselines"]["cooccurrence"]["n"] += 1  # a wrong number in the real document is caught
    with pytest.raises(ValueError, match=r"baselines\.cooccurrence\.n: is "):
        validate_metrics(planted)
    assert (folder / "report.html").read_text().count("data:image/png;base64,") >= 3
    assert json.loads((tiny_copy.root / "reports" / "latest" / "metrics.json").read_text()) == doc
    # The check and the registry agree with the decision.
    (check,) = [e for e in instance.get_latest_materialization_event(dg.AssetKey("evaluation_report"))
                .asset_materialization.metadata.items() if e[0] == "decision"]
    uri = f"sqlite:///{tiny_copy.mlflow / 'mlflow.db'}"
    strongest = doc["baseline_choice"]["strongest"]
    assert strongest == max(BASELINES, key=lambda b: (doc["baseline_choice"]["validation"][b], -BASELINES.index(b)))
    assert doc["significance"][strongest]["n_resamples"] >= 1000
    beats = doc["significance"][strongest]["ci_low"] > 0
    assert doc["promotion"]["passed_baseline_check"] == beats
    assert (tracking.get_alias_version("champion", tracking_uri=uri) == version) == beats
    assert check[1].value == ("champion" if beats else "challenger")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(doc["meta"]["mlflow_run_id"])
    assert run.data.metrics["test/recall_at_10"] == pytest.approx(doc["model"]["recall@10"])
    assert run.data.tags["retailsim.promotion.decision"] == doc["promotion"]["decision"]
    # The registered version tells its evaluation; its logged model carries the metrics and lists it.
    mv = client.get_model_version(tracking.REGISTERED_MODEL, version)
    assert mv.tags["retailsim.promotion.decision"] == doc["promotion"]["decision"]
    assert mv.tags["retailsim.cache_key"] == doc["meta"]["cache_key"] and "retailsim.test_weeks" in mv.tags
    assert float(mv.tags["test/recall_at_10"]) == pytest.approx(doc["model"]["recall@10"], abs=1e-4)
    assert mv.description and "DESIGN" not in mv.description
    logged = client.get_logged_model(mv.model_id or mv.source.removeprefix("models:/"))  # sqlite: model_id None
    assert {m.key: m.value for m in logged.metrics}["test/recall_at_10"] == pytest.approx(doc["model"]["recall@10"])
    assert json.loads(logged.tags[tracking.MODEL_VERSIONS_TAG]) == [{"name": tracking.REGISTERED_MODEL,
                                                                    "version": version}]
    # One child run per scorer (the oracle too: generated data), the same metric keys in each.
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(["model", *BASELINES, "oracle"])
    assert len({frozenset(r.data.metrics) for r in children}) == 1
    assert {r.info.run_name: r for r in children}["oracle"].data.metrics["test/recall_at_10"] == \
        pytest.approx(doc["oracle"]["recall@10"])
    # The CLI scores the same registered model and writes the same kind of report (no alias moves).
    from retailsim_pipeline.cli import main as cli_main

    monkeypatch.setenv("RETAILSIM_DATA_DIR", str(tiny_copy.root))
    out = tmp_path / "cli_report"
    champion_before = tracking.get_alias_version("champion", tracking_uri=uri)
    assert cli_main(["evaluate", "models:/retailsim-world-model@challenger", "--out", str(out)]) == 0
    cli_doc = json.loads((out / "metrics.json").read_text())
    validate_metrics(cli_doc)
    assert_counts_match_the_inputs(cli_doc, TensorCache.latest(tiny_copy.cache), EvaluationConfig())
    assert cli_doc["model"]["recall@10"] == pytest.approx(doc["model"]["recall@10"])  # same positions, same model
    assert tracking.get_alias_version("champion", tracking_uri=uri) == champion_before

    # A registered model worse than the simple baselines (untrained) fails the gate and is never promoted.
    cache = TensorCache.latest(tiny_copy.cache)
    untrained = build_model(training_preset("tiny"), cache)
    with tracking.MlflowLogger(tracking_uri=uri, run_name="untrained", system_metrics=False) as logger:
        logged = tracking.log_world_model(logger, untrained.config, untrained.state_dict(),
                                          ServingFeatures.from_cache(cache))
        run_id = logger.run_id
    registered = tracking.register_world_model(logged, tracking_uri=uri)
    stored = tiny_copy.dagster / "values" / "trained_world_model" / "__all__.json"
    upstream = json.loads(stored.read_text())
    stored.write_text(json.dumps({**upstream, "model_version": registered.version,
                                  "registered_model_uri": registered.uri, "mlflow_run_id": run_id}))
    champion_before = tracking.get_alias_version("champion", tracking_uri=uri)
    result = dg.materialize([*defs.assets], selection=["evaluation_report"], instance=instance,
                            resources={**defs.resources, "retailsim_data": RetailSimData(data_dir=str(tiny_copy.root))},
                            raise_on_error=False)
    assert result.success  # the check is not blocking: the report is written, the version stays challenger
    (gate,) = result.get_asset_check_evaluations()
    assert not gate.passed and gate.metadata["ci_low"].value <= 0, gate.metadata
    bad = json.loads((tiny_copy.root / "reports" / registered.version / "metrics.json").read_text())
    assert bad["promotion"]["decision"] == "challenger" and not bad["promotion"]["passed_baseline_check"]
    assert bad["promotion"]["reason"].startswith("does not beat the strongest baseline significantly")
    assert tracking.get_alias_version("champion", tracking_uri=uri) == champion_before != registered.version
