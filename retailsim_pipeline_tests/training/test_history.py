"""The per-customer memory of most bought products: built from train only, leave-one-out in train batches."""

import numpy as np

from retailsim_pipeline.config import PAD
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.training.batches import BatchAssembler


def test_history_is_each_customers_most_bought_train_products(tiny_prepped):
    cache = TensorCache.latest(tiny_prepped.cache)
    tokens, counts = np.asarray(cache["customer_history_tokens"]), np.asarray(cache["customer_history_counts"])
    assert tokens.shape == counts.shape == (cache.customer_context.shape[0], 32)
    assert not tokens[0].any() and not counts[0].any()  # anonymous/unknown: empty
    train = cache.split("train")
    rows = np.repeat(np.asarray(train.customer_index), np.diff(np.asarray(train.offsets)))
    c = 5 if tokens.shape[0] > 5 else 1
    bought = np.asarray(train.tokens)[rows == c]
    values, n = np.unique(bought, return_counts=True)
    order = np.lexsort((values, -n))[:32]
    assert np.array_equal(tokens[c][: len(order)], values[order])
    assert np.array_equal(counts[c][: len(order)], n[order].astype(np.float32))
    assert np.all(np.diff(counts, axis=1) <= 0)  # most bought first


def test_train_batches_leave_the_basket_out_of_its_own_history(tiny_prepped):
    cache = TensorCache.latest(tiny_prepped.cache)
    stored = np.asarray(cache["customer_history_counts"])
    for split, loo in (("train", True), ("validation", False)):
        assembler = BatchAssembler(cache, split, batch_size=64, seed=0)
        arrays = cache.split(split)
        idx = np.arange(min(64, len(arrays)))
        batch = assembler.assemble(idx, mask_prob=0.15, mask_seed=(0,))
        cust = np.asarray(arrays.customer_index)[idx]
        for row, i in enumerate(idx):
            basket = set(np.asarray(arrays.tokens[arrays.offsets[i]:arrays.offsets[i + 1]]).tolist())
            hist = batch.history_tokens[row].numpy()
            expected = stored[cust[row]] - (loo * np.isin(hist, list(basket)) * (hist != PAD))
            assert np.array_equal(batch.history_counts[row].numpy(), expected.astype(np.float32))
        if loo:  # carded train baskets are always in their own history, so something was subtracted
            assert (batch.history_counts.numpy() < stored[cust]).any()
