"""Hand-built splits for the baseline tests: a few baskets with known answers."""

import dataclasses

import numpy as np

from retailsim_pipeline.prep.cache import SplitArrays


def micro_split(baskets: list[list[int]], customers: list[int], weeks: list[int] | None = None) -> SplitArrays:
    """A SplitArrays with the given baskets, customers (both ``customer_key`` and ``customer_index``)
    and weeks (default 0); ``past_baskets`` counts the customer's earlier baskets of this split alone
    (by week, then row: :func:`in_sequence` numbers them over several splits); the other arrays are
    zeros of the right length."""
    lengths = np.array([len(b) for b in baskets], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.array([t for b in baskets for t in b], dtype=np.int32)
    n, n_lines = len(baskets), len(tokens)
    customer = np.array(customers, dtype=np.int32)
    week = np.array(weeks or [0] * n, dtype=np.int32)
    return SplitArrays(
        offsets=offsets, tokens=tokens, line_log_price_ratio=np.zeros(n_lines, np.float32),
        line_quantity=np.ones(n_lines, np.int16), customer_index=customer, customer_key=customer.copy(),
        past_baskets=_past([customer], [week])[0], history_tokens=np.zeros((n, 32), np.int32),
        history_counts=np.zeros((n, 32), np.uint16), history_recency=np.zeros((n, 32), np.uint16),
        history_decayed=np.zeros((n, 32), np.float16),
        store_index=np.zeros(n, np.int32), temporal=np.zeros((n, 64), np.float16),
        trip=np.zeros((n, 48), np.float16), labels=np.zeros((n, 4), np.int8),
        basket_id=np.arange(n, dtype=np.int64), week=week, n_lines=lengths.astype(np.int32))


def in_sequence(*splits: SplitArrays) -> list[SplitArrays]:
    """The splits with ``past_baskets`` numbered over all of them: a customer's baskets in split order,
    then by week, then by row (as the cache numbers them by time)."""
    past = _past([np.asarray(s.customer_key) for s in splits], [np.asarray(s.week) for s in splits])
    return [dataclasses.replace(s, past_baskets=p) for s, p in zip(splits, past)]


def _past(keys: list[np.ndarray], weeks: list[np.ndarray]) -> list[np.ndarray]:
    key = np.concatenate(keys).astype(np.int64)
    split = np.concatenate([np.full(len(k), i) for i, k in enumerate(keys)])
    order = np.lexsort((np.arange(len(key)), np.concatenate(weeks), split, key))  # by key, split, week, row
    sorted_key = key[order]
    first = np.searchsorted(sorted_key, sorted_key, side="left")
    past = np.zeros(len(key), np.int32)
    past[order] = np.arange(len(key)) - first
    past[key == 0] = 0
    out, lo = [], 0
    for k in keys:
        out.append(past[lo:lo + len(k)])
        lo += len(k)
    return out
