"""The strongest simple baselines (issue 11 §1): a blend of the simple scorers, and TIFU-KNN.

Same contract as :mod:`~retailsim_pipeline.evaluation.baselines`: fitted on the train split only,
``score(sample [n], visible_offsets [n + 1], visible_tokens [sum]) -> torch.FloatTensor [n, V]``
(higher = more likely), vectorised over the positions of a call; chunking is the caller's job.

* :class:`BlendScorer` — personal frequency share + ``w_cooc`` × normalised co-occurrence sums +
  ``w_pop`` × normalised popularity.
* :class:`TifuKnnScorer` — a time-decayed personal vector blended with the mean vector of the
  customer's ``k`` nearest customers (after TIFU-KNN, Hu et al., SIGIR 2020).

Both add popularity as a tie-breaker scaled, per row, to 1/1000 of the row's smallest positive
primary score (:func:`_tie_broken`): it never lifts a product the primary key gives 0 above one it
gives anything, and products the primary key cannot tell apart (every product, for an anonymous
customer with nothing visible) are ordered by popularity instead of counting as ties. Parameters are
tuned on the validation split by :mod:`~retailsim_pipeline.evaluation.tuning`.
"""

import copy

import numpy as np
import scipy.sparse as sp
import torch

from retailsim_pipeline.evaluation.baselines import CooccurrenceScorer, product_sets, train_counts
from retailsim_pipeline.prep.cache import SplitArrays
from retailsim_pipeline.prep.fitting import customer_product_counts

#: Dense cells of one chunk of the customer × customer similarity (float64: 32 MiB), bounding the
#: k-NN search's memory whatever the number of customers.
KNN_CHUNK_CELLS = 1 << 22
_TIE_SCALE = 1e-3  # the tie-breaker's share of a row's smallest positive primary score


def n_customer_rows(train: SplitArrays, scored: SplitArrays) -> int:
    """Rows of the customer tables both splits index (row 0 = anonymous or not seen in train)."""
    top = max(np.asarray(train.customer_index).max(initial=0), np.asarray(scored.customer_index).max(initial=0))
    return int(top) + 1


def popularity_share(train: SplitArrays, vocab_size: int) -> np.ndarray:
    """[V] float64: train line count of each product divided by the largest (0 for special tokens)."""
    counts = train_counts(train, vocab_size)
    return counts / max(counts.max(initial=0.0), 1.0)


def _tie_broken(primary: np.ndarray, popularity: np.ndarray) -> torch.Tensor:
    """primary [n, V] float64 + popularity [V] (max ≤ 1) scaled per row below the row's smallest
    positive primary score (1 for a row with none), as float32."""
    smallest = np.where(primary > 0, primary, np.inf).min(axis=1, initial=np.inf)  # [n]
    scale = _TIE_SCALE * np.where(np.isfinite(smallest), smallest, 1.0)  # [n]
    return torch.from_numpy((primary + scale[:, None] * popularity[None, :]).astype(np.float32))


class BlendScorer:
    """score = own share + ``w_cooc`` × co-occurrence + ``w_pop`` × popularity, then popularity ties.

    own share     the customer's train line counts per product divided by their total (a row sums to
                  1; 0 for an anonymous or unseen customer)
    co-occurrence :meth:`CooccurrenceScorer.similarity_sums` of the position's visible items, each
                  row divided by its max (0 where nothing is visible or nothing co-occurs)
    popularity    :func:`popularity_share` (max 1)

    Weights only enter at scoring time, so :meth:`with_weights` gives the same fit other weights
    (the validation grid reuses one fit). ``cooccurrence`` reuses a fitted co-occurrence scorer.
    """

    def __init__(self, train: SplitArrays, scored: SplitArrays, vocab_size: int, *, w_cooc: float = 0.03,
                 w_pop: float = 0.0, cooccurrence: CooccurrenceScorer | None = None):
        # defaults: the demo data's validation choice (tuning.BLEND_GRID); tune per dataset
        self.vocab_size, self.w_cooc, self.w_pop = vocab_size, float(w_cooc), float(w_pop)
        self.customer_index = np.asarray(scored.customer_index, dtype=np.int64)  # [N_scored]
        counts = customer_product_counts(train.customer_index, train.offsets, train.tokens,
                                         n_customer_rows(train, scored), vocab_size)  # [C, V]
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()  # [C]
        inv = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
        self.own_share = (sp.diags(inv) @ counts.astype(np.float64)).tocsr()  # [C, V] rows sum to 1 or 0
        self.cooccurrence = cooccurrence if cooccurrence is not None else CooccurrenceScorer(train, vocab_size)
        self.popularity = popularity_share(train, vocab_size)  # [V]

    def with_weights(self, *, w_cooc: float, w_pop: float) -> "BlendScorer":
        """The same fitted scorer with other weights (shares the fitted arrays)."""
        other = copy.copy(self)
        other.w_cooc, other.w_pop = float(w_cooc), float(w_pop)
        return other

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        customers = self.customer_index[np.asarray(sample, dtype=np.int64)]  # [n]
        primary = self.own_share[customers].toarray()  # [n, V]
        if self.w_cooc:
            sums = self.cooccurrence.similarity_sums(visible_offsets, visible_tokens)  # [n, V]
            top = sums.max(axis=1, initial=0.0)  # [n]
            primary += self.w_cooc * sums / np.where(top > 0, top, 1.0)[:, None]
        primary += self.w_pop * self.popularity[None, :]
        return _tie_broken(primary, self.popularity)


def decayed_customer_vectors(train: SplitArrays, n_customers: int, vocab_size: int, decay: float) -> sp.csr_matrix:
    """[C, V] float64 CSR: each customer's time-decayed share of train baskets holding each product.

    A customer's m train baskets, oldest first (by ``week``, then by row: a split's rows are in week
    then file order), weigh ``decay ** (m - 1 - i)`` for basket i; a basket counts a product once. Each
    row is the weighted mean of the customer's basket vectors (entries in [0, 1]); row 0 (anonymous)
    and customers without train baskets are empty.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    customer = np.asarray(train.customer_index, dtype=np.int64)  # [N]
    rows = np.flatnonzero(customer > 0)  # baskets that belong to someone
    order = rows[np.lexsort((rows, np.asarray(train.week)[rows], customer[rows]))]  # by customer, week, row
    cust = customer[order]  # [N'] sorted
    last = np.searchsorted(cust, cust, side="right")  # [N'] one past the newest
    age = last - 1 - np.arange(len(order))  # [N'] 0 for the newest basket
    weight = np.power(float(decay), age)  # [N']
    total = np.bincount(cust, weights=weight, minlength=n_customers)  # [C]
    mix = sp.csr_matrix((weight / total[cust], (cust, order)), shape=(n_customers, len(customer)))  # [C, N]
    return (mix @ product_sets(train.offsets, train.tokens, vocab_size)).tocsr()  # [C, V]


def nearest_customers(vectors: sp.csr_matrix, k: int, *, chunk_cells: int = KNN_CHUNK_CELLS
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar other customers of every customer: (index [C, k] int64, similarity
    [C, k] float64), most similar first. Slots beyond a customer's customers of positive similarity
    (and every slot of an empty row) hold index -1 and similarity 0.

    Vectorised and bounded: the similarity is a sparse product over chunks of ``chunk_cells // C``
    customers against all non-empty rows, reduced to the top ``k`` by :func:`np.argpartition`.
    """
    n = vectors.shape[0]
    norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel())  # [C]
    active = np.flatnonzero(norms > 0)  # [A] customers with a vector
    index = np.full((n, k), -1, dtype=np.int64)
    similarity = np.zeros((n, k))
    k_eff = min(k, len(active) - 1)
    if k_eff <= 0:
        return index, similarity
    unit = (sp.diags(1.0 / norms[active]) @ vectors[active]).tocsr()  # [A, V] unit rows
    unit_t = unit.T.tocsr()  # [V, A]
    step = max(1, chunk_cells // len(active))
    for lo in range(0, len(active), step):
        hi = min(len(active), lo + step)
        sim = (unit[lo:hi] @ unit_t).toarray()  # [c, A] cosine
        sim[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # never one's own neighbour
        top = np.argpartition(-sim, k_eff - 1, axis=1)[:, :k_eff]  # [c, k'] unordered
        top_sim = np.take_along_axis(sim, top, axis=1)
        by_sim = np.argsort(-top_sim, axis=1, kind="stable")
        top, top_sim = np.take_along_axis(top, by_sim, axis=1), np.take_along_axis(top_sim, by_sim, axis=1)
        positive = top_sim > 0
        index[active[lo:hi], :k_eff] = np.where(positive, active[top], -1)
        similarity[active[lo:hi], :k_eff] = np.where(positive, top_sim, 0.0)
    return index, similarity


def neighbour_mix(index: np.ndarray) -> sp.csr_matrix:
    """[C, C] CSR averaging each customer's neighbours (``index`` [C, k], -1 = none): row c holds
    1/n_c at c's n_c neighbours, so ``neighbour_mix(index) @ vectors`` is the neighbours' mean vector.
    Kept instead of that mean itself, which is nearly dense [C, V] (k neighbours cover most products)."""
    n, k = index.shape
    found = index >= 0  # [C, k]
    counts = found.sum(axis=1)  # [C]
    rows = np.repeat(np.arange(n), k).reshape(n, k)[found]
    weights = (1.0 / np.maximum(counts, 1))[rows]
    return sp.csr_matrix((weights, (rows, index[found])), shape=(n, n))  # rows sum to 1 or 0


class TifuKnnScorer:
    """After TIFU-KNN (Hu et al., SIGIR 2020): ``alpha`` × own vector + (1 − ``alpha``) × neighbours.

    own vector  :func:`decayed_customer_vectors` — the customer's train baskets, oldest first, basket
                i of m weighted ``decay ** (m - 1 - i)``, normalised by the weights' sum
    neighbours  the mean own vector of the ``k`` customers most cosine-similar to it
                (:func:`nearest_customers`, the customer itself excluded)

    then popularity as a tie-breaker far below (:func:`_tie_broken`), so an anonymous or unseen
    customer (row 0, no vector, no neighbours) gets popularity alone.

    How it differs from the published method:

    * one decay over single baskets: no groups of baskets, so no within-group decay ``r_b`` and no
      group-size parameter; the decay plays the role of the between-group ``r_g``;
    * a basket vector is the product set of the whole basket (no per-line repeat weighting), the
      customer vector a weighted *mean* (weights normalised to 1) rather than a mean over groups;
    * neighbours are computed once, on the train vectors, and a customer's neighbours are fixed for
      every scored basket; the paper's vectors (and neighbours) include every basket before the
      predicted one, here nothing after the train split enters;
    * the task is in-basket completion, so the visible items of the basket are not used at all
      (the paper predicts a whole next basket); ranking excludes them from the candidates anyway;
    * neighbours are equally weighted (the paper's plain mean) and only customers of positive
      similarity count: fewer than ``k`` of them average over those found.
    """

    def __init__(self, train: SplitArrays, scored: SplitArrays, vocab_size: int, *, decay: float = 0.97,
                 k: int = 300, alpha: float = 0.7):
        # defaults: near the demo data's validation choice (tuning.TIFU_GRID; decay 1.0 won there by
        # 0.0008 Recall@10, 0.97 keeps some recency for data that drifts); tune per dataset
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        self.vocab_size, self.decay, self.k, self.alpha = vocab_size, float(decay), int(k), float(alpha)
        self.customer_index = np.asarray(scored.customer_index, dtype=np.int64)  # [N_scored]
        self.own = decayed_customer_vectors(train, n_customer_rows(train, scored), vocab_size, decay)  # [C, V]
        self.neighbour_index, self.neighbour_similarity = nearest_customers(self.own, self.k)  # [C, k] each
        self.neighbour_mix = neighbour_mix(self.neighbour_index)  # [C, C] k entries a row
        self.popularity = popularity_share(train, vocab_size)  # [V]

    def with_alpha(self, alpha: float) -> "TifuKnnScorer":
        """The same fit (vectors and neighbours) with another blend weight."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        other = copy.copy(self)
        other.alpha = float(alpha)
        return other

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        customers = self.customer_index[np.asarray(sample, dtype=np.int64)]  # [n]
        primary = self.alpha * self.own[customers].toarray()  # [n, V]
        if self.alpha < 1.0:
            # neighbours' mean per distinct customer of the call (positions of a basket share one)
            distinct, inverse = np.unique(customers, return_inverse=True)
            mean = (self.neighbour_mix[distinct] @ self.own).toarray()  # [d, V]
            primary += (1.0 - self.alpha) * mean[inverse]
        return _tie_broken(primary, self.popularity)
