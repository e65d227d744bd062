"""Baselines scored on the same positions as the world model (DESIGN §7).

Every scorer fits on the train split only and exposes one method::

    score(sample [n], visible_offsets [n + 1], visible_tokens [sum]) -> torch.FloatTensor [n, V]

``sample`` are rows of the split being scored and ``visible_*`` the CSR of each position's visible
basket items (:func:`~retailsim_pipeline.evaluation.positions.visible_tokens`); higher = more likely.
Chunking is the caller's job: a call returns a dense [n, V] tensor.

* :class:`PopularityScorer` — G-TopFreq: train line count of each product.
* :class:`PersonalFrequencyScorer` — P-TopFreq: the customer's own train line counts, then popularity.
* :class:`CooccurrenceScorer` — item-kNN: summed co-occurrence similarity to the visible items.

The secondary keys (popularity under the personal counts and under the co-occurrence sums) are added
scaled below the primary key's resolution, so the primary ordering wins and popularity only breaks its
ties. Scores are computed in float64 and returned as float32; with very large train counts two
scores that differ only in the tie-breaker may round together (then :mod:`metrics` counts a tie).
"""

from typing import Literal, Protocol

import numpy as np
import scipy.sparse as sp
import torch

from retailsim_pipeline.config import N_SPECIAL
from retailsim_pipeline.prep.cache import SplitArrays
from retailsim_pipeline.prep.fitting import customer_product_counts


class Scorer(Protocol):
    def score(self, sample: np.ndarray, visible_offsets: np.ndarray,
              visible_tokens: np.ndarray) -> torch.Tensor: ...


def train_counts(train: SplitArrays, vocab_size: int) -> np.ndarray:
    """[V] float64: train lines per token; special tokens 0."""
    counts = np.bincount(np.asarray(train.tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    counts = counts.astype(np.float64)
    counts[:N_SPECIAL] = 0.0
    return counts


def _below_one(counts: np.ndarray) -> np.ndarray:
    """counts scaled into [0, 1): a tie-breaker that never outweighs one unit of a count-valued key."""
    return counts / (counts.max(initial=0.0) + 1.0)


def product_sets(offsets: np.ndarray, tokens: np.ndarray, vocab_size: int) -> sp.csr_matrix:
    """[n, V] 0/1 float64 CSR of a token CSR ``(offsets [n + 1], tokens)``: which products each row
    holds (a set: duplicates count once; special tokens dropped). Rows are a position's visible items
    or a split's baskets."""
    offsets = np.asarray(offsets, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    keep = tokens >= N_SPECIAL
    m = sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], tokens[keep])),
                      shape=(len(offsets) - 1, vocab_size))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


class PopularityScorer:
    """G-TopFreq: every position gets the products' train line counts."""

    def __init__(self, train: SplitArrays, vocab_size: int):
        self.vocab_size = vocab_size
        self.counts = train_counts(train, vocab_size)  # [V]
        self._row = torch.from_numpy(self.counts.astype(np.float32))  # [V]

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        return self._row.expand(len(sample), -1).clone()  # [n, V]


class PersonalFrequencyScorer:
    """P-TopFreq: the customer's own train line counts per product, then popularity.

    The customer of a scored sample is ``scored.customer_index[sample]``; row 0 (anonymous, or a
    customer not seen in train) has no history, so those positions get popularity alone. Popularity is
    scaled below one purchase, so every product the customer bought comes first (most bought first),
    then the rest by popularity.
    """

    def __init__(self, train: SplitArrays, scored: SplitArrays, vocab_size: int):
        self.vocab_size = vocab_size
        self.customer_index = np.asarray(scored.customer_index, dtype=np.int64)  # [N_scored]
        train_customer = np.asarray(train.customer_index, dtype=np.int64)  # [N_train]
        n_customers = int(max(train_customer.max(initial=0), self.customer_index.max(initial=0))) + 1
        # [C, V] train lines bought per customer and product; row 0 = no identity, no history
        self.history = customer_product_counts(train_customer, train.offsets, train.tokens, n_customers, vocab_size)
        self._fallback = _below_one(train_counts(train, vocab_size))  # [V] in [0, 1)

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        customers = self.customer_index[np.asarray(sample, dtype=np.int64)]  # [n]
        own = self.history[customers].toarray()  # [n, V]
        return torch.from_numpy((own + self._fallback).astype(np.float32))


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
        x = product_sets(train.offsets, train.tokens, vocab_size)  # [N_train, V] 0/1
        c = (x.T @ x).tocsr().astype(np.float64)  # [V, V]
        baskets_with = c.diagonal().copy()  # [V] c_i
        c.setdiag(0.0)
        c.eliminate_zeros()
        if normalize == "cosine":
            inv = np.divide(1.0, np.sqrt(baskets_with), out=np.zeros(vocab_size), where=baskets_with > 0)
            c = sp.diags(inv) @ c @ sp.diags(inv)
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
