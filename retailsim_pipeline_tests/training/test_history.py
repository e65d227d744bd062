"""The point-in-time memory in the cache and in the batches: the products of each basket's customer's
baskets strictly before it (by date, hour, basket id), from every split, largest decayed share first —
checked against the samples parquet."""

import numpy as np
import polars as pl
import pytest
import torch

from retailsim_pipeline.config import N_SPECIAL
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.samples import SPLITS, read_samples
from retailsim_pipeline.training.batches import BatchAssembler


@pytest.fixture(scope="module")
def cache(tiny_prepped) -> TensorCache:
    return TensorCache.latest(tiny_prepped.cache)


@pytest.fixture(scope="module")
def baskets(cache, tiny_prepped) -> pl.DataFrame:
    """Every basket of every split from the samples parquet, in time order per customer: split, row (in
    its split), cust_code, and its products under the cache's vocabulary (UNK and specials dropped)."""
    token = dict(cache.vocabulary().filter(pl.col("token_id") >= N_SPECIAL)
                 .select("PROD_CODE", "token_id").iter_rows())
    frames = [read_samples(tiny_prepped.samples, s).with_row_index("row").select(
        pl.lit(s).alias("split"), "row", "basket_id", pl.col("cust_code").cast(pl.String), "date", "hour",
        pl.col("products").list.eval(pl.element().cast(pl.String))) for s in SPLITS]
    everyone = pl.concat(frames).sort("cust_code", "date", "hour", "basket_id", nulls_last=True)
    return everyone.with_columns(pl.col("products").map_elements(
        lambda ps: [token[p] for p in ps if p in token], return_dtype=pl.List(pl.Int64)).alias("tokens"))


def _brute_force(baskets: pl.DataFrame, k: int, splits: tuple[str, ...] = SPLITS,
                 decay: float = 0.97) -> dict[tuple[str, int], tuple]:
    """(split, row) → (tokens, counts, recency, decayed share) of the memory over the customer's baskets
    in ``splits`` strictly before it: top k by decayed share (each earlier basket holding the product
    weighs ``decay ** age``, age 0 = the previous one), then line count, then most recently bought, then
    token."""
    out = {}
    for (cust,), group in baskets.group_by("cust_code", maintain_order=True):
        count, last, held, total = {}, {}, {}, 0.0
        for seq, (split, row, tokens) in enumerate(group.select("split", "row", "tokens").iter_rows()):
            top = [] if cust is None else sorted(count, key=lambda t: (-held[t], -count[t], -last[t], t))[:k]
            out[(split, row)] = (top, [count[t] for t in top], [seq - 1 - last[t] for t in top],
                                 [held[t] / total for t in top])
            if cust is not None and split in splits:
                held = {t: h * decay for t, h in held.items()}
                total = total * decay + 1.0
                for t in set(tokens):
                    held[t] = held.get(t, 0.0) + 1.0
                for t in tokens:
                    count[t] = count.get(t, 0) + 1
                    last[t] = seq
    return out


def test_memory_is_the_brute_force_over_earlier_baskets_of_every_split(cache, baskets):
    k, decay = cache.manifest["config"]["history_items"], cache.manifest["config"]["memory_decay"]
    want = _brute_force(baskets, k, decay=decay)
    for split in SPLITS:
        a = cache.split(split)
        tokens, counts = np.asarray(a.history_tokens), np.asarray(a.history_counts)
        recency, decayed = np.asarray(a.history_recency), np.asarray(a.history_decayed)
        assert tokens.shape == (len(a), k)
        for row in range(len(a)):
            top, n, gap, share = want[(split, row)]
            assert tokens[row, :len(top)].tolist() == top and counts[row, :len(n)].tolist() == n, (split, row)
            assert recency[row, :len(gap)].tolist() == gap, (split, row)
            np.testing.assert_allclose(decayed[row, :len(share)], share, rtol=1e-3, atol=0)
            assert not tokens[row, len(top):].any() and not counts[row, len(n):].any(), (split, row)
        assert (np.diff(decayed.astype(np.float64), axis=1) <= 0).all()  # largest decayed share first


def test_a_later_splits_memory_holds_the_customers_earlier_baskets_of_that_split(cache, baskets):
    """A validation/test basket remembers the customer's earlier validation/test baskets too, not only
    train: its memory is at least, and often more than, the memory of the train baskets alone."""
    k = cache.manifest["config"]["history_items"]
    train_only = _brute_force(baskets, k, splits=("train",))
    first_non_train = (baskets.filter(pl.col("split") != "train").group_by("cust_code")
                       .agg(pl.col("date").min().alias("since")))
    more = compared = 0
    for split in SPLITS[1:]:
        a = cache.split(split)
        counts = np.asarray(a.history_counts).astype(np.int64)
        later = (baskets.filter(pl.col("split") == split).join(first_non_train, on="cust_code")
                 .filter(pl.col("date") > pl.col("since")).get_column("row").to_list())  # after another val/test basket
        for row in later:
            alone = sum(train_only[(split, row)][1])
            assert counts[row].sum() >= alone
            compared += 1
            more += counts[row].sum() > alone
    assert compared > 20 and more > compared / 2, (more, compared)


def test_anonymous_and_first_baskets_remember_nothing(cache):
    n_anonymous = n_first = 0
    for split in SPLITS:
        a = cache.split(split)
        key, past = np.asarray(a.customer_key), np.asarray(a.past_baskets)
        tokens, counts = np.asarray(a.history_tokens), np.asarray(a.history_counts)
        empty = (key == 0) | (past == 0)
        assert not tokens[empty].any() and not counts[empty].any()
        assert not past[key == 0].any()
        n_anonymous, n_first = n_anonymous + int((key == 0).sum()), n_first + int(((key > 0) & (past == 0)).sum())
        # A carded basket after others remembers something (unless none of the earlier products is in train).
        assert (counts[(key > 0) & (past > 0), 0] > 0).mean() > 0.95
    assert n_anonymous > 0 and n_first > 0


@pytest.mark.parametrize("split", SPLITS)
def test_batches_carry_the_stored_memory_of_their_samples(cache, split):
    """No leave-one-out any more, in any split: the memory never held the basket, so it is read as stored."""
    a = cache.split(split)
    assembler = BatchAssembler(cache, split, batch_size=64, seed=0)
    for no, idx in enumerate(assembler.epoch_batches(0)[:3]):
        b = assembler.assemble(idx, mask_prob=0.15, mask_seed=(0, no))
        assert b.history_tokens.dtype == torch.int64 and b.history_counts.dtype == torch.float32
        assert np.array_equal(b.history_tokens.numpy(), np.asarray(a.history_tokens)[idx].astype(np.int64))
        assert np.array_equal(b.history_counts.numpy(), np.asarray(a.history_counts)[idx].astype(np.float32))
