"""The strongest simple baselines (issue 11 §1): a blend of the simple scorers, and TIFU-KNN.

Same contract as :mod:`~retailsim_pipeline.evaluation.baselines`:
``score(sample [n], visible_offsets [n + 1], visible_tokens [sum]) -> torch.FloatTensor [n, V]``
(higher = more likely), vectorised over the positions of a call; chunking is the caller's job. The
same leakage rule too: the customer's own history is read *as of* the scored basket (every basket of
that customer strictly before it, any split: :class:`~retailsim_pipeline.prep.history.AsOfHistory`,
passed in as ``history``); what is fitted — co-occurrence, popularity, the neighbours and their
vectors — comes from the train split only.

* :class:`BlendScorer` — personal frequency share + ``w_cooc`` × normalised co-occurrence sums +
  ``w_pop`` × normalised popularity.
* :class:`TifuKnnScorer` — a time-decayed personal vector blended with the mean train vector of the
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

from retailsim_pipeline.evaluation.baselines import (
    CooccurrenceScorer,
    as_of_rows,
    product_sets,
    scored_history_keys,
    train_counts,
)
from retailsim_pipeline.prep.cache import SplitArrays
from retailsim_pipeline.prep.fitting import basket_ranges
from retailsim_pipeline.prep.history import AsOfHistory, gather_baskets

#: Dense cells of one chunk of the customer × customer similarity (float64: 32 MiB), bounding the
#: k-NN search's memory whatever the number of customers.
KNN_CHUNK_CELLS = 1 << 22
#: Baskets per piece of :func:`decayed_customer_vectors` (whole customers; ~2.6M lines).
VECTOR_CHUNK_BASKETS = 1 << 18
_TIE_SCALE = 1e-3  # the tie-breaker's share of a row's smallest positive primary score


def n_customer_rows(*splits: SplitArrays) -> int:
    """Rows of a table indexed by ``customer_key`` over the given splits: the largest key + 1 (row 0 =
    anonymous)."""
    return int(max((np.asarray(s.customer_key).max(initial=0) for s in splits), default=0)) + 1


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

    own share     the customer's line counts per product before the scored basket
                  (:meth:`AsOfHistory.counts`, any split) divided by their total (a row sums to 1; 0
                  for an anonymous basket or a customer's first)
    co-occurrence :meth:`CooccurrenceScorer.similarity_sums` of the position's visible items, each
                  row divided by its max (0 where nothing is visible or nothing co-occurs)
    popularity    :func:`popularity_share` (max 1)

    Weights only enter at scoring time, so :meth:`with_weights` gives the same fit other weights
    (the validation grid reuses one fit). ``cooccurrence`` reuses a fitted co-occurrence scorer.
    """

    def __init__(self, train: SplitArrays, scored: SplitArrays, vocab_size: int, *, history: AsOfHistory,
                 w_cooc: float = 0.03, w_pop: float = 0.0, cooccurrence: CooccurrenceScorer | None = None):
        # defaults: the demo data's validation choice (tuning.BLEND_GRID); tune per dataset
        self.vocab_size, self.w_cooc, self.w_pop = vocab_size, float(w_cooc), float(w_pop)
        self.history = history
        self.customer_key, self.past_baskets = scored_history_keys(scored, history, vocab_size)  # [N_scored] each
        self.cooccurrence = cooccurrence if cooccurrence is not None else CooccurrenceScorer(train, vocab_size)
        self.popularity = popularity_share(train, vocab_size)  # [V]

    def with_weights(self, *, w_cooc: float, w_pop: float) -> "BlendScorer":
        """The same fitted scorer with other weights (shares the fitted arrays)."""
        other = copy.copy(self)
        other.w_cooc, other.w_pop = float(w_cooc), float(w_pop)
        return other

    def own_share(self, sample: np.ndarray) -> np.ndarray:
        """[n, V] float64: each sample's customer's line counts before its basket over their total."""
        counts = as_of_rows(self.history.counts, self.customer_key, self.past_baskets, sample)  # [n, V]
        totals = counts.sum(axis=1)  # [n]
        return counts / np.where(totals > 0, totals, 1.0)[:, None]

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        primary = self.own_share(sample)  # [n, V]
        if self.w_cooc:
            sums = self.cooccurrence.similarity_sums(visible_offsets, visible_tokens)  # [n, V]
            top = sums.max(axis=1, initial=0.0)  # [n]
            primary += self.w_cooc * sums / np.where(top > 0, top, 1.0)[:, None]
        primary += self.w_pop * self.popularity[None, :]
        return _tie_broken(primary, self.popularity)


def decayed_customer_vectors(train: SplitArrays, n_customers: int, vocab_size: int, decay: float) -> sp.csr_matrix:
    """[C, V] float64 CSR, rows by ``customer_key``: each customer's time-decayed share of train
    baskets holding each product (the vectors TIFU-KNN's neighbours are fitted on).

    A customer's m train baskets, oldest first (by ``past_baskets``: date, hour, basket id — the as-of
    history's order), weigh ``decay ** (m - 1 - i)`` for basket i; a basket counts a product once. Each
    row is the weighted mean of the customer's basket vectors (entries in [0, 1]); row 0 (anonymous)
    and customers without train baskets are empty.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    customer = np.asarray(train.customer_key, dtype=np.int64)  # [N]
    if customer.max(initial=0) >= n_customers:
        raise ValueError(f"customer_key up to {customer.max()} needs more than {n_customers} rows")
    rows = np.flatnonzero(customer > 0)  # baskets that belong to someone
    order = rows[np.lexsort((np.asarray(train.past_baskets)[rows], customer[rows]))]  # by customer, time
    cust = customer[order]  # [N'] sorted
    last = np.searchsorted(cust, cust, side="right")  # [N'] one past the newest
    age = last - 1 - np.arange(len(order))  # [N'] 0 for the newest basket
    weight = np.power(float(decay), age)  # [N']
    total = np.bincount(cust, weights=weight, minlength=n_customers)  # [C]
    share = weight / total[cust]  # [N']
    # Rows = mix [C, N] @ product sets [N, V], computed a range of customers at a time over their baskets
    # alone, read from the (memory-mapped) split: each row is the same sum, in the same order, as in
    # the whole product, so the vectors are the same bit for bit and the split is never copied whole.
    starts = np.zeros(n_customers + 1, dtype=np.int64)  # [C + 1] first position of each customer in order
    np.cumsum(np.bincount(cust, minlength=n_customers), out=starts[1:])
    pieces = []
    for lo, hi in basket_ranges(starts, VECTOR_CHUNK_BASKETS):  # ranges of customers (rows of ``starts``)
        a, b = starts[lo], starts[hi]
        baskets = np.sort(order[a:b])  # columns in basket order, as in the whole mix
        mix = sp.csr_matrix((share[a:b], (cust[a:b] - lo, np.searchsorted(baskets, order[a:b]))),
                            shape=(hi - lo, len(baskets)))
        pieces.append((mix @ product_sets(*gather_baskets(train.offsets, train.tokens, baskets), vocab_size)).tocsr())
    return sp.vstack(pieces, format="csr")  # [C, V]


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

    own vector  :meth:`AsOfHistory.decayed_sets` — the customer's baskets strictly before the scored
                one (any split), oldest first, basket i of m weighted ``decay ** (m - 1 - i)``,
                normalised by the weights' sum
    neighbours  the mean train vector (:func:`decayed_customer_vectors`) of the ``k`` customers whose
                train vectors are most cosine-similar to the customer's (:func:`nearest_customers`,
                the customer itself excluded); fitted once on train, rows by ``customer_key``

    then popularity as a tie-breaker far below (:func:`_tie_broken`), so an anonymous basket or a
    customer's first (no vector; and no neighbours unless they shopped in train) gets popularity alone.

    How it differs from the published method:

    * one decay over single baskets: no groups of baskets, so no within-group decay ``r_b`` and no
      group-size parameter; the decay plays the role of the between-group ``r_g``;
    * a basket vector is the product set of the whole basket (no per-line repeat weighting), the
      customer vector a weighted *mean* (weights normalised to 1) rather than a mean over groups;
    * the own vector, as in the paper, holds every basket before the predicted one; but neighbours are
      fitted once, on the train vectors, and a customer's neighbours (and the neighbours' vectors) are
      fixed for every scored basket — the paper recomputes them on all baskets before the prediction.
      A customer first seen after train has no neighbours: their own vector alone;
    * the task is in-basket completion, so the visible items of the basket are not used at all
      (the paper predicts a whole next basket); ranking excludes them from the candidates anyway;
    * neighbours are equally weighted (the paper's plain mean) and only customers of positive
      similarity count: fewer than ``k`` of them average over those found.
    """

    def __init__(self, train: SplitArrays, scored: SplitArrays, vocab_size: int, *, history: AsOfHistory,
                 decay: float = 0.97, k: int = 300, alpha: float = 0.7):
        # defaults: near the demo data's validation choice (tuning.TIFU_GRID; decay 1.0 won there by
        # 0.0008 Recall@10, 0.97 keeps some recency for data that drifts); tune per dataset
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        self.vocab_size, self.decay, self.k, self.alpha = vocab_size, float(decay), int(k), float(alpha)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.history = history
        self.customer_key, self.past_baskets = scored_history_keys(scored, history, vocab_size)  # [N_scored] each
        n_customers = n_customer_rows(train, scored)
        self.train_vectors = decayed_customer_vectors(train, n_customers, vocab_size, decay)  # [C, V]
        self.neighbour_index, self.neighbour_similarity = nearest_customers(self.train_vectors, self.k)  # [C, k]
        self.neighbour_mix = neighbour_mix(self.neighbour_index)  # [C, C] k entries a row
        self.popularity = popularity_share(train, vocab_size)  # [V]

    def with_alpha(self, alpha: float) -> "TifuKnnScorer":
        """The same fit (train vectors and neighbours) with another blend weight."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        other = copy.copy(self)
        other.alpha = float(alpha)
        return other

    def own(self, sample: np.ndarray) -> np.ndarray:
        """[n, V] float64: each sample's customer's decayed mean basket before its basket."""
        return as_of_rows(self.history.decayed_sets, self.customer_key, self.past_baskets, sample, self.decay)

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        sample = np.asarray(sample, dtype=np.int64)
        primary = self.alpha * self.own(sample)  # [n, V]
        if self.alpha < 1.0:
            # neighbours' mean per distinct customer of the call (positions of a basket share one)
            distinct, inverse = np.unique(self.customer_key[sample], return_inverse=True)
            mean = (self.neighbour_mix[distinct] @ self.train_vectors).toarray()  # [d, V]
            primary += (1.0 - self.alpha) * mean[inverse.reshape(-1)]
        return _tie_broken(primary, self.popularity)
