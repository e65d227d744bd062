"""Ranking and classification metrics, vectorized (DESIGN §7).

Ranking works in two steps so that scores never have to be kept: :func:`target_ranks` reduces a chunk
of scores [n, V] to three integers per position (:class:`Ranks`), and :func:`ranking_metrics` turns
any number of concatenated :class:`Ranks` into metrics.

Candidates
    Every product token (id ≥ ``N_SPECIAL``) except the position's *excluded* tokens — the products
    still visible in its basket (recommending what is already in the basket is no recommendation).
    The target itself is never excluded, even when the same product also appears on a visible line.

Ties
    A model that gives the target the same score as ``t`` other candidates is credited with the
    *expectation* over a uniformly random order of the tie block: the target's rank is uniform on
    ``g + 1 … g + t + 1`` (``g`` = candidates scored strictly higher). So a constant scorer gets
    exactly the random-ranking metrics, and no metric depends on how a sort happens to break ties.
    hit@K = P(rank ≤ K) = clip((K − g) / (t + 1), 0, 1).

Metrics (one target per position, so recall@K is the mean hit@K)
    accuracy      mean hit@1
    recall@K      mean hit@K
    precision@K   mean hit@K / min(K, n_candidates): with fewer than K candidates the list is shorter
    mrr           mean E[1 / rank]; exact over the tie block via harmonic numbers
    ndcg@10       mean E[1 / log2(rank + 1) · 1{rank ≤ 10}] (one relevant item, so IDCG = 1); exact
                  over the tie block via a cumulative table
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import digamma

from retailsim_pipeline.config import N_SPECIAL

#: Cut-offs of precision@K and recall@K (DESIGN §7 names 1, 5, 10; 20 is cheap and shows the trend).
DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)
NDCG_K = 10


@dataclass
class Ranks:
    """Where the target landed, per position: all [n] int64.

    n_greater     candidates scored strictly higher than the target
    n_ties        other candidates scored exactly like the target
    n_candidates  candidates including the target (V − N_SPECIAL − excluded)
    """

    n_greater: np.ndarray
    n_ties: np.ndarray
    n_candidates: np.ndarray

    def __len__(self) -> int:
        return len(self.n_greater)

    @classmethod
    def concat(cls, parts: Sequence["Ranks"]) -> "Ranks":
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty.copy(), empty.copy())
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("n_greater", "n_ties", "n_candidates")))

    def subset(self, mask_or_index: np.ndarray) -> "Ranks":
        return Ranks(self.n_greater[mask_or_index], self.n_ties[mask_or_index], self.n_candidates[mask_or_index])


def target_ranks(scores: torch.Tensor | np.ndarray, targets: np.ndarray | torch.Tensor,
                 exclude_offsets: np.ndarray, exclude_tokens: np.ndarray) -> Ranks:
    """Ranks of the targets among their candidates (see the module docstring).

    scores           [n, V] higher = more likely (any float dtype; not modified)
    targets          [n] token ids ≥ N_SPECIAL
    exclude_offsets  [n + 1] CSR offsets of each row's excluded tokens
    exclude_tokens   [sum] token ids (duplicates, specials and the target itself are harmless)
    """
    scores = torch.as_tensor(scores)
    n, V = scores.shape
    device = scores.device
    targets = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=device)
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} rows of scores")
    if n and (int(targets.min()) < N_SPECIAL or int(targets.max()) >= V):
        raise ValueError(f"targets must be product tokens in [{N_SPECIAL}, {V}); got "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    exclude_offsets = np.asarray(exclude_offsets, dtype=np.int64)
    if len(exclude_offsets) != n + 1:
        raise ValueError(f"exclude_offsets has {len(exclude_offsets)} entries, expected n + 1 = {n + 1}")

    rows = torch.arange(n, device=device)
    target_score = scores[rows, targets]  # [n]
    if torch.isnan(target_score).any():
        bad = int(torch.nonzero(torch.isnan(target_score))[0])
        raise ValueError(f"score of the target is NaN at row {bad}; fix the scorer")

    excluded = torch.zeros((n, V), dtype=torch.bool, device=device)  # [n, V]
    excluded[:, :N_SPECIAL] = True
    ex_rows = np.repeat(np.arange(n), np.diff(exclude_offsets))
    excluded[torch.as_tensor(ex_rows, device=device),
             torch.as_tensor(np.asarray(exclude_tokens, dtype=np.int64), device=device)] = True
    excluded[rows, targets] = False  # the target is always a candidate

    candidate = ~excluded
    t = target_score[:, None]
    n_greater = ((scores > t) & candidate).sum(1)
    n_ties = ((scores == t) & candidate).sum(1) - 1  # minus the target itself
    n_candidates = candidate.sum(1)
    return Ranks(*(x.cpu().numpy().astype(np.int64) for x in (n_greater, n_ties, n_candidates)))


def _harmonic(x: np.ndarray) -> np.ndarray:
    """H(x) = Σ_{r=1..x} 1/r for integer x ≥ 0 (H(0) = 0), via digamma: H(x) = ψ(x + 1) + γ."""
    return digamma(np.asarray(x, dtype=np.float64) + 1.0) + np.euler_gamma


def _hits(g: np.ndarray, t: np.ndarray, k: int) -> np.ndarray:
    """P(rank ≤ k) with the rank uniform on g + 1 … g + t + 1."""
    return np.clip((k - g) / (t + 1.0), 0.0, 1.0)


def position_recall(ranks: Ranks, k: int) -> np.ndarray:
    """[n] float64 per-position recall@K: hit@K = P(rank ≤ K) under random tie-breaking, in [0, 1].

    Its mean over positions is ``ranking_metrics(ranks)[f"recall@{k}"]`` (the same arithmetic), so it
    is what a per-position comparison such as :func:`~retailsim_pipeline.evaluation.significance.
    paired_bootstrap` should resample. Fractional wherever the target sits in a tie block that
    straddles the cut-off.
    """
    return _hits(ranks.n_greater.astype(np.float64), ranks.n_ties.astype(np.float64), k)


def ranking_metrics(ranks: Ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """accuracy, precision@K, recall@K, mrr, ndcg@10 and n (positions); NaN metrics when n = 0."""
    n = len(ranks)
    names = ["accuracy", *(f"precision@{k}" for k in ks), *(f"recall@{k}" for k in ks), "mrr", f"ndcg@{NDCG_K}"]
    if n == 0:
        return {**{name: float("nan") for name in names}, "n": 0}
    g = ranks.n_greater.astype(np.float64)
    t = ranks.n_ties.astype(np.float64)
    c = ranks.n_candidates.astype(np.float64)
    out: dict[str, float] = {"accuracy": float(_hits(g, t, 1).mean())}
    hits = {k: position_recall(ranks, k) for k in ks}
    for k in ks:
        out[f"precision@{k}"] = float((hits[k] / np.minimum(k, c)).mean())
    for k in ks:
        out[f"recall@{k}"] = float(hits[k].mean())
    # E[1/rank] = (H(g + t + 1) − H(g)) / (t + 1)
    out["mrr"] = float(((_harmonic(g + t + 1) - _harmonic(g)) / (t + 1)).mean())
    # E[gain] = (D(min(g + t + 1, K)) − D(min(g, K))) / (t + 1), D(m) = Σ_{r=1..m} 1/log2(r + 1)
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, NDCG_K + 2)))])  # [K + 1]
    hi = np.minimum(ranks.n_greater + ranks.n_ties + 1, NDCG_K)
    lo = np.minimum(ranks.n_greater, NDCG_K)
    out[f"ndcg@{NDCG_K}"] = float(((table[hi] - table[lo]) / (t + 1)).mean())
    out["n"] = n
    return out


def grouped_ranking_metrics(ranks: Ranks, groups: np.ndarray, order: Sequence | None = None,
                            ks: Sequence[int] = DEFAULT_KS) -> dict:
    """:func:`ranking_metrics` per group label (``groups`` [n], str or int).

    ``order`` lists the labels to report, in that order (a label without positions gets ``n = 0`` and
    NaN metrics, so report tables keep their rows); by default the sorted labels present.
    """
    groups = np.asarray(groups)
    if len(groups) != len(ranks):
        raise ValueError(f"{len(groups)} group labels for {len(ranks)} positions")
    labels = list(order) if order is not None else np.unique(groups).tolist()
    return {label: ranking_metrics(ranks.subset(groups == label), ks) for label in labels}


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                           class_names: Sequence[str] | None = None) -> dict:
    """accuracy, macro F1, confusion matrix (rows = true, columns = predicted), labels, n.

    Macro F1 averages F1 = 2·TP / (2·TP + FP + FN) over the classes present in ``y_true`` or
    ``y_pred``: a class that is neither present nor predicted has no defined F1 and would only drag
    the mean towards 0 or 1 depending on convention, so it is left out. NaN when n = 0.
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels vs {len(y_pred)} predictions")
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} classes")
    for what, y in (("y_true", y_true), ("y_pred", y_pred)):
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{what} holds class ids outside [0, {n_classes}): [{y.min()}, {y.max()}]")
    n = len(y_true)
    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes)
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    denom = support + predicted  # = 2·TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "confusion": confusion.tolist(),
        "labels": names,
        "n": n,
    }
