"""The completion question: its batch, and the served ranking equal to the evaluated one on the tiny data."""

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from retailsim_pipeline.config import MASK, N_SPECIAL, PAD, UNK, training_preset
from retailsim_pipeline.evaluation.evaluate import prepare, rank_model, rank_served
from retailsim_pipeline.evaluation.positions import completion_batch
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.requests import ServingFeatures
from retailsim_pipeline.training.batches import BatchAssembler
from retailsim_pipeline.training.trainer import build_model

RANK_FIELDS = ("n_greater", "n_ties", "n_candidates")


@pytest.fixture(scope="module")
def cache(tiny_prepped) -> TensorCache:
    return TensorCache.latest(tiny_prepped.cache)


@pytest.fixture(scope="module")
def assembler(cache) -> BatchAssembler:
    return BatchAssembler(cache, "test", batch_size=64, shuffle=False)


@pytest.fixture(scope="module")
def setup(cache, tiny_prepped):
    return prepare(cache, tiny_prepped.samples, split="test")


@pytest.fixture(scope="module")
def features(cache, tiny_prepped) -> ServingFeatures:
    return ServingFeatures.from_cache(cache, tiny_prepped.samples)


@pytest.fixture(scope="module")
def model(cache):
    torch.manual_seed(0)  # untrained, but a fixed, non-degenerate scorer (no ties on the tiny data)
    return build_model(training_preset("tiny"), cache).eval()


@pytest.fixture(scope="module")
def model_ranks(setup, model):
    ranks, _ = rank_model(setup, model)
    return ranks


# ---------------------------------------------------------------------- completion_batch


def _rows_and_visible(assembler: BatchAssembler) -> tuple[np.ndarray, np.ndarray]:
    """Eight baskets of assorted lengths (not in split order) and a seeded visible mask; one basket all
    hidden, one all visible."""
    lengths = np.diff(assembler.offsets)
    order = np.argsort(lengths, kind="stable")
    idx = order[np.linspace(0, len(order) - 1, 8).astype(int)][[3, 0, 7, 5, 1, 6, 2, 4]]
    assert len(set(lengths[idx])) >= 5 and lengths[idx].max() >= 10
    visible = np.random.default_rng(7).random(int(assembler.offsets[-1])) < 0.6
    lo, hi = assembler.offsets[idx[2]], assembler.offsets[idx[2] + 1]  # the longest: all hidden
    visible[lo:hi] = False
    lo, hi = assembler.offsets[idx[5]], assembler.offsets[idx[5] + 1]
    visible[lo:hi] = True
    return idx, visible


def _expected_row(assembler, full, r: int, i: int, visible):
    """Row ``r`` (basket ``i``) of the completion question, from the unmasked batch: visible tokens and
    their price rows in line order."""
    lo, hi = assembler.offsets[i], assembler.offsets[i + 1]
    keep = np.ones(hi - lo, dtype=bool) if visible is None else visible[lo:hi]
    tokens = full.tokens[r, :hi - lo].numpy()[keep]
    price = full.price[r, :hi - lo].numpy()[keep]
    return tokens, price


@pytest.mark.parametrize("use_mask", [True, False])
def test_completion_batch_is_the_visible_lines_then_one_slot(assembler, use_mask):
    idx, visible = _rows_and_visible(assembler)
    visible = visible if use_mask else None
    batch = completion_batch(assembler, idx, visible)
    full = assembler.assemble(idx, mask_prob=0.0, mask_seed=(0,))
    B, S = full.tokens.shape
    assert batch.tokens.shape == (B, S + 1) and batch.price.shape == (B, S + 1, full.price.shape[2])
    n_visible = []
    for r, i in enumerate(idx):
        tokens, price = _expected_row(assembler, full, r, i, visible)
        n = len(tokens)
        n_visible.append(n)
        np.testing.assert_array_equal(batch.tokens[r, :n].numpy(), tokens)
        assert batch.tokens[r, n] == MASK and (batch.tokens[r, n + 1:] == PAD).all()
        np.testing.assert_array_equal(batch.price[r, :n].numpy(), price)
        assert (batch.price[r, n:] == 0).all()
        assert batch.attention_mask[r].tolist() == [j <= n for j in range(S + 1)]
        assert torch.nonzero(batch.predict_mask[r]).flatten().tolist() == [n]
        assert batch.targets[r, n] == UNK
    n_visible = np.array(n_visible)
    lengths = np.diff(assembler.offsets)[idx]
    if use_mask:
        assert n_visible.min() == 0 and (n_visible == lengths).any() and ((0 < n_visible) & (n_visible < lengths)).any()
    else:
        np.testing.assert_array_equal(n_visible, lengths)
    assert (np.abs(full.price.numpy()).sum(-1) > 0).sum() > 0  # the prices compared are real
    for name in ("context", "history_tokens", "history_counts", "history_past", "history_recency",
                 "history_decayed", "labels", "index"):
        torch.testing.assert_close(getattr(batch, name), getattr(full, name), rtol=0, atol=0, msg=name)


def test_completion_batch_does_not_depend_on_batching(assembler):
    idx, visible = _rows_and_visible(assembler)
    whole = completion_batch(assembler, idx, visible)
    halves = [completion_batch(assembler, idx[:3], visible), completion_batch(assembler, idx[3:], visible)]
    assert halves[0].tokens.shape[1] != halves[1].tokens.shape[1]  # different padding, same questions
    for r in range(len(idx)):
        half, h = (halves[0], r) if r < 3 else (halves[1], r - 3)
        n = int(whole.attention_mask[r].sum())
        assert int(half.attention_mask[h].sum()) == n
        for name in ("tokens", "price", "targets"):
            a, b = getattr(whole, name)[r], getattr(half, name)[h]
            torch.testing.assert_close(a[:n], b[:n], rtol=0, atol=0, msg=name)
        for batch, row in ((whole, r), (half, h)):  # beyond the slot: padding only
            assert (batch.tokens[row, n:] == PAD).all() and (batch.price[row, n:] == 0).all()
            assert (batch.targets[row, n:] == -100).all()
        for name in ("context", "history_tokens", "history_counts", "history_past", "history_recency",
                     "history_decayed"):
            torch.testing.assert_close(getattr(whole, name)[r], getattr(half, name)[h], rtol=0, atol=0, msg=name)


def test_completion_batch_rejects_a_mask_of_another_split(assembler):
    with pytest.raises(ValueError, match="visible covers 3 lines"):
        completion_batch(assembler, np.array([0]), np.ones(3, dtype=bool))


# ---------------------------------------------------------------------- rank_served


def test_rank_served_equals_rank_model_for_the_caches_model(setup, model, features, model_ranks):
    served = rank_served(setup, model, features)
    assert len(served) == len(setup.positions) > 100
    for name in RANK_FIELDS:
        np.testing.assert_array_equal(getattr(served, name), getattr(model_ranks, name), err_msg=name)
    # A scorer that tells the positions apart (not all first, last or tied), so the equality says something.
    assert len(np.unique(model_ranks.n_greater)) > 20 and (model_ranks.n_ties == 0).mean() > 0.9


def test_a_target_the_served_vocabulary_lacks_is_a_miss_and_nothing_else_moves(setup, model, features,
                                                                              model_ranks):
    """Rename one target product in the served vocabulary: its positions rank behind every candidate;
    positions whose basket and customer never touch that product keep their exact ranks."""
    p = setup.positions
    codes = features.product_codes
    test = pl.read_parquet(setup.samples_dir / "test.parquet", columns=["cust_code"])
    customer = test.get_column("cust_code").cast(pl.String).to_list()
    log = features.baskets.select(pl.col("cust_code").cast(pl.String), pl.col("products").cast(pl.List(pl.String)))
    visible = [set(setup.visible_tokens[setup.visible_offsets[j]:setup.visible_offsets[j + 1]].tolist())
               for j in range(len(p))]

    def touched(token: int) -> np.ndarray:
        """[P] bool: the renamed product would change the position's input (visible, or in its customer's log)."""
        buyers = set(log.filter(pl.col("products").list.contains(codes[token])).get_column("cust_code").drop_nulls())
        return np.array([token in visible[j] or customer[s] in buyers for j, s in enumerate(p.sample)])

    # A target of several positions, shown next to the first product token (N_SPECIAL, the stand-in
    # target of a miss) in some of its baskets; of those, the one leaving most positions untouched.
    beside_first = [t for t in np.unique(p.target) if t != N_SPECIAL and (p.target == t).sum() >= 2
                    and any(N_SPECIAL in visible[j] for j in np.flatnonzero(p.target == t))]
    assert beside_first
    token = max(beside_first, key=lambda t: (int((~touched(t)).sum()), -t))
    vocabulary = features.vocabulary.with_columns(
        pl.when(pl.col("token_id") == token).then(pl.lit("NOT_A_PRODUCT")).otherwise(pl.col("PROD_CODE"))
        .alias("PROD_CODE"))
    renamed = dataclasses.replace(features, vocabulary=vocabulary)
    served = rank_served(setup, model, renamed)

    miss = p.target == token
    assert miss.sum() >= 2 and (model_ranks.n_greater[miss] < model_ranks.n_candidates[miss] - 1).all()
    np.testing.assert_array_equal(served.n_greater[miss], served.n_candidates[miss])
    np.testing.assert_array_equal(served.n_ties[miss], 0)
    # The candidates are the same products (the renamed token is still one), so the same count.
    np.testing.assert_array_equal(served.n_candidates[miss], model_ranks.n_candidates[miss])
    untouched = ~touched(token) & ~miss
    assert untouched.sum() > len(p) // 4
    for name in RANK_FIELDS:
        np.testing.assert_array_equal(getattr(served, name)[untouched], getattr(model_ranks, name)[untouched],
                                      err_msg=name)
