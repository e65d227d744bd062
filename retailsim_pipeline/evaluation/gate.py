"""The baseline gate (issue 11 §2): the model must beat the *strongest* simple baseline, significantly.

1. :func:`choose_baselines` — on the **validation** split only: the tuned baselines' settings
   (:func:`~retailsim_pipeline.evaluation.tuning.tune_on_validation`) and every baseline's Recall@10 there;
   the strongest is the one with the best validation Recall@10 (ties: the earlier in ``BASELINES``).
2. :func:`baseline_scorers` — every baseline fitted on train, with those settings, for the split scored;
   the personal parts read each customer's history as of the scored basket (one
   :func:`~retailsim_pipeline.evaluation.baselines.as_of_history` per call, shared by the scorers).
3. :func:`compare_with_baselines` — on the scored (test) positions: model − each baseline on Recall@10,
   per position, with a paired bootstrap over baskets (:func:`~retailsim_pipeline.evaluation.significance.
   paired_bootstrap`). The gate passes when the interval for the strongest baseline lies above zero.

The documents returned are ``metrics.json``'s ``baseline_choice`` and ``significance`` (``schema.py``).
"""

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from retailsim_pipeline.config import EvaluationConfig
from retailsim_pipeline.evaluation.baselines import (
    CooccurrenceScorer,
    PersonalFrequencyScorer,
    PopularityScorer,
    as_of_history,
)
from retailsim_pipeline.evaluation.evaluate import prepare, rank_baseline
from retailsim_pipeline.evaluation.metrics import Ranks, position_recall, ranking_metrics
from retailsim_pipeline.evaluation.schema import BASELINES, GATE_METRIC
from retailsim_pipeline.evaluation.significance import paired_bootstrap
from retailsim_pipeline.evaluation.tuning import STRONG_BASELINES, tune_on_validation
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.history import AsOfHistory

log = logging.getLogger(__name__)

_EVAL = EvaluationConfig()
GATE_K = int(GATE_METRIC.split("@")[1])


def _simple_scorers(cache: TensorCache, split: str, history: AsOfHistory) -> dict:
    """The untuned baselines fitted on train, to score ``split`` (``history``: as of its baskets)."""
    train, scored = cache.split("train"), cache.split(split)
    vocab = cache.product_embeddings.shape[0]
    return {"popularity": PopularityScorer(train, vocab),
            "personal_frequency": PersonalFrequencyScorer(train, scored, vocab, history=history),
            "cooccurrence": CooccurrenceScorer(train, vocab)}


def baseline_scorers(cache: TensorCache, split: str, params: Mapping[str, Mapping], *,
                     history: AsOfHistory | None = None) -> dict:
    """Every baseline of ``BASELINES`` fitted on train, to score ``split``; ``params`` per tuned baseline.
    ``history`` (the customers' baskets up to ``split``) is built here when not given."""
    train, scored = cache.split("train"), cache.split(split)
    vocab = cache.product_embeddings.shape[0]
    history = history if history is not None else as_of_history(cache, through=split)
    scorers = {**_simple_scorers(cache, split, history),
               **{name: cls(train, scored, vocab, history=history, **params[name])
                  for name, cls in STRONG_BASELINES.items()}}
    assert tuple(scorers) == BASELINES
    return scorers


def choose_baselines(cache: TensorCache, samples_dir: Path, *, seed: int = _EVAL.seed,
                     mask_rate: float = _EVAL.mask_rate) -> dict:
    """``baseline_choice``: the tuned settings and the strongest baseline, all from the validation split."""
    setup = prepare(cache, samples_dir, split="validation", seed=seed, mask_rate=mask_rate)
    history = setup.history  # one for the tuning and the untuned baselines
    tuned = tune_on_validation(cache, samples_dir, setup=setup)
    params = {name: dict(t["params"]) for name, t in tuned.items()}
    # The tuned baselines were scored there by the tuning; only the untuned ones are scored here.
    validation = {name: float(ranking_metrics(rank_baseline(setup, scorer))[GATE_METRIC])
                  for name, scorer in _simple_scorers(cache, "validation", history).items()}
    validation |= {name: float(t[f"validation_{GATE_METRIC}"]) for name, t in tuned.items()}
    validation = {name: validation[name] for name in BASELINES}
    strongest = max(BASELINES, key=lambda b: (validation[b], -BASELINES.index(b)))
    log.info("validation %s: %s; strongest: %s", GATE_METRIC,
             ", ".join(f"{b} {v:.4f}" for b, v in validation.items()), strongest)
    return {"split": "validation", "metric": GATE_METRIC, "n_positions": int(len(setup.positions.target)),
            "validation": validation, "params": params, "strongest": strongest}


def compare_with_baselines(model: Ranks, baselines: Mapping[str, Ranks], basket: np.ndarray, *,
                           n_resamples: int = _EVAL.bootstrap_resamples,
                           confidence: float = _EVAL.bootstrap_confidence, seed: int = _EVAL.seed) -> dict:
    """``significance``: model − each baseline on Recall@K per position, paired bootstrap over ``basket``."""
    model_hits = position_recall(model, GATE_K)
    return {name: paired_bootstrap(model_hits, position_recall(ranks, GATE_K), basket, n_resamples=n_resamples,
                                   seed=seed, confidence=confidence).to_dict()
            for name, ranks in baselines.items()}
