"""Paired bootstrap over baskets: planted differences, pairing, basket clustering, a naive oracle, seeds,
bounded memory and speed."""

import json
import time
import tracemalloc

import numpy as np
import pytest

from retailsim_pipeline.evaluation import significance
from retailsim_pipeline.evaluation.significance import MIN_RESAMPLES, BootstrapResult, paired_bootstrap


def _baskets(rng: np.random.Generator, n_baskets: int, extra: float = 1.0) -> np.ndarray:
    """[n] basket label per position, 1 + Poisson(extra) positions per basket, sorted like EvalPositions."""
    lengths = 1 + rng.poisson(extra, n_baskets)
    return np.repeat(np.arange(n_baskets, dtype=np.int64), lengths)


def _hits(rng: np.random.Generator, p: float | np.ndarray, n: int) -> np.ndarray:
    return (rng.random(n) < p).astype(np.float64)


def _unpaired_interval(a, b, basket, *, n_resamples=MIN_RESAMPLES, seed=0, confidence=0.95):
    """The wrong bootstrap for comparison: baskets drawn independently for a and for b."""
    rng = np.random.default_rng(seed)
    labels, inverse = np.unique(basket, return_inverse=True)
    count = np.bincount(inverse).astype(np.float64)
    sums = [np.bincount(inverse, weights=x) for x in (a, b)]
    means = []
    for s in sums:
        drawn = rng.integers(0, len(labels), size=(n_resamples, len(labels)))
        means.append(s[drawn].sum(1) / count[drawn].sum(1))
    tail = (1 - confidence) / 2
    return np.quantile(means[0] - means[1], [tail, 1 - tail])


def test_identical_scorers_have_no_difference():
    rng = np.random.default_rng(0)
    basket = _baskets(rng, 2_000)
    a = _hits(rng, 0.3, len(basket))
    r = paired_bootstrap(a, a.copy(), basket)
    assert r.difference == 0.0
    assert r.ci_low <= 0.0 <= r.ci_high and (r.ci_low, r.ci_high) == (0.0, 0.0)
    assert not r.significant
    assert (r.n_baskets, r.n_positions, r.n_resamples, r.seed) == (2_000, len(basket), MIN_RESAMPLES, 0)


def test_planted_improvement_is_significant_and_covered():
    rng = np.random.default_rng(1)
    basket = _baskets(rng, 4_000)
    n = len(basket)
    b = _hits(rng, 0.2, n)
    a = b + (rng.random(n) < 0.3)  # true difference 0.3
    r = paired_bootstrap(a, b, basket)
    assert r.significant
    assert 0.0 < r.ci_low <= 0.3 <= r.ci_high
    assert r.ci_low <= r.difference <= r.ci_high
    assert r.ci_high - r.ci_low < 0.05


def test_reversed_difference_is_not_significant_and_mirrors():
    rng = np.random.default_rng(2)
    basket = _baskets(rng, 3_000)
    b = _hits(rng, 0.2, len(basket))
    a = b + (rng.random(len(basket)) < 0.1)
    forward, backward = paired_bootstrap(a, b, basket, seed=5), paired_bootstrap(b, a, basket, seed=5)
    assert forward.significant and not backward.significant
    assert backward.ci_low < backward.ci_high < 0.0
    # Same seed, same draws: the resampled differences are exactly negated.
    assert backward.difference == pytest.approx(-forward.difference, abs=1e-15)
    assert (backward.ci_low, backward.ci_high) == pytest.approx((-forward.ci_high, -forward.ci_low), abs=1e-12)


def test_small_noisy_sample_is_not_significant():
    rng = np.random.default_rng(3)
    basket = _baskets(rng, 8)
    b = rng.normal(0.0, 1.0, len(basket))
    a = b + rng.normal(0.2, 5.0, len(basket))  # a real but tiny edge drowned in noise
    r = paired_bootstrap(a, b, basket)
    assert r.ci_low < 0.0 < r.ci_high and not r.significant


def test_pairing_cancels_the_shared_basket_difficulty():
    # Baskets are easy (both scorers hit ~90 %) or hard (~2 %): most variance is shared. A adds a small
    # improvement on top of B's hits.
    rng = np.random.default_rng(4)
    n_baskets = 600
    basket = _baskets(rng, n_baskets, extra=2.0)
    easy = rng.random(n_baskets) < 0.5
    b = _hits(rng, np.where(easy, 0.9, 0.02)[basket], len(basket))
    a = np.maximum(b, _hits(rng, 0.05, len(basket)))
    paired = paired_bootstrap(a, b, basket)
    lo, hi = _unpaired_interval(a, b, basket)
    assert paired.significant
    assert lo < 0.0 < hi  # two independent bootstraps keep the shared variance: not significant
    assert (hi - lo) > 5 * (paired.ci_high - paired.ci_low)


def test_positions_of_a_basket_move_together():
    # The whole difference sits in one basket of 5 positions. A resample leaves that basket out with
    # probability (1 − 1/B)^B ≈ e^-1 ≈ 37 % > 2.5 %, and then its difference is exactly 0: the interval
    # starts at 0 and the gate does not pass. Resampling positions instead would leave all 5 out only
    # with probability ≈ e^-5 ≈ 0.7 % < 2.5 %, and call one lucky basket significant.
    rng = np.random.default_rng(5)
    basket = np.concatenate([np.zeros(5, dtype=np.int64), 1 + _baskets(rng, 2_000)])
    b = _hits(rng, 0.3, len(basket))
    a = b.copy()
    a[:5], b[:5] = 1.0, 0.0
    r = paired_bootstrap(a, b, basket)
    assert r.ci_low == 0.0 < r.difference < r.ci_high
    assert not r.significant
    by_position = paired_bootstrap(a, b, np.arange(len(basket)))
    assert by_position.significant


def test_matches_naive_resampling_of_expanded_positions():
    # Oracle: each resample's basket indices (the same stream of draws), expanded to their positions,
    # and the difference of the plain means over those positions.
    rng = np.random.default_rng(6)
    basket = 10 * _baskets(rng, 30, extra=2.0) + 7  # labels need not be 0…B−1
    a, b = rng.random(len(basket)), _hits(rng, 0.5, len(basket))
    r = paired_bootstrap(a, b, basket, seed=9, confidence=0.9)
    labels = np.unique(basket)
    drawn = np.random.default_rng(9).integers(0, len(labels), size=(MIN_RESAMPLES, len(labels)))
    diffs = []
    for row in drawn:
        pos = np.concatenate([np.flatnonzero(basket == labels[j]) for j in row])
        diffs.append(a[pos].mean() - b[pos].mean())
    assert (r.ci_low, r.ci_high) == pytest.approx(tuple(np.quantile(diffs, [0.05, 0.95])), rel=1e-12, abs=1e-15)
    assert r.difference == pytest.approx(a.mean() - b.mean(), abs=1e-15)


def test_seeded_and_independent_of_chunking(monkeypatch):
    rng = np.random.default_rng(7)
    basket = _baskets(rng, 1_001)
    b = _hits(rng, 0.2, len(basket))
    a = np.maximum(b, _hits(rng, 0.05, len(basket)))
    first = paired_bootstrap(a, b, basket, seed=3)
    assert paired_bootstrap(a, b, basket, seed=3) == first
    other = paired_bootstrap(a, b, basket, seed=4)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    width = first.ci_high - first.ci_low
    assert abs(other.ci_low - first.ci_low) < 0.2 * width and abs(other.ci_high - first.ci_high) < 0.2 * width
    monkeypatch.setattr(significance, "_CHUNK_DRAWS", 7 * 1_001 + 3)  # chunks of 7 resamples, a ragged last one
    assert paired_bootstrap(a, b, basket, seed=3) == first


def test_to_dict_is_plain_json():
    rng = np.random.default_rng(8)
    basket = _baskets(rng, 50)
    r = paired_bootstrap(_hits(rng, 0.5, len(basket)), _hits(rng, 0.4, len(basket)), basket, seed=2)
    d = r.to_dict()
    assert set(d) == {"difference", "ci_low", "ci_high", "confidence", "n_resamples", "seed", "n_baskets",
                      "n_positions", "significant"}
    assert json.loads(json.dumps(d)) == d
    assert d["significant"] is r.significant and type(d["n_baskets"]) is int and type(d["ci_low"]) is float
    assert BootstrapResult(**{k: v for k, v in d.items() if k != "significant"}) == r


def test_rejects_bad_input():
    basket = np.array([0, 0, 1, 2])
    a, b = np.ones(4), np.zeros(4)
    with pytest.raises(ValueError, match="at least 1000"):
        paired_bootstrap(a, b, basket, n_resamples=999)
    assert paired_bootstrap(a, b, basket, n_resamples=50, allow_few=True).n_resamples == 50
    with pytest.raises(ValueError, match="n_resamples = 0"):
        paired_bootstrap(a, b, basket, n_resamples=0, allow_few=True)
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(a, b[:3], basket)
    with pytest.raises(ValueError, match=r"b\[2\] = nan"):
        paired_bootstrap(a, np.array([0, 0, np.nan, 0]), basket)
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap(a, b, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap(a[:0], b[:0], basket[:0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(a, b, basket, confidence=1.0)


def test_gate_sized_input_is_fast_and_memory_bounded():
    # 50,000 baskets / 80,000 positions, 1000 resamples: the size of a test split's evaluation.
    rng = np.random.default_rng(9)
    basket = np.sort(np.concatenate([np.arange(50_000), rng.integers(0, 50_000, 30_000)]))
    b = _hits(rng, 0.2, len(basket))
    a = np.maximum(b, _hits(rng, 0.02, len(basket)))
    start = time.perf_counter()
    r = paired_bootstrap(a, b, basket)
    seconds = time.perf_counter() - start
    assert (r.n_baskets, r.n_positions) == (50_000, 80_000) and r.significant
    assert seconds < 10.0, f"{seconds:.2f} s"  # ~0.35 s on one core; generous for shared CI machines
    tracemalloc.start()
    paired_bootstrap(a, b, basket)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100 * 2**20, f"peak {peak / 2**20:.0f} MiB"
