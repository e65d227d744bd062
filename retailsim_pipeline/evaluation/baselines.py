"""Baselines scored on the same positions as the world model (DESIGN §7).

The leakage rule is the cache's (issue 11): fitted parameters (popularity, co-occurrence) come from
the train split only; a customer's own history is *as of* the scored basket — every basket of the
same customer strictly before it, in any split (:class:`~retailsim_pipeline.prep.history.AsOfHistory`,
built once per cache by :func:`as_of_history` and passed to the personal scorers). Every scorer
exposes one method::

    score(sample [n], visible_offsets [n + 1], visible_tokens [sum]) -> torch.FloatTensor [n, V]

``sample`` are rows of the split being scored and ``visible_*`` the CSR of each position's visible
basket items (:func:`~retailsim_pipeline.evaluation.positions.visible_tokens`); higher = more likely.
Chunking is the caller's job: a call returns a dense [n, V] tensor.

* :class:`PopularityScorer` — G-TopFreq: train line count of each product.
* :class:`PersonalFrequencyScorer` — P-TopFreq: the customer's own line counts before the basket, then
  popularity.
* :class:`CooccurrenceScorer` — item-kNN: summed co-occurrence similarity to the visible items.

The secondary keys (popularity under the personal counts and under the co-occurrence sums) are added
scaled below the primary key's resolution, so the primary ordering wins and popularity only breaks its
ties. Scores are computed in float64 and returned as float32; with very large train counts two
scores that differ only in the tie-breaker may round together (then :mod:`metrics` counts a tie).
"""

from typing import Literal, Protocol

import numpy as np
import torch

from retailsim_pipeline.config import N_SPECIAL
from retailsim_pipeline.prep.cache import SplitArrays, TensorCache
from retailsim_pipeline.prep.fitting import basket_ranges, cooccurrence_similarity, product_sets
from retailsim_pipeline.prep.history import AsOfHistory

__all__ = ["product_sets"]  # re-exported: the baselines' historical home of it


class Scorer(Protocol):
    def score(self, sample: np.ndarray, visible_offsets: np.ndarray,
              visible_tokens: np.ndarray) -> torch.Tensor: ...


def train_counts(train: SplitArrays, vocab_size: int) -> np.ndarray:
    """[V] float64: train lines per token; special tokens 0."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for lo, hi in basket_ranges(train.offsets):  # a chunk at a time: the split stays memory-mapped
        a, b = int(train.offsets[lo]), int(train.offsets[hi])
        counts += np.bincount(np.asarray(train.tokens[a:b], dtype=np.int64), minlength=vocab_size)[:vocab_size]
    counts = counts.astype(np.float64)
    counts[:N_SPECIAL] = 0.0
    return counts


def _below_one(counts: np.ndarray) -> np.ndarray:
    """counts scaled into [0, 1): a tie-breaker that never outweighs one unit of a count-valued key."""
    return counts / (counts.max(initial=0.0) + 1.0)


def as_of_history(cache: TensorCache, through: str | None = None) -> AsOfHistory:
    """The as-of history of a cache's baskets: every split up to and including ``through`` in the
    cache's (time) order, all of them when ``None``. The splits are consecutive in time, so a basket of
    ``through`` (or of an earlier split) finds every one of its earlier baskets there; the later splits
    are not read (tuning on validation never opens test)."""
    names = cache.split_names
    if through is not None:
        if through not in names:
            raise ValueError(f"unknown split {through!r}; one of {names}")
        names = names[: names.index(through) + 1]
    return AsOfHistory([cache.split(name) for name in names], cache.product_embeddings.shape[0])


def scored_history_keys(scored: SplitArrays, history: AsOfHistory, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(customer_key, past_baskets)`` [N_scored] int64 of the scored split, checked against
    ``history``: same vocabulary, and every carded basket's earlier baskets (``past_baskets`` of them)
    held by it — a history built without a split before the scored one would silently miss baskets."""
    if history.vocab_size != vocab_size:
        raise ValueError(f"the history has {history.vocab_size} tokens, the scorer {vocab_size}")
    key = np.asarray(scored.customer_key, dtype=np.int64)
    past = np.asarray(scored.past_baskets, dtype=np.int64)
    held = history.held()  # [K + 1] baskets per key
    carded = key > 0
    if (key[carded] >= len(held)).any() or (past[carded] > held[np.minimum(key[carded], len(held) - 1)]).any():
        raise ValueError("the as-of history does not hold every basket before the scored ones: build it over "
                         "every split up to the scored one (as_of_history(cache, through=split))")
    return key, past


def as_of_rows(method, customer_key: np.ndarray, past_baskets: np.ndarray, sample: np.ndarray, *args) -> np.ndarray:
    """[n, V] dense float64 rows of ``method(key, past, *args)`` (an :class:`AsOfHistory` method) for
    ``sample``, computed once per distinct basket (a basket's positions share its history)."""
    distinct, inverse = np.unique(np.asarray(sample, dtype=np.int64), return_inverse=True)
    rows = method(customer_key[distinct], past_baskets[distinct], *args).toarray()  # [d, V]
    return rows[inverse.reshape(-1)]


class PopularityScorer:
    """G-TopFreq: every position gets the products' train line counts."""

    def __init__(self, train: SplitArrays, vocab_size: int):
        self.vocab_size = vocab_size
        self.counts = train_counts(train, vocab_size)  # [V]
        self._row = torch.from_numpy(self.counts.astype(np.float32))  # [V]

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        return self._row.expand(len(sample), -1).clone()  # [n, V]


class PersonalFrequencyScorer:
    """P-TopFreq: the customer's own line counts per product before the scored basket, then popularity.

    The history of a scored sample is :meth:`AsOfHistory.counts` of its ``(customer_key,
    past_baskets)``: every basket of that customer strictly before it, in any split (train, and the
    scored split's own earlier baskets among them). An anonymous basket (key 0) or a customer's first
    basket has no history, so those positions get popularity alone. Popularity (train) is scaled
    below one purchase, so every product the customer bought comes first (most bought first), then
    the rest by popularity.
    """

    def __init__(self, train: SplitArrays, scored: SplitArrays, vocab_size: int, *, history: AsOfHistory):
        self.vocab_size = vocab_size
        self.history = history
        self.customer_key, self.past_baskets = scored_history_keys(scored, history, vocab_size)  # [N_scored] each
        self._fallback = _below_one(train_counts(train, vocab_size))  # [V] in [0, 1)

    def own_counts(self, sample: np.ndarray) -> np.ndarray:
        """[n, V] float64: each sample's customer's line counts before its basket."""
        return as_of_rows(self.history.counts, self.customer_key, self.past_baskets, sample)

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((self.own_counts(sample) + self._fallback).astype(np.float32))


class CooccurrenceScorer:
    """Item-kNN: score(j) = Σ over the visible items i of sim(i, j), popularity breaking ties.

    C = XᵀX over the train baskets (X: basket × product, 0/1; diagonal zeroed) counts the baskets in
    which two products appear together. ``normalize="cosine"``: sim = C_ij / sqrt(c_i c_j) with c_i the
    baskets holding i; ``"count"``: sim = C_ij. Popularity is added scaled below half the smallest
    non-zero similarity, so any product that co-occurs with a visible item ranks above every product
    that does not. A position with nothing visible gets popularity alone.
    """

    def __init__(self, train: SplitArrays, vocab_size: int,
                 normalize: Literal["cosine", "count"] = "cosine"):
        if normalize not in ("cosine", "count"):
            raise ValueError(f"normalize must be 'cosine' or 'count', got {normalize!r}")
        self.vocab_size, self.normalize = vocab_size, normalize
        c = cooccurrence_similarity(train.offsets, train.tokens, vocab_size, normalize=normalize)  # [V, V]
        self.similarity = np.asarray(c.todense())  # [V, V] dense: products ≤ a few thousand
        smallest = c.data.min(initial=np.inf) if c.nnz else 1.0
        self._tie_breaker = _below_one(train_counts(train, vocab_size)) * (0.5 * smallest)  # [V]

    def similarity_sums(self, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> np.ndarray:
        """[n, V] float64: Σ over each position's visible products i of sim(i, ·); 0 where nothing is
        visible. The primary key of :meth:`score`, without the tie-breaker (other scorers blend it)."""
        visible = product_sets(visible_offsets, visible_tokens, self.vocab_size)  # [n, V]
        return np.asarray(visible @ self.similarity)  # [n, V] dense

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        summed = self.similarity_sums(visible_offsets, visible_tokens)  # [n, V]
        return torch.from_numpy((summed + self._tie_breaker).astype(np.float32))
