"""Choose the strong baselines' parameters on the validation split (issue 11 §1).

:func:`tune_on_validation` scores each point of a small grid on the validation split's masked
positions (:func:`~retailsim_pipeline.evaluation.evaluate.prepare`, the same seed and mask rate as the
test evaluation) and keeps the best Recall@10 (ties: the earlier grid point). The test split is never
opened: the customers' as-of history (:func:`~retailsim_pipeline.evaluation.baselines.as_of_history`)
is built once over train and validation and shared by every fit. A fit is shared by every grid point
that only changes a scoring-time weight, so the cost is one fit per co-occurrence / (decay, k) and one
scoring pass per point.
"""

import logging
import time
from pathlib import Path

from retailsim_pipeline.config import EvaluationConfig
from retailsim_pipeline.evaluation.evaluate import EvalSetup, prepare, rank_baseline
from retailsim_pipeline.evaluation.metrics import ranking_metrics
from retailsim_pipeline.evaluation.schema import GATE_METRIC
from retailsim_pipeline.evaluation.strong_baselines import BlendScorer, TifuKnnScorer
from retailsim_pipeline.prep.cache import SplitArrays, TensorCache
from retailsim_pipeline.prep.history import AsOfHistory

log = logging.getLogger(__name__)

_EVAL = EvaluationConfig()  # the defaults: one source for the seed and the mask rate
TUNED_METRIC = GATE_METRIC  # the metric the gate compares on

#: Own share is a distribution per customer (top items ≈ 0.05–0.3) while the co-occurrence and
#: popularity terms have max 1: weights of a few hundredths reorder and extend the customer's own
#: items without drowning them (on the demo data w_cooc 0.03 beat 0.1 and 0.3; w_pop ≥ 0.03 only hurt).
BLEND_GRID: tuple[dict, ...] = tuple({"w_cooc": c, "w_pop": p} for c in (0.01, 0.03, 0.1) for p in (0.0, 0.003))
#: Decay from "the last ~10 baskets" to none, and the paper's range of alpha; k at the paper's order
#: of magnitude (on the demo data k from 20 to 300 moved validation recall by < 0.002).
TIFU_GRID: tuple[dict, ...] = tuple({"decay": d, "k": 300, "alpha": a} for d in (0.9, 0.97, 1.0) for a in (0.7, 0.9))

#: The strong baselines by name: ``STRONG_BASELINES[name](train, scored, vocab_size, history=history, **params)``.
STRONG_BASELINES = {"blend": BlendScorer, "tifu_knn": TifuKnnScorer}


def _recall(setup: EvalSetup, scorer) -> float:
    return float(ranking_metrics(rank_baseline(setup, scorer))[TUNED_METRIC])


def _best(name: str, scored: list[tuple[dict, float]]) -> dict:
    """The first grid point of highest recall, and every point's figure."""
    params, recall = max(scored, key=lambda pr: pr[1])  # max keeps the first of equals
    log.info("%s: chosen %s (validation %s %.4f)", name, params, TUNED_METRIC, recall)
    return {"params": dict(params), f"validation_{TUNED_METRIC}": recall,
            "grid": [{"params": dict(p), f"validation_{TUNED_METRIC}": r} for p, r in scored]}


def tune_blend(setup: EvalSetup, train: SplitArrays, scored: SplitArrays, vocab_size: int,
               grid: tuple[dict, ...] = BLEND_GRID, *, history: AsOfHistory) -> dict:
    """:class:`BlendScorer` over ``grid`` (one fit, one pass per point); see :func:`tune_on_validation`."""
    fitted = BlendScorer(train, scored, vocab_size, history=history)
    results = []
    for params in grid:
        start = time.perf_counter()
        results.append((params, _recall(setup, fitted.with_weights(**params))))
        log.info("blend %s: %.4f (%.1f s)", params, results[-1][1], time.perf_counter() - start)
    return _best("blend", results)


def tune_tifu_knn(setup: EvalSetup, train: SplitArrays, scored: SplitArrays, vocab_size: int,
                  grid: tuple[dict, ...] = TIFU_GRID, *, history: AsOfHistory) -> dict:
    """:class:`TifuKnnScorer` over ``grid`` (one fit per (decay, k), one pass per point)."""
    fits: dict[tuple[float, int], TifuKnnScorer] = {}
    results = []
    for params in grid:
        start = time.perf_counter()
        key = (params["decay"], params["k"])
        if key not in fits:
            fits[key] = TifuKnnScorer(train, scored, vocab_size, history=history, **params)
        results.append((params, _recall(setup, fits[key].with_alpha(params["alpha"]))))
        log.info("tifu_knn %s: %.4f (%.1f s)", params, results[-1][1], time.perf_counter() - start)
    return _best("tifu_knn", results)


def tune_on_validation(cache: TensorCache, samples_dir: Path, *, seed: int = _EVAL.seed,
                       mask_rate: float = _EVAL.mask_rate, setup: EvalSetup | None = None) -> dict[str, dict]:
    """The strong baselines' parameters chosen on the validation positions.

    Returns ``{"blend": {...}, "tifu_knn": {...}}``, each ``{"params": {...}, "validation_recall@10":
    float, "grid": [{"params", "validation_recall@10"}, ...]}``; ``params`` go straight into
    ``STRONG_BASELINES[name](train, scored, vocab_size, history=history, **params)``. Fitted on train,
    scored on validation with the customers' history as of each basket (``setup.history``, over train
    and validation), shared by every fit; ``setup`` (the validation positions) is prepared here when
    not given. The test split is not read.
    """
    setup = setup if setup is not None else prepare(cache, samples_dir, split="validation", seed=seed,
                                                    mask_rate=mask_rate)
    if setup.split != "validation":
        raise ValueError(f"tune_on_validation: the setup scores {setup.split!r}, not validation")
    history = setup.history
    train, scored = cache.split("train"), cache.split("validation")
    vocab_size = cache.product_embeddings.shape[0]
    return {"blend": tune_blend(setup, train, scored, vocab_size, history=history),
            "tifu_knn": tune_tifu_knn(setup, train, scored, vocab_size, history=history)}
