"""The champion/challenger policy and the ``metrics.json`` document that records it: one home, called
by the ``evaluation_report`` asset (which moves the aliases) and by ``retailsim evaluate`` (which only
reports)."""

from collections.abc import Mapping
from datetime import datetime, timezone

from retailsim_pipeline.config import EvaluationConfig
from retailsim_pipeline.evaluation.schema import GATE_METRIC, SCHEMA, SCORER_NAMES

def beats_baselines(result: Mapping) -> bool:
    """The gate: the model beats the strongest baseline (chosen on validation) on the gate metric, the
    whole paired-bootstrap interval of model − baseline above zero (``evaluation/gate.py``)."""
    return bool(result["significance"][result["baseline_choice"]["strongest"]]["significant"])


def gate_text(result: Mapping) -> str:
    """The gate's comparison in words, e.g. ``recall@10 vs blend (strongest on validation): +0.0123
    [+0.0081, +0.0167] 95 %``."""
    name = result["baseline_choice"]["strongest"]
    c = result["significance"][name]
    return (f"{GATE_METRIC} vs {SCORER_NAMES[name]} (strongest on validation): {c['difference']:+.4f} "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] {c['confidence']:.0%}")


def decide_promotion(*, challenger_version: str, challenger: float, champion_version: str | None,
                     champion: float | None, beats_baselines: bool, metric: str, margin: float,
                     gate: str = "") -> dict:
    """Champion/challenger rule: a model that fails the baseline gate is never promoted; the first
    passing model becomes champion; later ones only when ``metric`` beats the champion's by > margin.
    ``gate`` (:func:`gate_text`) is quoted in the reason when the gate fails."""
    if not beats_baselines:
        decision, reason = "challenger", ("does not beat the strongest baseline significantly"
                                          + (f": {gate}" if gate else ""))
    elif champion_version is None or champion_version == challenger_version:
        decision, reason = "champion", "first model to pass the baseline check"
    elif champion is None:
        decision, reason = "champion", (f"champion v{champion_version} cannot be re-scored on this cache; the first "
                                        "model to pass the baseline check replaces it")
    elif challenger > champion + margin:
        decision, reason = "champion", f"{metric} {challenger:.4f} > champion {champion:.4f} + {margin}"
    else:
        decision, reason = "challenger", f"{metric} {challenger:.4f} does not beat champion {champion:.4f} + {margin}"
    return {"metric": metric, "margin": margin, "challenger_version": challenger_version, "challenger": challenger,
            "champion_version": champion_version if champion_version != challenger_version else None,
            "champion": champion, "passed_baseline_check": beats_baselines, "decision": decision, "reason": reason}


def metrics_document(result: Mapping, *, config: EvaluationConfig, challenger_version: str,
                     champion_version: str | None, champion: float | None, model_name: str, model_uri: str | None,
                     mlflow_run_id: str | None, cache_key: str, reason_note: str = "",
                     created: datetime | None = None) -> dict:
    """The whole ``metrics.json`` document (``evaluation/schema.py``) for one evaluation: ``result`` from
    :func:`~retailsim_pipeline.evaluation.evaluate.evaluate` (run on ``config.split`` with ``config.seed``),
    the champion's version and its ``config.promotion_metric`` on the same positions (both ``None`` when
    there is no champion), and the decision of :func:`decide_promotion` under ``config``'s metric and
    margin. ``reason_note`` is appended to the reason in parentheses. NaN metrics of empty buckets are
    left as they are (``write_report`` writes them as null)."""
    metric = config.promotion_metric
    promotion = decide_promotion(challenger_version=challenger_version, challenger=result["model"][metric],
                                 champion_version=champion_version, champion=champion,
                                 beats_baselines=beats_baselines(result), metric=metric,
                                 margin=config.promotion_margin, gate=gate_text(result))
    if reason_note:
        promotion["reason"] += f" ({reason_note})"
    created = created or datetime.now(timezone.utc)
    return {
        "schema": SCHEMA,
        "meta": {"split": config.split, "model_name": model_name, "model_version": challenger_version,
                 "model_uri": model_uri, "mlflow_run_id": mlflow_run_id, "cache_key": cache_key,
                 "n_baskets": result["n_baskets"], "n_positions": result["n_positions"],
                 "created": created.isoformat(), "eval_seed": config.seed},
        "model": result["model"], "baselines": result["baselines"], "oracle": result["oracle"],
        "buckets": result["buckets"], "baseline_choice": result["baseline_choice"],
        "significance": result["significance"], "promotion": promotion,
    }
