import threading
import time
from dataclasses import fields

import numpy as np
import pytest
import torch

from retailsim_pipeline.config import MASK, N_SPECIAL, PAD
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.features import history_vector, price_features
from retailsim_pipeline.model.batch import IGNORE_INDEX, Batch
from retailsim_pipeline.training.batches import BatchAssembler
from retailsim_pipeline.training.schedule import rank_batches

BUCKETS = (10, 20, 30, 50)


@pytest.fixture(scope="module")
def cache(tiny_prepped) -> TensorCache:
    return TensorCache.latest(tiny_prepped.cache)


@pytest.fixture(scope="module")
def train(cache) -> BatchAssembler:
    return BatchAssembler(cache, "train", batch_size=32, seed=7)


def _bucket(length: int) -> int:
    return next(i for i, bound in enumerate(BUCKETS) if length <= bound)


def _assert_batches_equal(a: Batch, b: Batch) -> None:
    for f in fields(Batch):
        assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name


def _originals(cache, split, batch: Batch) -> list[np.ndarray]:
    """Per-sample reference: each basket's tokens read straight from the CSR arrays."""
    a = cache.split(split)
    return [np.asarray(a.tokens[a.offsets[i]:a.offsets[i + 1]]) for i in batch.index.tolist()]


def test_batch_shapes_and_dtypes(train):
    idx = train.epoch_batches(0)[0]
    b = train.assemble(idx, mask_prob=0.15, mask_seed=(1,))
    B, S = len(idx), b.tokens.shape[1]
    assert len(b) == B
    expect = {"tokens": ((B, S), torch.int64), "targets": ((B, S), torch.int64),
              "attention_mask": ((B, S), torch.bool), "price": ((B, S, 64), torch.float32),
              "context": ((B, 400), torch.float32), "labels": ((B, 4), torch.int64), "index": ((B,), torch.int64)}
    for name, (shape, dtype) in expect.items():
        t = getattr(b, name)
        assert tuple(t.shape) == shape and t.dtype == dtype, (name, t.shape, t.dtype)
    assert torch.equal(b.index, torch.from_numpy(idx))


def test_pads_only_to_the_batchs_longest(cache, train):
    a = cache.split("train")
    lengths = np.diff(np.asarray(a.offsets))
    for idx in train.epoch_batches(0):
        b = train.assemble(idx, mask_prob=0.15, mask_seed=(0,))
        assert b.tokens.shape[1] == lengths[idx].max()
        assert torch.equal(b.attention_mask.sum(1), torch.from_numpy(lengths[idx]))
        assert (b.tokens[~b.attention_mask] == PAD).all() and (b.tokens[b.attention_mask] != PAD).all()
    # a hand-picked mix of a short and the longest basket pads to the longest, not to a bucket bound
    short, long_ = int(np.argmin(lengths)), int(np.argmax(lengths))
    b = train.assemble(np.array([short, long_]), mask_prob=0.15, mask_seed=(0,))
    assert b.tokens.shape == (2, lengths[long_])


def test_unmasked_tokens_are_the_baskets_padded_with_pad(cache):
    """Without masking a batch's tokens are each basket's CSR slice, then PAD (any order of rows)."""
    val = BatchAssembler(cache, "validation", batch_size=8, shuffle=False)
    a = cache.split("validation")
    idx = np.array([0, 5, 3, len(a) - 1])
    b = val.assemble(idx, mask_prob=0.0, mask_seed=(0,))
    assert (b.targets == IGNORE_INDEX).all()
    for row, i in enumerate(idx):
        seq = np.asarray(a.tokens[a.offsets[i]:a.offsets[i + 1]])
        tokens = b.tokens[row].numpy()
        assert np.array_equal(tokens[: len(seq)], seq) and np.all(tokens[len(seq):] == PAD)


def test_bucket_membership_and_every_sample_once(cache, train):
    lengths = np.diff(np.asarray(cache.split("train").offsets))
    batches = train.epoch_batches(3)
    assert len(batches) == len(train)
    for idx in batches:
        assert 0 < len(idx) <= 32
        assert len({_bucket(n) for n in lengths[idx]}) == 1, lengths[idx]
    seen = np.concatenate(batches)
    assert np.array_equal(np.sort(seen), np.arange(len(lengths)))  # once each, partial batches kept
    counts = np.bincount([_bucket(n) for n in lengths], minlength=len(BUCKETS))
    partial = sum(int(c % 32 != 0) for c in counts)
    assert sum(len(b) < 32 for b in batches) == partial
    assert len(train) == sum(-(-c // 32) for c in counts)


def test_drop_last_and_no_shuffle(cache):
    lengths = np.diff(np.asarray(cache.split("train").offsets))
    dropped = BatchAssembler(cache, "train", batch_size=32, drop_last=True)
    batches = dropped.epoch_batches(0)
    assert all(len(b) == 32 for b in batches) and len(batches) == len(dropped)
    ordered = BatchAssembler(cache, "train", batch_size=32, shuffle=False)
    flat = np.concatenate(ordered.epoch_batches(5))
    buckets = np.array([_bucket(n) for n in lengths[flat]])
    assert np.all(np.diff(buckets) >= 0)  # bucket order kept
    for k in np.unique(buckets):
        assert np.all(np.diff(flat[buckets == k]) > 0)  # sample order kept within the bucket
    assert all(np.array_equal(x, y) for x, y in zip(ordered.epoch_batches(0), ordered.epoch_batches(1)))


def test_deterministic_per_seed_and_epoch(cache, train):
    again = BatchAssembler(cache, "train", batch_size=32, seed=7)
    first, second = train.epoch_batches(2), again.epoch_batches(2)
    assert all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))
    other = train.epoch_batches(3)
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))
    other_seed = BatchAssembler(cache, "train", batch_size=32, seed=8).epoch_batches(2)
    assert not all(np.array_equal(x, y) for x, y in zip(first, other_seed))
    _assert_batches_equal(train.assemble(first[0], mask_prob=0.15, mask_seed=(7, 2, 0)),
                          again.assemble(second[0], mask_prob=0.15, mask_seed=(7, 2, 0)))
    assert not torch.equal(train.assemble(first[0], mask_prob=0.5, mask_seed=(7, 2, 0)).targets,
                           train.assemble(first[0], mask_prob=0.5, mask_seed=(7, 2, 1)).targets)


def test_masking_rules(cache, train):
    p = 0.15
    n_real = n_chosen = n_mask = n_random = n_kept = 0
    single_real = single_chosen = 0
    vocab = len(cache.product_log_price)
    for no, idx in enumerate(train.epoch_batches(0)):
        b = train.assemble(idx, mask_prob=p, mask_seed=(0, no))
        chosen = b.predict_mask
        assert not (chosen & ~b.attention_mask).any()
        lengths = b.attention_mask.sum(1)
        per_basket = chosen.sum(1)
        assert (per_basket[lengths >= 2] >= 1).all()
        single_real += int((lengths == 1).sum())
        single_chosen += int(per_basket[lengths == 1].sum())
        originals = _originals(cache, "train", b)
        for row, orig in enumerate(originals):
            n = len(orig)
            t, tg, ch = b.tokens[row, :n].numpy(), b.targets[row, :n].numpy(), chosen[row, :n].numpy()
            assert np.array_equal(tg[ch], orig[ch]) and (tg[~ch] == IGNORE_INDEX).all()
            assert np.array_equal(t[~ch], orig[~ch])
            n_mask += int((t[ch] == MASK).sum())
            kept = t[ch] == orig[ch]
            n_kept += int(kept.sum())
            other = ch.nonzero()[0][(t[ch] != MASK) & ~kept]
            assert ((t[other] >= N_SPECIAL) & (t[other] < vocab)).all()
            n_random += len(other)
        n_real += int(lengths.sum())
        n_chosen += int(per_basket.sum())
    # The forced one-per-basket rule lifts the rate a little above p on short baskets.
    rate = n_chosen / n_real
    assert p <= rate < p + 0.08, rate
    assert abs(single_chosen / single_real - p) < 4 * np.sqrt(p * (1 - p) / single_real) + 0.01
    sd = np.sqrt(0.1 * 0.9 / n_chosen)
    assert abs(n_mask / n_chosen - 0.8) < 5 * np.sqrt(0.16 / n_chosen)
    assert abs(n_random / n_chosen - 0.1) < 5 * sd + 0.005  # a random token may equal the original
    assert abs(n_kept / n_chosen - 0.1) < 5 * sd + 0.005


def test_mask_rate_on_long_baskets(cache, train):
    """Where the one-per-basket rule hardly ever fires, the rate is mask_prob itself."""
    lengths = np.diff(np.asarray(cache.split("train").offsets))
    idx = np.flatnonzero(lengths >= 15)
    chosen = real = 0
    for k in range(20):
        b = train.assemble(idx, mask_prob=0.2, mask_seed=(k,))
        chosen += int(b.predict_mask.sum())
        real += int(b.attention_mask.sum())
    assert abs(chosen / real - 0.2) < 4 * np.sqrt(0.2 * 0.8 / real) + 0.005


def test_mask_prob_zero_chooses_nothing(train):
    b = train.assemble(train.epoch_batches(0)[0], mask_prob=0.0, mask_seed=(0,))
    assert not b.predict_mask.any()


def test_price_and_context_match_a_per_sample_reference(cache, train):
    a = cache.split("train")
    log_price = np.asarray(cache.product_log_price)
    remembered = 0
    for no, idx in enumerate(train.epoch_batches(1)[:6]):
        b = train.assemble(idx, mask_prob=0.3, mask_seed=(1, no))
        for row, i in enumerate(idx):
            lo, hi = int(a.offsets[i]), int(a.offsets[i + 1])
            tok = np.asarray(a.tokens[lo:hi])
            expect = np.zeros((b.tokens.shape[1], cache.widths["price"]), np.float32)
            for j in range(hi - lo):
                if b.targets[row, j] == IGNORE_INDEX:
                    expect[j] = price_features(np.asarray([a.line_log_price_ratio[lo + j]]),
                                               np.asarray([log_price[tok[j]]]), cache.widths["price"])[0]
            np.testing.assert_allclose(b.price[row].numpy(), expect, rtol=0, atol=1e-6)
            memory = history_vector(np.asarray(a.history_tokens[i:i + 1]), np.asarray(a.history_counts[i:i + 1]),
                                    np.asarray(cache.product_embeddings)[:, :cache.widths["history"]])[0]
            context = np.concatenate([
                memory, cache.customer_context[a.customer_index[i]], a.temporal[i].astype(np.float32),
                cache.store_context[a.store_index[i]], a.trip[i].astype(np.float32)])
            assert context.shape == (cache.widths["context"],)
            assert np.array_equal(b.context[row].numpy(), context)
            remembered += bool(memory.any())
            assert np.array_equal(b.labels[row].numpy(), a.labels[i].astype(np.int64))
        assert (b.price[~b.attention_mask] == 0).all() and (b.price[b.predict_mask] == 0).all()
    assert remembered > 50  # the history part is a memory's mean embedding, not zeros


def test_resume_yields_exactly_the_remaining_batches(train):
    full = list(train.iterate(4, mask_prob=0.15, prefetch=0))
    assert [no for no, _ in full] == list(range(len(train)))
    k = len(train) // 2
    resumed = list(train.iterate(4, mask_prob=0.15, start_batch=k, prefetch=2))
    assert [no for no, _ in resumed] == list(range(k, len(train)))
    for (_, x), (_, y) in zip(full[k:], resumed, strict=True):
        _assert_batches_equal(x, y)
    assert list(train.iterate(4, mask_prob=0.15, start_batch=len(train))) == []


def test_a_rank_assembles_only_its_share(cache, monkeypatch):
    """``batch_numbers`` (a DDP rank's share, resumed after its first batch) are the only batches
    assembled, each the batch the whole epoch gives at that position, with or without prefetching."""
    train = BatchAssembler(cache, "train", batch_size=32, seed=7)
    full = dict(train.iterate(4, mask_prob=0.15, prefetch=0))
    assembled = []
    real = train.assemble

    def counting(indices, *, mask_prob, mask_seed):
        assembled.append(mask_seed[2])  # (seed, epoch, batch_no)
        return real(indices, mask_prob=mask_prob, mask_seed=mask_seed)

    monkeypatch.setattr(train, "assemble", counting)
    share = rank_batches(len(train), rank=1, world_size=2, grad_accum_steps=2)[1:]
    for prefetch in (0, 2):
        assembled.clear()
        got = list(train.iterate(4, mask_prob=0.15, batch_numbers=share, prefetch=prefetch))
        assert [no for no, _ in got] == assembled == list(share)
        for no, batch in got:
            _assert_batches_equal(batch, full[no])
    with pytest.raises(ValueError, match="not both"):
        list(train.iterate(4, mask_prob=0.15, start_batch=1, batch_numbers=share))
    with pytest.raises(ValueError, match="outside the epoch"):
        list(train.iterate(4, mask_prob=0.15, batch_numbers=[len(train)]))


def test_prefetch_thread_matches_synchronous(train):
    sync = list(train.iterate(0, mask_prob=0.2, prefetch=0))
    threaded = list(train.iterate(0, mask_prob=0.2, prefetch=3))
    assert len(sync) == len(threaded) == len(train)
    for (n1, x), (n2, y) in zip(sync, threaded):
        assert n1 == n2
        _assert_batches_equal(x, y)


def _wait_for_threads(baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


def test_prefetch_thread_propagates_exceptions(cache, monkeypatch):
    assembler = BatchAssembler(cache, "train", batch_size=32)
    baseline = threading.active_count()
    real = assembler.assemble

    def failing(indices, *, mask_prob, mask_seed):
        if mask_seed[-1] == 2:
            raise RuntimeError("corrupt batch 2")
        return real(indices, mask_prob=mask_prob, mask_seed=mask_seed)

    monkeypatch.setattr(assembler, "assemble", failing)
    got = []
    with pytest.raises(RuntimeError, match="corrupt batch 2"):
        for no, _ in assembler.iterate(0, mask_prob=0.15, prefetch=2):
            got.append(no)
    assert got == [0, 1]
    assert _wait_for_threads(baseline) == baseline


def test_early_break_leaves_no_thread(train):
    baseline = threading.active_count()
    it = train.iterate(0, mask_prob=0.15, prefetch=2)
    for no, _ in it:
        if no == 1:
            break
    it.close()
    assert _wait_for_threads(baseline) == baseline
    # also when the generator is dropped without an explicit close
    for no, _ in train.iterate(1, mask_prob=0.15, prefetch=1):
        break
    assert _wait_for_threads(baseline) == baseline


def test_max_samples_is_a_fixed_subset(cache):
    val = BatchAssembler(cache, "validation", batch_size=16, seed=3, shuffle=False, max_samples=50)
    assert val.n_samples == 50
    subsets = [np.sort(np.concatenate(val.epoch_batches(e))) for e in range(3)]
    assert all(np.array_equal(s, subsets[0]) for s in subsets) and len(np.unique(subsets[0])) == 50
    again = BatchAssembler(cache, "validation", batch_size=16, seed=3, shuffle=False, max_samples=50)
    assert np.array_equal(again.sample_indices, val.sample_indices)
    # shuffled training over a subset: same members every epoch, different order
    sub = BatchAssembler(cache, "train", batch_size=16, seed=3, max_samples=100)
    e0, e1 = np.concatenate(sub.epoch_batches(0)), np.concatenate(sub.epoch_batches(1))
    assert np.array_equal(np.sort(e0), np.sort(e1)) and not np.array_equal(e0, e1)
    # the same validation masks every time: iterate is a pure function of (seed, epoch, batch_no)
    for (_, x), (_, y) in zip(val.iterate(0, mask_prob=0.15, prefetch=0), again.iterate(0, mask_prob=0.15)):
        _assert_batches_equal(x, y)


def test_rejects_baskets_beyond_the_last_bucket(cache):
    with pytest.raises(ValueError, match="last bucket bound"):
        BatchAssembler(cache, "train", batch_size=8, buckets=(1,))


def test_iterate_moves_to_the_device(train):
    (no, b), = list(train.iterate(0, mask_prob=0.15, start_batch=len(train) - 1, device="cpu", prefetch=1))
    assert no == len(train) - 1 and b.tokens.device.type == "cpu"
    _assert_batches_equal(b, train.assemble(train.epoch_batches(0)[-1], mask_prob=0.15, mask_seed=(7, 0, no)))


def test_shuffled_lines_are_the_basket_in_another_order_with_their_own_prices(cache):
    """``shuffle_lines``: each row holds exactly its basket's lines, each with its own price features, in a
    seeded random order (the same for the same mask seed); most baskets of ≥ 3 lines change order."""
    plain = BatchAssembler(cache, "train", batch_size=64, shuffle=False)
    shuffled = BatchAssembler(cache, "train", batch_size=64, shuffle=False, shuffle_lines=True)
    rows = np.arange(64)
    a = plain.assemble(rows, mask_prob=0.0, mask_seed=(3,))
    b = shuffled.assemble(rows, mask_prob=0.0, mask_seed=(3,))
    again = shuffled.assemble(rows, mask_prob=0.0, mask_seed=(3,))
    other = shuffled.assemble(rows, mask_prob=0.0, mask_seed=(4,))
    _assert_batches_equal(b, again)
    assert not torch.equal(b.tokens, other.tokens)
    lengths = b.attention_mask.sum(1)
    moved = 0
    for i in range(len(rows)):
        n = int(lengths[i])
        pairs_a = sorted((int(t), tuple(p.tolist())) for t, p in zip(a.tokens[i, :n], a.price[i, :n]))
        pairs_b = sorted((int(t), tuple(p.tolist())) for t, p in zip(b.tokens[i, :n], b.price[i, :n]))
        assert pairs_a == pairs_b, i  # the same lines, each with its own price
        assert torch.equal(b.tokens[i, n:], a.tokens[i, n:])  # padding stays padding
        moved += n >= 3 and not torch.equal(a.tokens[i, :n], b.tokens[i, :n])
    assert moved >= 0.5 * int((lengths >= 3).sum())
    for name in ("context", "history_tokens", "history_counts", "labels", "index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
