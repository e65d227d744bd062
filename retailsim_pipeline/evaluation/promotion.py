"""The champion/challenger policy: one home, called by the ``evaluation_report`` asset (which moves
the aliases) and by ``retailsim evaluate`` (which only reports)."""

from collections.abc import Mapping

#: The baseline a model must beat before it can be promoted, and on which metric.
GATE_BASELINE, GATE_METRIC = "cooccurrence", "recall@10"


def beats_baselines(result: Mapping) -> bool:
    """Whether the evaluated model beats :data:`GATE_BASELINE` on :data:`GATE_METRIC` (same positions)."""
    return result["model"][GATE_METRIC] > result["baselines"][GATE_BASELINE][GATE_METRIC]


def decide_promotion(*, challenger_version: str, challenger: float, champion_version: str | None,
                     champion: float | None, beats_baselines: bool, metric: str, margin: float) -> dict:
    """Champion/challenger rule: a model that fails the baseline check is never promoted; the first
    passing model becomes champion; later ones only when ``metric`` beats the champion's by > margin."""
    if not beats_baselines:
        decision, reason = "challenger", f"does not beat item co-occurrence on {GATE_METRIC}"
    elif champion_version is None or champion_version == challenger_version:
        decision, reason = "champion", "first model to pass the baseline check"
    elif champion is not None and challenger > champion + margin:
        decision, reason = "champion", f"{metric} {challenger:.4f} > champion {champion:.4f} + {margin}"
    else:
        decision, reason = "challenger", f"{metric} {challenger:.4f} does not beat champion {champion:.4f} + {margin}"
    return {"metric": metric, "margin": margin, "challenger_version": challenger_version, "challenger": challenger,
            "champion_version": champion_version if champion_version != challenger_version else None,
            "champion": champion, "passed_baseline_check": beats_baselines, "decision": decision, "reason": reason}
