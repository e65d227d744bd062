"""Evaluation positions and the baselines: hand-made micro cases, then the tiny cache."""

import math

import numpy as np
import pytest
import torch

from retailsim_pipeline.evaluation.baselines import (
    CooccurrenceScorer,
    PersonalFrequencyScorer,
    PopularityScorer,
    as_of_history,
)
from retailsim_pipeline.evaluation.metrics import Ranks, ranking_metrics, target_ranks
from retailsim_pipeline.evaluation.positions import eval_positions, masked_batch, visible_tokens
from retailsim_pipeline.config import MASK, N_SPECIAL, UNK
from retailsim_pipeline.prep.cache import SplitArrays, TensorCache
from retailsim_pipeline.prep.history import AsOfHistory
from retailsim_pipeline_tests.evaluation.micro import in_sequence, micro_split
from retailsim_pipeline.model.batch import IGNORE_INDEX
from retailsim_pipeline.training.batches import BatchAssembler

# --------------------------------------------------------------------------------------------
# Micro cases
# --------------------------------------------------------------------------------------------

V = N_SPECIAL + 4  # products 3, 4, 5, 6


# Train: popularity 3: 3 lines, 4: 3, 5: 1, 6: 1; customer 1 bought 3 ×2, 4, 5; customer 2 bought 3, 4, 6;
# the anonymous basket [4] (row 0) belongs to nobody.
MICRO_TRAIN = micro_split([[3, 4], [3, 5], [3, 4, 6], [4]], customers=[1, 1, 2, 0])


def _visible(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return offsets, np.array([t for r in rows for t in r], dtype=np.int64)


def test_popularity_micro():
    scores = PopularityScorer(MICRO_TRAIN, V).score(np.arange(2), *_visible([[3], []]))
    expected = torch.tensor([0, 0, 0, 3, 3, 1, 1], dtype=torch.float32)
    assert scores.dtype == torch.float32 and scores.shape == (2, V)
    assert torch.equal(scores, expected.expand(2, -1))


def test_personal_frequency_micro():
    # Scored split (after train): customers 1, anonymous, 2, and 3 (not seen before → no history).
    train, scored = in_sequence(MICRO_TRAIN, micro_split([[5], [5], [5], [5]], customers=[1, 0, 2, 3]))
    history = AsOfHistory([train, scored], V)
    scores = PersonalFrequencyScorer(train, scored, V, history=history).score(np.array([0, 1, 2, 3]),
                                                                              *_visible([[]] * 4))
    pop = np.array([0, 0, 0, 3, 3, 1, 1]) / 4  # popularity / (max + 1)
    expected = np.array([
        [0, 0, 0, 2, 1, 1, 0],  # customer 1
        [0, 0, 0, 0, 0, 0, 0],  # anonymous: popularity only
        [0, 0, 0, 1, 1, 0, 1],  # customer 2
        [0, 0, 0, 0, 0, 0, 0],  # unknown customer
    ]) + pop
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6)
    # The customer's items come first (most bought first), then the rest by popularity.
    assert torch.argsort(scores[0], descending=True)[:4].tolist() == [3, 4, 5, 6]


def test_cooccurrence_micro_cosine_and_count():
    # Baskets holding each product: c3 = 3, c4 = 3, c5 = 1, c6 = 1. Pairs: 3-4: 2, 3-5: 1, 3-6: 1, 4-6: 1.
    s3 = 1 / math.sqrt(3)
    sim = np.zeros((V, V))
    for (i, j), v in {(3, 4): 2 / 3, (3, 5): s3, (3, 6): s3, (4, 6): s3}.items():
        sim[i, j] = sim[j, i] = v
    tie = np.array([0, 0, 0, 3, 3, 1, 1]) / 4 * (0.5 * s3)  # popularity below half the smallest similarity
    scorer = CooccurrenceScorer(MICRO_TRAIN, V)
    np.testing.assert_allclose(scorer.similarity, sim, rtol=1e-12)
    visible = _visible([[3], [3, 4], [], [3, 3, UNK]])
    got = scorer.score(np.arange(4), *visible).numpy()
    expected = np.stack([sim[3], sim[3] + sim[4], np.zeros(V), sim[3]]) + tie
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Every product co-occurring with the visible set outranks every product that does not.
    assert got[0, 5] > got[0, 3]

    counts = CooccurrenceScorer(MICRO_TRAIN, V, normalize="count").score(np.arange(1), *_visible([[3, 4]]))
    # sums of co-occurrence counts with 3 and 4: 3 ← 4: 2; 4 ← 3: 2; 5 ← 3: 1; 6 ← 3: 1, 4: 1
    tie_count = np.array([0, 0, 0, 3, 3, 1, 1]) / 4 * 0.5
    np.testing.assert_allclose(counts.numpy()[0], np.array([0, 0, 0, 2, 2, 1, 2]) + tie_count, rtol=1e-6)


def test_positions_micro_rules():
    arrays = micro_split([[3], [3, 4], [3, UNK], [UNK, UNK], [4, 5, 6, 3, 4]], customers=[0] * 5)
    pos = eval_positions(arrays, seed=0, mask_prob=0.0)
    # mask_prob 0: exactly one forced line in each basket of length ≥ 2 with a scorable line.
    assert pos.sample.tolist() == [1, 2, 4]
    assert pos.position[1] == 0 and pos.target[1] == 3  # basket [3, UNK]: UNK is never a target
    assert not pos.hidden[:1].any() and not pos.hidden[5:7].any()  # length 1 and all-UNK baskets
    everything = eval_positions(arrays, seed=0, mask_prob=1.0)
    assert everything.sample.tolist() == [1, 1, 2, 4, 4, 4, 4, 4]
    assert everything.hidden.tolist() == [False] + [True] * 11
    off, tok = visible_tokens(arrays, pos)
    assert off.tolist()[0] == 0 and len(off) == len(pos) + 1


# --------------------------------------------------------------------------------------------
# The tiny cache
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tiny_prepped) -> TensorCache:
    return TensorCache.latest(tiny_prepped.cache)


@pytest.fixture(scope="module")
def test_split(cache) -> SplitArrays:
    return cache.split("test")


@pytest.fixture(scope="module")
def positions(test_split):
    return eval_positions(test_split, seed=1234)


def test_positions_deterministic_and_seeded(test_split, positions):
    again = eval_positions(test_split, seed=1234)
    for f in ("sample", "position", "target", "hidden"):
        np.testing.assert_array_equal(getattr(positions, f), getattr(again, f))
    other = eval_positions(test_split, seed=99)
    assert not np.array_equal(positions.hidden, other.hidden)


def test_positions_cover_the_rules(test_split, positions):
    offsets = np.asarray(test_split.offsets)
    tokens = np.asarray(test_split.tokens)
    lengths = np.diff(offsets)
    per_basket = np.bincount(positions.sample, minlength=len(lengths))
    has_product = np.bincount(np.repeat(np.arange(len(lengths)), lengths)[tokens != UNK],
                              minlength=len(lengths)) > 0
    assert (per_basket[(lengths >= 2) & has_product] >= 1).all()
    assert (per_basket[lengths == 1] == 0).all()
    line = offsets[positions.sample] + positions.position
    assert (positions.position < lengths[positions.sample]).all()
    np.testing.assert_array_equal(positions.target, tokens[line])
    assert (positions.target >= N_SPECIAL).all()
    assert positions.hidden[line].all()
    # sorted by (sample, position), and the hidden share is near mask_prob plus the forced lines
    assert (np.diff(line) > 0).all()
    assert 0.15 <= positions.hidden.mean() <= 0.35


def test_visible_tokens_match_reference(test_split, positions):
    off, tok = visible_tokens(test_split, positions)
    offsets, tokens = np.asarray(test_split.offsets), np.asarray(test_split.tokens)
    for p in np.random.default_rng(0).choice(len(positions), 200, replace=False):
        s = positions.sample[p]
        basket = slice(offsets[s], offsets[s + 1])
        np.testing.assert_array_equal(tok[off[p]:off[p + 1]], tokens[basket][~positions.hidden[basket]])


def test_masked_batch_masks_exactly_the_hidden_lines_independent_of_batching(cache, test_split, positions):
    assembler = BatchAssembler(cache, "test", batch_size=64, shuffle=False)
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(len(test_split), 300, replace=False))
    offsets, tokens = np.asarray(test_split.offsets), np.asarray(test_split.tokens)

    def per_sample(batch):
        out = {}
        for b, s in enumerate(batch.index.tolist()):
            n = offsets[s + 1] - offsets[s]
            out[s] = (batch.tokens[b, :n].numpy(), batch.targets[b, :n].numpy(), batch.price[b, :n].numpy())
        return out

    whole = masked_batch(assembler, rows, positions.hidden)
    halves = {**per_sample(masked_batch(assembler, rows[::2], positions.hidden)),
              **per_sample(masked_batch(assembler, rows[1::2][::-1], positions.hidden))}
    for s, (tok, tgt, price) in per_sample(whole).items():
        basket = slice(offsets[s], offsets[s + 1])
        hid, orig = positions.hidden[basket], tokens[basket]
        np.testing.assert_array_equal(tok == MASK, hid)
        np.testing.assert_array_equal(tok[~hid], orig[~hid])
        np.testing.assert_array_equal(tgt, np.where(hid & (orig != UNK), orig, IGNORE_INDEX))
        assert not price[hid].any() and price[~hid].any(axis=1).all()
        for a, b in zip((tok, tgt, price), halves[s]):
            np.testing.assert_array_equal(a, b)
    # The predicted positions, row-major, are exactly the EvalPositions of these (ascending) samples.
    chosen = np.isin(positions.sample, rows)
    np.testing.assert_array_equal(whole.targets[whole.predict_mask].numpy(), positions.target[chosen])


def _evaluate(scorer, arrays: SplitArrays, positions, chunk: int = 512) -> Ranks:
    off, tok = visible_tokens(arrays, positions)
    parts = []
    for start in range(0, len(positions), chunk):
        stop = min(start + chunk, len(positions))
        sub_off = off[start:stop + 1] - off[start]
        sub_tok = tok[off[start]:off[stop]]
        scores = scorer.score(positions.sample[start:stop], sub_off, sub_tok)
        parts.append(target_ranks(scores, positions.target[start:stop], sub_off, sub_tok))
    return Ranks.concat(parts)


class _Constant:
    """Every product scores the same: the random-ranking expectation, exactly."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def score(self, sample, visible_offsets, visible_tokens):
        return torch.zeros(len(sample), self.vocab_size)


@pytest.fixture(scope="module")
def baseline_ranks(cache, test_split, positions) -> dict[str, Ranks]:
    train, vocab = cache.split("train"), len(cache.product_log_price)
    scorers = {
        "random": _Constant(vocab),
        "popularity": PopularityScorer(train, vocab),
        "personal": PersonalFrequencyScorer(train, test_split, vocab, history=as_of_history(cache)),
        "cooccurrence": CooccurrenceScorer(train, vocab),
    }
    return {name: _evaluate(s, test_split, positions) for name, s in scorers.items()}


def test_baselines_beat_random_ranking(baseline_ranks):
    recall = {name: ranking_metrics(r)["recall@10"] for name, r in baseline_ranks.items()}
    print("tiny test recall@10:", recall)
    for name in ("popularity", "personal", "cooccurrence"):
        assert recall[name] > recall["random"], recall


def test_personal_frequency_at_least_popularity_on_carded(baseline_ranks, test_split, positions):
    key = np.asarray(test_split.customer_key)[positions.sample]
    past = np.asarray(test_split.past_baskets)[positions.sample]
    known = (key > 0) & (past > 0)  # carded customers with baskets before this one
    assert known.sum() > 100
    personal = ranking_metrics(baseline_ranks["personal"].subset(known))["recall@10"]
    popular = ranking_metrics(baseline_ranks["popularity"].subset(known))["recall@10"]
    assert personal >= popular, (personal, popular)
    # Anonymous positions and first baskets: personal frequency falls back to popularity exactly.
    for f in ("n_greater", "n_ties"):
        np.testing.assert_array_equal(getattr(baseline_ranks["personal"].subset(~known), f),
                                      getattr(baseline_ranks["popularity"].subset(~known), f))


def test_cooccurrence_at_least_popularity(baseline_ranks):
    cooc = ranking_metrics(baseline_ranks["cooccurrence"])["recall@10"]
    popular = ranking_metrics(baseline_ranks["popularity"])["recall@10"]
    assert cooc >= popular, (cooc, popular)
