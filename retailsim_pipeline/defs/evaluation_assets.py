"""Group ``evaluation``: the report that scores the trained model against baselines and the oracle,
and decides champion/challenger in the MLflow registry."""

from pathlib import Path

import dagster as dg

from retailsim_pipeline import tracking
from retailsim_pipeline.config import EvaluationConfig
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.evaluation.evaluate import evaluate, rescore_model
from retailsim_pipeline.evaluation.oracle import OracleScorer
from retailsim_pipeline.evaluation.promotion import gate_text, metrics_document
from retailsim_pipeline.evaluation.report import write_report
from retailsim_pipeline.prep.cache import TensorCache

# 2: blend and TIFU-KNN baselines, the significance gate; 3: the baselines' own history and the
# cold-start/repeat buckets as of the basket (issue 11 §3); 5: the evaluation recorded on the registered
# version, the logged model and one MLflow child run per scorer (issue 12 §5)
EVALUATION_CODE_VERSION = "5"
CHECK = "model_beats_baselines"


class EvaluationSettings(EvaluationConfig, dg.Config):
    """Split, masking seed and promotion rule of the evaluation report."""


def _table(doc: dict) -> str:
    keys = ["recall@10", "recall@20", "precision@10", "mrr", "ndcg@10", "accuracy"]
    rows = [("model", doc["model"])] + list(doc["baselines"].items())
    if doc["oracle"] is not None:
        rows.append(("oracle", doc["oracle"]))
    lines = ["| scorer | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |" for name, m in rows]
    return "\n".join(lines)


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "mlflow"},
    code_version=EVALUATION_CODE_VERSION,
    owners=["team:retailsim"],
    check_specs=[dg.AssetCheckSpec(CHECK, asset="evaluation_report", blocking=False,
                                   description="The model beats the strongest simple baseline (chosen on "
                                               "validation) on Recall@10: the 95 % paired-bootstrap interval "
                                               "of model − baseline over baskets lies above zero.")],
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationSettings,
    trained_world_model: dict,
    tensor_cache: str,
    retailsim_data: RetailSimData,
):
    """The registered model version produced upstream (never "the newest file") scored on the test
    split against global popularity, the customer's own purchase frequency, item co-occurrence, a blend
    of the three and a TIFU-KNN-style neighbour baseline (their settings chosen on validation) and, on
    generated data, the generator's oracle — on exactly the same masked positions; per cold-start,
    basket-length and repeat/explore bucket; model − each baseline with a paired bootstrap interval. Writes `reports/<version>/` (report.md, a self-contained
    report.html, metrics.json) and `reports/latest/`; in MLflow, logs the test metrics to the training run
    (linked to the logged model) with one child run per scorer, records the evaluation on the registered
    version (tags, description); promotes the model to `champion` when it beats the current champion
    (re-scored on this split).
    """
    paths = retailsim_data.paths()
    uri = tracking.default_tracking_uri(paths)
    version = str(trained_world_model["model_version"])
    cache = TensorCache.open(Path(tensor_cache))
    model, _ = tracking.load_world_model(trained_world_model["registered_model_uri"], tracking_uri=uri)
    oracle = None
    if (paths.ground_truth / "world.npz").exists():
        oracle = OracleScorer(cache, config.split, paths.ground_truth)
    samples_dir = cache.samples_dir
    result = evaluate(cache, samples_dir, model, split=config.split, seed=config.seed, mask_rate=config.mask_rate,
                      oracle=oracle, device=config.device, bootstrap_resamples=config.bootstrap_resamples,
                      bootstrap_confidence=config.bootstrap_confidence)
    metric = config.promotion_metric
    champion_version = tracking.get_alias_version("champion", tracking_uri=uri)
    champion_value = None
    if champion_version is not None and champion_version != version:
        champion_served, why = tracking.load_champion(champion_version, tracking_uri=uri, device=config.device)
        if champion_served is None:
            context.log.warning(why)
        else:
            champion_value = rescore_model(result["_setup"], champion_served, device=config.device)[metric]
    run_id = trained_world_model["mlflow_run_id"]
    doc = metrics_document(result, config=config, challenger_version=version, champion_version=champion_version,
                           champion=champion_value, model_name=tracking.REGISTERED_MODEL,
                           model_uri=trained_world_model["registered_model_uri"], mlflow_run_id=run_id,
                           cache_key=cache.manifest["key"])
    promotion = doc["promotion"]
    strongest = result["baseline_choice"]["strongest"]
    comparison = result["significance"][strongest]
    if promotion["decision"] == "champion":
        tracking.set_alias(version, "champion", tracking_uri=uri)
    history = tracking.metric_history(run_id, tracking_uri=uri)
    reports = paths.root / "reports"
    written = write_report(doc, reports / version, history=history, latest_dir=reports / "latest")
    weeks = cache.manifest["splits"][config.split].get("weeks")
    registered = tracking.record_evaluation(version, doc, weeks=weeks, tracking_uri=uri)
    tracking.log_evaluation(run_id, doc, written, model_id=registered.model_id, weeks=weeks, tracking_uri=uri)
    context.log.info(f"model v{version}: recall@10 {result['model']['recall@10']:.4f}; {promotion['reason']}")
    return dg.MaterializeResult(
        value=str(reports / version),
        metadata={
            "scores": dg.MetadataValue.md(_table(doc)),
            "report": dg.MetadataValue.path(str(written["report.html"]) if "report.html" in written
                                            else str(reports / version)),
            "mlflow_run": dg.MetadataValue.url(trained_world_model["mlflow_run_url"]),
            "model_version": version,
            "decision": promotion["decision"],
            "reason": promotion["reason"],
            "recall@10": float(result["model"]["recall@10"]),
            "strongest_baseline": strongest,
            "strongest_baseline_recall@10": float(result["baselines"][strongest]["recall@10"]),
            "gate": gate_text(result),
            "champion_version": str(promotion["champion_version"]),
            "champion_recall@10": float(champion_value) if champion_value is not None else float("nan"),
        },
        check_results=[dg.AssetCheckResult(
            check_name=CHECK, passed=promotion["passed_baseline_check"], severity=dg.AssetCheckSeverity.ERROR,
            description=gate_text(result),
            metadata={"model_recall@10": float(result["model"]["recall@10"]),
                      "strongest_baseline": strongest,
                      "baseline_recall@10": float(result["baselines"][strongest]["recall@10"]),
                      "difference": float(comparison["difference"]), "ci_low": float(comparison["ci_low"]),
                      "ci_high": float(comparison["ci_high"]), "n_resamples": int(comparison["n_resamples"])})],
    )
