"""The strong baselines (blend, TIFU-KNN) and their validation tuning: hand-made micro cases with known
answers, a dense oracle for the k-NN search, then the tiny cache."""

import shutil
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from retailsim_pipeline.config import N_SPECIAL, UNK
from retailsim_pipeline.evaluation.baselines import (
    CooccurrenceScorer,
    PersonalFrequencyScorer,
    PopularityScorer,
    as_of_history,
)
from retailsim_pipeline.evaluation.evaluate import prepare, rank_baseline
from retailsim_pipeline.evaluation.metrics import ranking_metrics
from retailsim_pipeline.evaluation.strong_baselines import (
    BlendScorer,
    TifuKnnScorer,
    decayed_customer_vectors,
    n_customer_rows,
    nearest_customers,
    neighbour_mix,
)
from retailsim_pipeline.evaluation.tuning import BLEND_GRID, STRONG_BASELINES, TIFU_GRID, tune_on_validation
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.history import AsOfHistory
from retailsim_pipeline_tests.evaluation.micro import in_sequence, micro_split

# --------------------------------------------------------------------------------------------
# Micro cases
# --------------------------------------------------------------------------------------------

V = N_SPECIAL + 4  # products 3, 4, 5, 6
P3, P4, P5, P6 = range(N_SPECIAL, N_SPECIAL + 4)


def _visible(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return offsets, np.array([t for r in rows for t in r], dtype=np.int64)


def _order(scores: torch.Tensor) -> np.ndarray:
    """Products (ids ≥ N_SPECIAL) of each row, best first; equal scores keep id order."""
    return N_SPECIAL + np.argsort(-scores.numpy()[:, N_SPECIAL:], axis=1, kind="stable")


# Train: popularity 3: 3 lines, 4: 3, 5: 1, 6: 1; customer 1 bought 3 ×2, 4, 5; customer 2 bought 3, 4, 6;
# the anonymous basket [4] (key 0) belongs to nobody.
# Scored (after train): customers 1, anonymous, 2, and 3 (never seen before → no history).
MICRO_TRAIN, MICRO_SCORED = in_sequence(micro_split([[P3, P4], [P3, P5], [P3, P4, P6], [P4]], customers=[1, 1, 2, 0]),
                                        micro_split([[P5]] * 4, customers=[1, 0, 2, 3]))
MICRO_HISTORY = AsOfHistory([MICRO_TRAIN, MICRO_SCORED], V)
MICRO = dict(history=MICRO_HISTORY)


def test_blend_with_zero_weights_orders_like_personal_frequency():
    blend = BlendScorer(MICRO_TRAIN, MICRO_SCORED, V, w_cooc=0.0, w_pop=0.0, **MICRO)
    personal = PersonalFrequencyScorer(MICRO_TRAIN, MICRO_SCORED, V, **MICRO)
    visible = _visible([[P3], [P4], [], [P6]])  # ignored without co-occurrence weight
    got, want = blend.score(np.arange(4), *visible), personal.score(np.arange(4), *_visible([[]] * 4))
    np.testing.assert_array_equal(_order(got), _order(want))
    # own share: customer 1's counts 2, 1, 1 over 4 lines, and the tie-breaker stays below 1/1000 of it
    np.testing.assert_allclose(got[0, [P3, P4, P5]].numpy(), [0.5, 0.25, 0.25], rtol=2e-3)
    assert got[0, P6] < got[0, P5] * 1e-3


def test_blend_formula_micro():
    w_cooc, w_pop = 0.3, 0.1
    blend = BlendScorer(MICRO_TRAIN, MICRO_SCORED, V, w_cooc=w_cooc, w_pop=w_pop, **MICRO)
    sim = CooccurrenceScorer(MICRO_TRAIN, V).similarity
    pop = np.array([0, 0, 0, 3, 3, 1, 1]) / 3
    # customer 1 seeing 3 (and an UNK line), anonymous seeing 3 and 4, anonymous seeing nothing
    got = blend.score(np.array([0, 1, 1]), *_visible([[P3, UNK], [P3, P4], []])).numpy()
    own = np.array([0, 0, 0, 2, 1, 1, 0]) / 4
    both = sim[P3] + sim[P4]
    cooc = np.stack([sim[P3] / sim[P3].max(), both / both.max(), np.zeros(V)])
    primary = np.stack([own, np.zeros(V), np.zeros(V)]) + w_cooc * cooc + w_pop * pop
    # beside the primary score, only the popularity tie-breaker (≤ 1/1000 of the row's smallest positive)
    smallest = np.where(primary > 0, primary, np.inf).min(axis=1, keepdims=True)
    assert (got >= primary - 1e-7).all() and (got - primary <= 1e-3 * smallest + 1e-7).all()
    np.testing.assert_array_equal(_order(torch.from_numpy(got))[2], [P3, P4, P5, P6])  # popularity alone
    other = blend.with_weights(w_cooc=0.0, w_pop=0.0)
    assert other.history is blend.history and other.cooccurrence is blend.cooccurrence
    assert (blend.w_cooc, other.w_cooc) == (w_cooc, 0.0)


def test_anonymous_and_unknown_customers_get_popularity():
    popularity = PopularityScorer(MICRO_TRAIN, V).score(np.arange(2), *_visible([[], []]))
    scorers = [BlendScorer(MICRO_TRAIN, MICRO_SCORED, V, w_cooc=0.0, w_pop=0.0, **MICRO),
               BlendScorer(MICRO_TRAIN, MICRO_SCORED, V, w_cooc=0.0, w_pop=0.5, **MICRO),
               TifuKnnScorer(MICRO_TRAIN, MICRO_SCORED, V, decay=0.5, k=2, alpha=0.5, **MICRO),
               PersonalFrequencyScorer(MICRO_TRAIN, MICRO_SCORED, V, **MICRO)]
    for scorer in scorers:
        got = scorer.score(np.array([1, 3]), *_visible([[], []]))  # anonymous, unknown customer 3
        np.testing.assert_array_equal(_order(got), _order(popularity))
        assert torch.equal(got[0], got[1])
    # TIFU-KNN ignores the visible items: an anonymous customer still gets popularity.
    tifu = scorers[-1].score(np.array([1]), *_visible([[P5, P6]]))
    np.testing.assert_array_equal(_order(tifu), _order(popularity[:1]))


def test_tifu_decay_ranks_the_latest_basket_first():
    # Customer 1's baskets with rows out of time order on purpose: oldest week 1 [3, 4] (row 1), week 2
    # [4] (row 3), then week 3 by row: [4] (row 0) and the latest, [4, 5] (row 2) — past_baskets 2, 0,
    # 3, 1. Product 3 is only in the oldest basket, 5 only in the latest.
    train, scored = in_sequence(micro_split([[P4], [P3, P4], [P4, P5], [P4], [P6], [P6], [P6]],
                                            customers=[1, 1, 1, 1, 0, 0, 0], weeks=[3, 1, 3, 2, 1, 1, 1]),
                                micro_split([[P5]], customers=[1]))
    assert train.past_baskets[:4].tolist() == [2, 0, 3, 1]
    history = AsOfHistory([train, scored], V)
    vectors = decayed_customer_vectors(train, 2, V, decay=0.5).toarray()
    total = 0.125 + 0.25 + 0.5 + 1.0  # oldest → newest
    np.testing.assert_allclose(vectors[1], [0, 0, 0, 0.125 / total, 1.0, 1.0 / total, 0])
    assert not vectors[0].any()  # anonymous baskets belong to nobody
    tifu = TifuKnnScorer(train, scored, V, decay=0.5, k=3, alpha=1.0, history=history)
    # the scored basket's history is exactly the four train baskets: its own vector is the train vector
    np.testing.assert_allclose(tifu.own(np.arange(1))[0], vectors[1], rtol=1e-12)
    scores = tifu.score(np.arange(1), *_visible([[]]))
    assert scores[0, P5] > scores[0, P3]
    # 6 is the most popular but never bought by customer 1: last, after everything they bought.
    assert _order(scores)[0].tolist() == [P4, P5, P3, P6]
    # Without decay the oldest and the latest basket weigh the same.
    flat = TifuKnnScorer(train, scored, V, decay=1.0, k=3, alpha=1.0, history=history).own(np.arange(1))[0]
    assert flat[P3] == flat[P5] == 0.25


def test_tifu_neighbours_bring_their_products_only_with_alpha_below_one():
    # Customers 1 and 2 share 3 and 4; 2 also buys 6. Customer 3 buys only 5 (no overlap with 1).
    # Anonymous baskets make 5 more popular than 6.
    train, scored = in_sequence(micro_split([[P3, P4], [P3, P4, P6], [P5], [P5], [P5]], customers=[1, 2, 3, 0, 0]),
                                micro_split([[P3]], customers=[1]))
    visible = _visible([[]])
    knn = TifuKnnScorer(train, scored, V, decay=0.9, k=2, alpha=0.6, history=AsOfHistory([train, scored], V))
    # customer 1's only neighbour of positive similarity is 2 (itself excluded, 3 orthogonal)
    assert knn.neighbour_index[1].tolist() == [2, -1]
    np.testing.assert_allclose(knn.neighbour_similarity[1, 0], 2 / np.sqrt(2 * 3))
    with_neighbours = knn.score(np.arange(1), *visible)[0]
    alone = knn.with_alpha(1.0).score(np.arange(1), *visible)[0]
    assert with_neighbours[P6] > with_neighbours[P5]  # the neighbour's product
    assert alone[P6] < alone[P5]  # popularity only
    np.testing.assert_allclose(with_neighbours[P6].item(), 0.4 * 1.0, rtol=1e-3)  # (1 − α) × neighbour's share
    assert knn.with_alpha(1.0).train_vectors is knn.train_vectors


def _dense_knn_oracle(vectors: sp.csr_matrix, k: int) -> np.ndarray:
    """[C, k] similarities of the k nearest other customers, by a dense cosine matrix (zeros = none)."""
    dense = vectors.toarray()
    norms = np.linalg.norm(dense, axis=1)
    unit = dense / np.where(norms > 0, norms, 1.0)[:, None]
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    top = -np.sort(-cos, axis=1)[:, :k]
    return np.where(top > 0, top, 0.0)


def test_nearest_customers_match_dense_oracle_at_any_chunk_size(cache):
    train = cache.split("train")
    vectors = decayed_customer_vectors(train, n_customer_rows(train), len(cache.product_log_price), 0.9)
    want = _dense_knn_oracle(vectors, 7)
    for cells in (1, 1000, 1 << 22):  # one customer per chunk, a few, all at once
        index, similarity = nearest_customers(vectors, 7, chunk_cells=cells)
        np.testing.assert_allclose(similarity, want, atol=1e-12)
        rows = np.repeat(np.arange(len(index)), 7).reshape(index.shape)
        assert not (index == rows).any()  # never oneself
        found = index >= 0
        dense = vectors.toarray()
        cos = (dense[rows[found]] * dense[index[found]]).sum(1) / (
            np.linalg.norm(dense[rows[found]], axis=1) * np.linalg.norm(dense[index[found]], axis=1))
        np.testing.assert_allclose(cos, similarity[found], rtol=1e-9)
    mean = (neighbour_mix(index) @ vectors).toarray()
    r = int(np.flatnonzero(found.all(axis=1))[0])
    np.testing.assert_allclose(mean[r], dense[index[r]].mean(axis=0), rtol=1e-9)


# --------------------------------------------------------------------------------------------
# The tiny cache
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tiny_prepped) -> TensorCache:
    return TensorCache.latest(tiny_prepped.cache)


@pytest.fixture(scope="module")
def validation_only_samples(tiny_prepped, tmp_path_factory):
    """The tiny samples without test.parquet: tuning must never need it."""
    root = tmp_path_factory.mktemp("validation_only") / "samples"
    shutil.copytree(tiny_prepped.samples, root, ignore=shutil.ignore_patterns("test.parquet"))
    return root


def test_tuning_picks_grid_points_and_beats_personal_frequency(cache, validation_only_samples, monkeypatch):
    opened = []
    split = cache.split
    monkeypatch.setattr(cache, "split", lambda name: opened.append(name) or split(name))
    start = time.perf_counter()
    tuned = tune_on_validation(cache, validation_only_samples)
    seconds = time.perf_counter() - start
    assert "test" not in opened and "validation" in opened

    assert tuned["blend"]["params"] in list(BLEND_GRID) and tuned["tifu_knn"]["params"] in list(TIFU_GRID)
    for name in ("blend", "tifu_knn"):
        grid = tuned[name]["grid"]
        assert len(grid) == len(BLEND_GRID if name == "blend" else TIFU_GRID)
        assert tuned[name]["validation_recall@10"] == max(g["validation_recall@10"] for g in grid)

    setup = prepare(cache, validation_only_samples, split="validation")
    train, scored, vocab = cache.split("train"), cache.split("validation"), len(cache.product_log_price)
    history = as_of_history(cache, through="validation")
    timings, recall = {}, {}
    scorers = {"popularity": lambda: PopularityScorer(train, vocab),
               "personal_frequency": lambda: PersonalFrequencyScorer(train, scored, vocab, history=history),
               "cooccurrence": lambda: CooccurrenceScorer(train, vocab),
               **{name: (lambda name=name: STRONG_BASELINES[name](train, scored, vocab, history=history,
                                                                  **tuned[name]["params"]))
                  for name in STRONG_BASELINES}}
    for name, make in scorers.items():
        t0 = time.perf_counter()
        scorer = make()
        t1 = time.perf_counter()
        recall[name] = ranking_metrics(rank_baseline(setup, scorer))["recall@10"]
        timings[name] = (round(t1 - t0, 3), round(time.perf_counter() - t1, 3))
    print(f"\ntiny validation ({len(setup.positions)} positions) recall@10: {recall}\n"
          f"(fit s, score s): {timings}\ntuning: {seconds:.1f} s; chosen: "
          f"{ {k: v['params'] for k, v in tuned.items()} }")
    for name in STRONG_BASELINES:
        assert recall[name] == pytest.approx(tuned[name]["validation_recall@10"])  # rebuilt = tuned
        assert recall[name] >= recall["personal_frequency"], recall


def test_customer_vectors_by_pieces_of_customers_are_bit_identical(cache, monkeypatch):
    """The TIFU vectors are computed a range of customers at a time over their own baskets (gathered from
    the memory-mapped split): the same CSR, bit for bit, as one piece."""
    import retailsim_pipeline.evaluation.strong_baselines as strong

    train = cache.split("train")
    n, v = n_customer_rows(train), len(cache.product_log_price)
    whole = decayed_customer_vectors(train, n, v, 0.9)
    monkeypatch.setattr(strong, "VECTOR_CHUNK_BASKETS", 5)
    pieces = decayed_customer_vectors(train, n, v, 0.9)
    assert pieces.shape == whole.shape
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(pieces, name), getattr(whole, name), err_msg=name)
