"""Product embeddings fitted on train baskets: PPMI of co-occurrence, randomized SVD, hierarchy codes.

See :func:`build_product_embeddings` for the method. Seeded throughout: the same train baskets and
config give the same table bit for bit (the leakage check rebuilds it and compares).
"""

import numpy as np
import polars as pl
import scipy.sparse as sp

from retailsim_pipeline.config import MASK, N_SPECIAL, PAD, UNK, CacheConfig


def _randomized_svd(m: sp.csr_matrix, k: int, seed: int, n_iter: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` left singular vectors and values of a sparse matrix (Halko et al. 2011), deterministic."""
    rng = np.random.default_rng(seed)
    n = m.shape[1]
    k = min(k, min(m.shape))
    q = m @ rng.standard_normal((n, k + 10))
    q, _ = np.linalg.qr(q)
    for _ in range(n_iter):
        q, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ q)
    b = q.T @ m
    u_b, s, _ = np.linalg.svd(np.asarray(b), full_matrices=False)
    u = (q @ u_b)[:, :k]
    s = s[:k]
    # Fix each vector's sign (largest component positive) so the embedding is reproducible.
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, s


def product_sets(offsets: np.ndarray, tokens: np.ndarray, vocab_size: int) -> sp.csr_matrix:
    """[n, V] 0/1 float64 CSR of a token CSR ``(offsets [n + 1], tokens)``: which products each row
    holds (a set: duplicates count once; special tokens dropped). Rows are baskets, or a position's
    visible items."""
    offsets = np.asarray(offsets, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    keep = tokens >= N_SPECIAL
    m = sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], tokens[keep])), shape=(len(offsets) - 1, vocab_size))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def cooccurrence_counts(offsets: np.ndarray, tokens: np.ndarray, vocab_size: int) -> sp.csr_matrix:
    """[V, V] float64 CSR ``Xᵀ X`` of the baskets ``(offsets [n + 1], tokens)``, X their basket × product
    0/1 incidence (:func:`product_sets`): entry (i, j) counts the baskets holding both i and j, the
    diagonal the baskets holding i; special tokens 0.

    Additive over baskets: the counts of a split are the sum of its chunks' counts, exact (integers in
    float64) up to 2^53, so a split can be counted a few weeks at a time."""
    counts = _xtx(offsets, tokens, vocab_size)
    counts.sort_indices()
    return counts


def _xtx(offsets: np.ndarray, tokens: np.ndarray, vocab_size: int) -> sp.csr_matrix:
    """:func:`cooccurrence_counts` with its column indices in any order within a row (no sort: the
    summing callers do not need one)."""
    x = product_sets(offsets, tokens, vocab_size)
    return x.T.tocsr() @ x  # CSR @ CSR: no CSC product to convert


#: :class:`CooccurrenceSum` adds densely up to this size of a [V, V] float64 (V ≤ 11,585).
COOC_DENSE_MAX_BYTES = 1 << 30


class CooccurrenceSum:
    """The :func:`cooccurrence_counts` of chunks of baskets, summed: :meth:`add` a chunk, :meth:`csr` the
    total, the same canonical CSR (bit for bit: integer counts, exact in float64 up to 2^53) as the
    counts of all the baskets at once.

    The sum is held as a dense [V, V] float64 while that takes at most :data:`COOC_DENSE_MAX_BYTES`
    (adding a chunk is then a dense add, ~0.25 s at V = 5,000, where a sparse sum of two 15M-entry
    matrices takes twice that and a sorted product a further 0.5 s), else as a sparse sum."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)
        dense = self.vocab_size ** 2 * 8 <= COOC_DENSE_MAX_BYTES
        self._dense = np.zeros((self.vocab_size, self.vocab_size)) if dense else None
        self._sparse = None if dense else sp.csr_matrix((self.vocab_size, self.vocab_size))

    def add(self, offsets: np.ndarray, tokens: np.ndarray) -> None:
        counts = _xtx(offsets, tokens, self.vocab_size)
        if self._dense is not None:
            self._dense += counts.toarray()
        else:
            self._sparse = self._sparse + counts

    def csr(self) -> sp.csr_matrix:
        if self._dense is not None:
            return sp.csr_matrix(self._dense)
        total = self._sparse.tocsr(copy=True)
        total.sum_duplicates()
        return total


def build_product_embeddings(
    offsets: np.ndarray, tokens: np.ndarray, vocab: pl.DataFrame, config: CacheConfig
) -> np.ndarray:
    """Product embeddings [V, 256] float32 from train baskets ``(offsets [n + 1], tokens)``: see
    :func:`build_product_embeddings_from_counts`."""
    return build_product_embeddings_from_counts(cooccurrence_counts(offsets, tokens, vocab.height), vocab, config)


def build_product_embeddings_from_counts(cooc: sp.spmatrix, vocab: pl.DataFrame, config: CacheConfig) -> np.ndarray:
    """Product embeddings [V, 256] float32 from the train baskets' co-occurrence counts ``cooc`` [V, V]
    (:func:`cooccurrence_counts`, summed over chunks of the split; its diagonal is ignored). Reads
    ``cooc``, never modifies it.

    Method (documented for the README):

    1. Co-occurrence counts ``C = Xᵀ X`` of the basket × product incidence matrix of train baskets
       (diagonal removed), i.e. how often two products share a basket.
    2. Positive PMI with context-distribution smoothing α = 0.75 (Levy, Goldberg & Dagan 2015):
       ``PPMI(i, j) = max(0, log P(i, j) / (P(i) P_α(j)))``.
    3. Randomized truncated SVD of the PPMI matrix; a product's co-occurrence vector is
       ``U_k √S_k``, L2-normalised (192 dims by default; rank at most a quarter of the products, the
       rest zero, so small vocabularies are still compressed).
    4. Hierarchy: for each of the 4 levels (CL, DEP, G, D) the mean co-occurrence vector of the
       product's group, projected by a fixed random Gaussian matrix to 16 dims and normalised, so
       rare products borrow strength from their class (64 dims).

    PAD and MASK rows are zero (the model learns its own MASK embedding); UNK is the mean product.
    The result depends on the counts only (not on how they were summed): every later sum runs over
    integer-valued float64 (exact), and the PPMI matrix is rebuilt in canonical (sorted) order.
    """
    v = vocab.height
    k = config.cooccurrence_dim
    if cooc.shape != (v, v):
        raise ValueError(f"co-occurrence counts of shape {cooc.shape}: the vocabulary has {v} tokens, "
                         f"expected ({v}, {v})")
    c = sp.csr_matrix(cooc, dtype=np.float64, copy=True)
    c.setdiag(0)
    c.eliminate_zeros()
    total = c.sum()
    emb = np.zeros((v, config.product_dim), dtype=np.float32)
    if total > 0:
        row_sum = np.asarray(c.sum(axis=1)).ravel()
        ctx = row_sum**config.ppmi_smoothing
        ctx = ctx / ctx.sum()
        coo = c.tocoo()
        pmi = np.log(coo.data / total) - np.log(row_sum[coo.row] / total) - np.log(ctx[coo.col])
        keep = pmi > 0
        ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(v, v))
        # The truncation is what makes products that share contexts similar: a near-full-rank SVD
        # of a small vocabulary would reproduce the PPMI rows and keep every product orthogonal.
        rank = min(k, max(16, (v - N_SPECIAL) // 4))
        u, s = _randomized_svd(ppmi, rank, config.seed)
        cooc = u * np.sqrt(s)
        norms = np.linalg.norm(cooc, axis=1, keepdims=True)
        cooc = np.divide(cooc, norms, out=np.zeros_like(cooc), where=norms > 0)
        emb[:, : cooc.shape[1]] = cooc
    rng = np.random.default_rng(config.seed + 1)
    h = config.hierarchy_dim_per_level
    for level, col in enumerate(("PROD_CODE_10", "PROD_CODE_20", "PROD_CODE_30", "PROD_CODE_40")):
        groups = vocab.get_column(col).fill_null("<none>").to_numpy()
        _, group_idx = np.unique(groups, return_inverse=True)
        sums = np.zeros((group_idx.max() + 1, k), dtype=np.float64)
        np.add.at(sums, group_idx[N_SPECIAL:], emb[N_SPECIAL:, :k])
        proj = rng.standard_normal((k, h)) / np.sqrt(k)
        code = sums[group_idx] @ proj
        norms = np.linalg.norm(code, axis=1, keepdims=True)
        code = np.divide(code, norms, out=np.zeros_like(code), where=norms > 0)
        emb[:, k + level * h: k + (level + 1) * h] = code
    emb[PAD] = 0.0
    emb[MASK] = 0.0
    emb[UNK] = emb[N_SPECIAL:].mean(axis=0) if v > N_SPECIAL else 0.0
    return emb
