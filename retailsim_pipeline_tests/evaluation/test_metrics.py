"""Ranking and classification metrics against hand-computed values and brute-force tie enumeration."""

import itertools
import math

import numpy as np
import pytest
import torch

from retailsim_pipeline.evaluation.metrics import (
    Ranks,
    classification_metrics,
    grouped_ranking_metrics,
    position_recall,
    ranking_metrics,
    target_ranks,
)
from retailsim_pipeline.config import N_SPECIAL

def _ranks_one(scores_products, target_product, exclude=(), special_scores=(100.0, 100.0, 100.0)) -> Ranks:
    """Ranks of one row whose product scores (tokens N_SPECIAL…) are given; specials score high."""
    scores = torch.tensor([[*special_scores, *scores_products]], dtype=torch.float32)
    ex = np.asarray(exclude, dtype=np.int64)
    return target_ranks(scores, np.array([target_product]), np.array([0, len(ex)]), ex)


def test_tie_block_hand_computed():
    # Target (token 3) ties with 3 others at rank 2: one product scores higher, one lower.
    r = _ranks_one([5.0, 9.0, 5.0, 5.0, 5.0, 0.0], 3)
    assert (r.n_greater[0], r.n_ties[0], r.n_candidates[0]) == (1, 3, 6)
    m = ranking_metrics(r, ks=(1, 2, 3, 5))
    assert m["accuracy"] == 0.0 and m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx(1 / 4)
    assert m["recall@3"] == pytest.approx(2 / 4)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["precision@2"] == pytest.approx(1 / 4 / 2)
    assert m["precision@5"] == pytest.approx(1 / 5)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    assert m["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 1) for r in (2, 3, 4, 5)) / 4)
    assert m["n"] == 1


def test_special_tokens_never_candidates():
    r = _ranks_one([1.0, 0.0, 0.0], 3, special_scores=(1e9, 1e9, 1e9))
    assert (r.n_greater[0], r.n_ties[0], r.n_candidates[0]) == (0, 0, 3)
    assert ranking_metrics(r)["accuracy"] == 1.0


def test_excluded_tokens_never_counted_and_target_never_excluded():
    # Tokens 4 and 5 outscore the target but are visible in the basket: excluded.
    r = _ranks_one([1.0, 5.0, 5.0, 1.0, 0.0], 3, exclude=[4, 5, 5, 1])
    assert (r.n_greater[0], r.n_ties[0], r.n_candidates[0]) == (0, 1, 3)
    # The target's own product on a visible line (listed in exclude) stays a candidate.
    r = _ranks_one([1.0, 5.0, 0.0], 3, exclude=[3, 4])
    assert (r.n_greater[0], r.n_ties[0], r.n_candidates[0]) == (0, 0, 2)


def test_fewer_candidates_than_k_shortens_the_list():
    r = _ranks_one([3.0, 2.0, 1.0, 0.0], 4)  # 4 candidates, target second
    m = ranking_metrics(r, ks=(1, 5, 10))
    assert m["recall@5"] == 1.0 and m["recall@10"] == 1.0
    assert m["precision@5"] == pytest.approx(1 / 4) and m["precision@10"] == pytest.approx(1 / 4)
    assert m["precision@1"] == 0.0 and m["mrr"] == pytest.approx(1 / 2)


def test_metric_names():
    r = _ranks_one([1.0, 0.0], 3)
    assert set(ranking_metrics(r)) == {
        "accuracy", "precision@1", "precision@5", "precision@10", "precision@20", "recall@1", "recall@5",
        "recall@10", "recall@20", "mrr", "ndcg@10", "n"}


def test_numpy_and_torch_scores_agree_and_input_not_modified():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(20, 12)).astype(np.float32)
    before = scores.copy()
    targets = rng.integers(N_SPECIAL, 12, size=20)
    ex_off = np.arange(0, 41, 2)
    ex_tok = rng.integers(0, 12, size=40)
    a = target_ranks(scores, targets, ex_off, ex_tok)
    b = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), ex_off, ex_tok)
    for f in ("n_greater", "n_ties", "n_candidates"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    np.testing.assert_array_equal(scores, before)


def _brute_force(scores_row: np.ndarray, target: int, excluded: set[int], ks) -> dict[str, float]:
    """Average each metric over every ordering of the candidates that is sorted by descending score."""
    cands = [j for j in range(N_SPECIAL, len(scores_row)) if j == target or j not in excluded]
    totals, count = {}, 0
    for perm in itertools.permutations(cands):
        if any(scores_row[perm[i]] < scores_row[perm[i + 1]] for i in range(len(perm) - 1)):
            continue
        rank = perm.index(target) + 1
        vals = {f"recall@{k}": float(rank <= k) for k in ks}
        vals |= {f"precision@{k}": float(rank <= k) / min(k, len(cands)) for k in ks}
        vals["mrr"] = 1 / rank
        vals["ndcg@10"] = 1 / math.log2(rank + 1) if rank <= 10 else 0.0
        for key, v in vals.items():
            totals[key] = totals.get(key, 0.0) + v
        count += 1
    return {k: v / count for k, v in totals.items()}


def test_exact_tie_averages_match_brute_force_enumeration():
    rng = np.random.default_rng(42)
    ks = (1, 2, 3, 5)
    n, V = 25, N_SPECIAL + 7
    scores = rng.integers(0, 3, size=(n, V)).astype(np.float32)
    targets = rng.integers(N_SPECIAL, V, size=n)
    counts = rng.integers(0, 3, size=n)
    ex_off = np.concatenate([[0], np.cumsum(counts)])
    ex_tok = rng.integers(0, V, size=int(counts.sum()))
    ranks = target_ranks(scores, targets, ex_off, ex_tok)
    expected = {}
    for i in range(n):
        one = _brute_force(scores[i], int(targets[i]), set(ex_tok[ex_off[i]:ex_off[i + 1]].tolist()), ks)
        got = ranking_metrics(ranks.subset(np.array([i])), ks)
        for key, v in one.items():
            assert got[key] == pytest.approx(v, abs=1e-12), (i, key)
            expected[key] = expected.get(key, 0.0) + v / n
    overall = ranking_metrics(ranks, ks)
    for key, v in expected.items():
        assert overall[key] == pytest.approx(v, abs=1e-12), key


def test_constant_scorer_gets_random_ranking():
    V = N_SPECIAL + 40
    r = target_ranks(torch.zeros(3, V), np.array([3, 10, 42]), np.zeros(4, np.int64), np.zeros(0))
    m = ranking_metrics(r)
    assert m["recall@10"] == pytest.approx(10 / 40) and m["accuracy"] == pytest.approx(1 / 40)
    assert m["mrr"] == pytest.approx(sum(1 / k for k in range(1, 41)) / 40)


def test_large_ranks_mrr_harmonic_numbers():
    r = Ranks(np.array([10_000]), np.array([999]), np.array([20_000]))
    exact = sum(1 / k for k in range(10_001, 11_001)) / 1000
    m = ranking_metrics(r)
    assert m["mrr"] == pytest.approx(exact, rel=1e-10)
    assert m["ndcg@10"] == 0.0 and m["recall@20"] == 0.0


def test_concat_and_grouped():
    a = _ranks_one([1.0, 0.0], 3)  # rank 1
    b = _ranks_one([0.0, 1.0], 3)  # rank 2
    both = Ranks.concat([a, b])
    assert len(both) == 2 and len(Ranks.concat([])) == 0
    assert ranking_metrics(both)["accuracy"] == 0.5
    grouped = grouped_ranking_metrics(both, np.array(["x", "y"]), order=["y", "x", "z"])
    assert list(grouped) == ["y", "x", "z"]
    assert grouped["x"]["accuracy"] == 1.0 and grouped["y"]["accuracy"] == 0.0
    assert grouped["x"]["n"] == 1 and grouped["z"]["n"] == 0 and math.isnan(grouped["z"]["mrr"])
    assert list(grouped_ranking_metrics(both, np.array([2, 1]))) == [1, 2]


def test_target_must_be_a_product():
    with pytest.raises(ValueError, match="product tokens"):
        target_ranks(torch.zeros(1, 6), np.array([2]), np.array([0, 0]), np.zeros(0))


def test_position_recall_averages_to_ranking_metrics_recall():
    rng = np.random.default_rng(11)
    n = 5_000
    n_candidates = rng.integers(1, 60, size=n)
    n_greater = rng.integers(0, n_candidates)  # < n_candidates
    n_ties = rng.integers(0, n_candidates - n_greater)  # target + greater + ties ≤ candidates
    assert (n_ties > 0).mean() > 0.5  # many tie blocks, some straddling each cut-off
    ranks = Ranks(n_greater, n_ties, n_candidates)
    m = ranking_metrics(ranks, ks=(1, 5, 10, 20))
    for k in (1, 5, 10, 20):
        per_position = position_recall(ranks, k)
        assert per_position.shape == (n,) and per_position.dtype == np.float64
        assert ((per_position >= 0) & (per_position <= 1)).all()
        assert per_position.mean() == pytest.approx(m[f"recall@{k}"], rel=1e-12, abs=1e-15)
    assert 0 < ((position_recall(ranks, 10) > 0) & (position_recall(ranks, 10) < 1)).sum()  # fractional hits
    assert position_recall(ranks, 1).mean() == pytest.approx(m["accuracy"], rel=1e-12)


def test_classification_hand_example():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2])
    m = classification_metrics(y_true, y_pred, 4, ["a", "b", "c", "d"])
    assert m["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: a = 2·1/(2·1+1+1) = 0.5, b = 2·2/(2·2+1+0) = 0.8, c = 2·1/(2·1+0+1) = 2/3; d absent → left out
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["labels"] == ["a", "b", "c", "d"] and m["n"] == 6


def test_classification_matches_manual_per_class_computation():
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 5, 300), rng.integers(0, 4, 300)
    m = classification_metrics(y_true, y_pred, 6, [str(i) for i in range(6)])
    f1s = []
    for c in range(6):
        tp = int(np.sum((y_true == c) & (y_pred == c)))
        fp = int(np.sum((y_true != c) & (y_pred == c)))
        fn = int(np.sum((y_true == c) & (y_pred != c)))
        if tp + fp + fn:
            p = tp / (tp + fp) if tp + fp else 0.0
            r = tp / (tp + fn) if tp + fn else 0.0
            f1s.append(2 * p * r / (p + r) if p + r else 0.0)
        for c2 in range(6):
            assert m["confusion"][c][c2] == int(np.sum((y_true == c) & (y_pred == c2)))
    assert len(f1s) == 5
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    assert m["accuracy"] == pytest.approx(np.mean(y_true == y_pred))


def test_classification_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.array([0, 4]), np.array([0, 1]), 4, list("abcd"))
