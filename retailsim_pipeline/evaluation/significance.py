"""Is scorer A significantly better than scorer B on the same positions? A paired bootstrap over baskets.

Why baskets, not positions
    The positions of one basket share its customer, its store and its other lines, so their hits are
    correlated: a position-level bootstrap treats them as independent and gives intervals that are too
    narrow (a single lucky basket can then look "significant"). The basket is the unit that was sampled,
    so the basket is what is resampled; all of a drawn basket's positions come with it.

Why paired
    Both scorers are scored on the same positions (``evaluation.positions``), and most of the variance
    of a hit is the position's difficulty, which both scorers share. Resampling the *difference* per
    basket cancels that shared part; two independent bootstraps (one per scorer) would keep it and
    give a much wider interval.

Statistic
    ``mean(a) − mean(b)`` over positions. For a resample that draws basket j ``w_j`` times it is
    ``Σ_j w_j·D_j / Σ_j w_j·n_j`` with ``D_j`` the basket's summed ``a − b`` and ``n_j`` its position
    count — exactly the difference of the means over the resample's expanded positions, computed from
    two [n_baskets] arrays instead of the positions. The interval is the percentile interval of the
    ``n_resamples`` resampled differences; :attr:`BootstrapResult.significant` means its lower end is
    above zero (one-sided at (1 − confidence) / 2: a 95 % interval is a 2.5 % test of "A is better").

Resamples
    The gate uses :data:`MIN_RESAMPLES` = 1000 (the project's rule: with fewer, the 2.5 % tail rests
    on a couple of dozen draws); fewer raise ``ValueError`` unless ``allow_few=True`` (tests, quick
    looks). Same seed and inputs → the same interval, whatever the chunking.
"""

from dataclasses import asdict, dataclass

import numpy as np

#: The project's minimum number of bootstrap resamples for a gate decision.
MIN_RESAMPLES = 1000
#: Basket draws held at once (resamples per chunk × baskets): 4M draws are 32 MB of int64 indices plus
#: 32 MB of gathered values, so 50k baskets × 1000 resamples never allocate more than ~64 MB at once.
_CHUNK_DRAWS = 4_000_000


@dataclass(frozen=True)
class BootstrapResult:
    """Observed ``mean(a) − mean(b)`` and its percentile interval over basket resamples."""

    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    seed: int
    n_baskets: int
    n_positions: int

    @property
    def significant(self) -> bool:
        """A is better than B: the whole interval lies above zero."""
        return self.ci_low > 0.0

    def to_dict(self) -> dict:
        """Plain JSON types: the fields plus ``significant``."""
        return {**asdict(self), "significant": self.significant}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, basket: np.ndarray, *, n_resamples: int = MIN_RESAMPLES,
                     seed: int = 0, confidence: float = 0.95, allow_few: bool = False) -> BootstrapResult:
    """Paired bootstrap over baskets of ``mean(a) − mean(b)`` (see the module docstring).

    a, b          [n] float  per-position values of two scorers on the same positions (e.g.
                             :func:`~retailsim_pipeline.evaluation.metrics.position_recall`)
    basket        [n] int    basket of each position (e.g. ``EvalPositions.sample``); any labels
    n_resamples   ≥ :data:`MIN_RESAMPLES` unless ``allow_few`` (then ≥ 1)
    confidence    two-sided coverage of the percentile interval, in (0, 1)

    Work is O(n + n_resamples · n_baskets), in chunks of resamples so memory stays bounded.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    basket = np.asarray(basket)
    if a.ndim != 1 or a.shape != b.shape or a.shape != basket.shape:
        raise ValueError(f"a, b and basket must be 1-d arrays of one length (the positions); got shapes "
                         f"{a.shape}, {b.shape}, {basket.shape}")
    for name, x in (("a", a), ("b", b)):
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x))[0])
            raise ValueError(f"{name}[{bad}] = {x[bad]} is not finite; per-position values must be numbers")
    lowest = 1 if allow_few else MIN_RESAMPLES
    if n_resamples < lowest:
        raise ValueError(f"n_resamples = {n_resamples} < {lowest}: a gate decision needs at least {MIN_RESAMPLES} "
                         f"resamples (pass allow_few=True only for tests and quick looks)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    labels, inverse = np.unique(basket, return_inverse=True)
    n_baskets, n_positions = len(labels), len(a)
    if n_baskets < 2:
        raise ValueError(f"{n_positions} positions in {n_baskets} basket(s): resampling baskets needs at least 2 "
                         f"(with one, every resample is the data and the interval has zero width)")
    diff_sum = np.bincount(inverse, weights=a - b, minlength=n_baskets)  # [B] Σ (a − b) per basket
    count = np.bincount(inverse, minlength=n_baskets).astype(np.float64)  # [B] positions per basket

    rng = np.random.default_rng(seed)
    resampled = np.empty(n_resamples, dtype=np.float64)  # [R]
    per_chunk = max(1, _CHUNK_DRAWS // n_baskets)
    for start in range(0, n_resamples, per_chunk):
        rows = min(per_chunk, n_resamples - start)
        drawn = rng.integers(0, n_baskets, size=(rows, n_baskets))  # [rows, B] basket indices, with replacement
        resampled[start:start + rows] = diff_sum[drawn].sum(1) / count[drawn].sum(1)

    tail = (1.0 - confidence) / 2.0
    ci_low, ci_high = np.quantile(resampled, [tail, 1.0 - tail])
    return BootstrapResult(difference=float(a.mean() - b.mean()), ci_low=float(ci_low), ci_high=float(ci_high),
                           confidence=float(confidence), n_resamples=int(n_resamples), seed=int(seed),
                           n_baskets=int(n_baskets), n_positions=int(n_positions))
