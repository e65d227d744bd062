"""Cold-start buckets: how much purchase history the model had for a position's customer.

The bucket edges are written once here; the labels in ``metrics.json`` (:data:`COLD_START_BUCKETS`) and
the bucketing of positions (:func:`bucket_cold_start`) are both derived from them.
"""

import numpy as np

#: Inclusive upper bounds of the carded customers' buckets, in trips in the train split; the last
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
    """Cold-start label per position: ``trips`` [n] the customer's train-split trips (int), ``carded``
    [n] whether the basket had a loyalty card (bool). Returns [n] labels of :data:`COLD_START_BUCKETS`."""
    carded_labels = np.asarray(COLD_START_BUCKETS[1:], dtype=object)
    # side="left" on inclusive upper bounds: trips == edge falls into the edge's own bucket.
    out = carded_labels[np.searchsorted(COLD_START_EDGES, np.asarray(trips), side="left")]
    return np.where(np.asarray(carded, dtype=bool), out, ANONYMOUS).astype(object)
