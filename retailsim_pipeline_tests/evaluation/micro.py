"""Hand-built splits for the baseline tests: a few baskets with known answers."""

import numpy as np

from retailsim_pipeline.prep.cache import SplitArrays


def micro_split(baskets: list[list[int]], customers: list[int], weeks: list[int] | None = None) -> SplitArrays:
    """A SplitArrays with the given baskets, customers and weeks (default 0); the other arrays are zeros
    of the right length."""
    lengths = np.array([len(b) for b in baskets], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.array([t for b in baskets for t in b], dtype=np.int32)
    n, n_lines = len(baskets), len(tokens)
    return SplitArrays(
        offsets=offsets, tokens=tokens, line_log_price_ratio=np.zeros(n_lines, np.float32),
        line_quantity=np.ones(n_lines, np.int16), customer_index=np.array(customers, dtype=np.int32),
        store_index=np.zeros(n, np.int32), temporal=np.zeros((n, 64), np.float16),
        trip=np.zeros((n, 48), np.float16), labels=np.zeros((n, 4), np.int8),
        basket_id=np.arange(n, dtype=np.int64), week=np.array(weeks or [0] * n, dtype=np.int32),
        n_lines=lengths.astype(np.int32))
