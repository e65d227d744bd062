"""The evaluation's bucket groups, each written once: the labels in ``metrics.json`` (:data:`BUCKET_GROUPS`)
and the bucketing of positions are both derived from the edges here.

- ``cold_start``: how much purchase history the model had for a position's customer;
- ``basket_length``: the basket's (truncated) length, on :data:`~retailsim_pipeline.config.EVALUATION_LENGTH_EDGES`;
- ``repeat_vs_explore``: whether the customer bought the hidden product before this basket.

Both the history buckets are as of the basket: its customer's baskets strictly before it, in any split.
"""

import numpy as np

from retailsim_pipeline.config import EVALUATION_LENGTH_EDGES, SplitConfig, length_bucket_labels

#: Inclusive upper bounds of the carded customers' buckets, in trips before the basket; the last
#: bucket is open (10+). Why these: none (a new card), a first impression (1–2 trips), some history
#: (3–9), a regular whose own frequency is informative (10+).
COLD_START_EDGES: tuple[int, ...] = (0, 2, 9)
#: Positions whose basket has no loyalty card: no customer, hence no history at all.
ANONYMOUS = "anonymous"


def _edge_labels(edges: tuple[int, ...]) -> tuple[str, ...]:
    lows = (0, *(e + 1 for e in edges))
    closed = tuple(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in zip(lows, edges))
    return (*closed, f"{lows[-1]}+")


#: Bucket labels in report order: ``("anonymous", "0", "1-2", "3-9", "10+")``.
COLD_START_BUCKETS: tuple[str, ...] = (ANONYMOUS, *_edge_labels(COLD_START_EDGES))


def bucket_cold_start(trips: np.ndarray, carded: np.ndarray) -> np.ndarray:
    """Cold-start label per position: ``trips`` [n] the customer's trips before the basket (int), ``carded``
    [n] whether the basket had a loyalty card (bool). Returns [n] labels of :data:`COLD_START_BUCKETS`."""
    carded_labels = np.asarray(COLD_START_BUCKETS[1:], dtype=object)
    # side="left" on inclusive upper bounds: trips == edge falls into the edge's own bucket.
    out = carded_labels[np.searchsorted(COLD_START_EDGES, np.asarray(trips), side="left")]
    return np.where(np.asarray(carded, dtype=bool), out, ANONYMOUS).astype(object)


#: Basket-length labels in report order (``"2-4"`` … ``"20-50"``); the last bucket ends at the length baskets
#: are truncated to (``SplitConfig.max_basket_len``).
LENGTH_BUCKETS: tuple[str, ...] = tuple(length_bucket_labels(EVALUATION_LENGTH_EDGES,
                                                             top=SplitConfig().max_basket_len))


def bucket_length(n: np.ndarray) -> np.ndarray:
    """Basket-length label per position: ``n`` [n] the basket's length. Returns [n] labels of :data:`LENGTH_BUCKETS`."""
    index = np.searchsorted(np.asarray(EVALUATION_LENGTH_EDGES), np.asarray(n), side="right") - 1
    return np.asarray(LENGTH_BUCKETS, dtype=object)[np.clip(index, 0, len(LENGTH_BUCKETS) - 1)]


#: A repeat position's hidden product was bought by the same customer before the basket; explore otherwise.
REPEAT_BUCKETS: tuple[str, ...] = ("repeat", "explore")


def bucket_repeat(bought_before: np.ndarray) -> np.ndarray:
    """``repeat``/``explore`` per position from [n] bools."""
    return np.where(np.asarray(bought_before, dtype=bool), REPEAT_BUCKETS[0], REPEAT_BUCKETS[1]).astype(object)


#: Every bucket group and its labels in report order: the keys of ``metrics.json``'s ``buckets``.
BUCKET_GROUPS: dict[str, tuple[str, ...]] = {
    "cold_start": COLD_START_BUCKETS,
    "basket_length": LENGTH_BUCKETS,
    "repeat_vs_explore": REPEAT_BUCKETS,
}
