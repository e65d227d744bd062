"""prep/history.py against brute force on small random data: the customer sequence, the point-in-time
memory (for any chunking) and the as-of history."""

import datetime
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from retailsim_pipeline.config import N_SPECIAL, PAD
from retailsim_pipeline.prep.history import (
    AsOfHistory,
    Memory,
    MemoryState,
    SequenceState,
    customer_sequence,
    gather_baskets,
    point_in_time_memory,
)

VOCAB = 15  # tokens 0..14: PAD, MASK, UNK and 12 products


def _random_baskets(seed: int, n_customers: int = 7, max_baskets: int = 12) -> SimpleNamespace:
    """Baskets of a few customers and some anonymous ones, rows in random order: customer_key,
    past_baskets (each customer's baskets numbered 0.. in time), CSR offsets and tokens (specials too,
    repeated products too)."""
    rng = np.random.default_rng(seed)
    key = np.concatenate([np.full(rng.integers(1, max_baskets + 1), c) for c in range(1, n_customers + 1)]
                         + [np.zeros(rng.integers(0, 5), np.int64)])
    past = np.zeros(len(key), np.int64)
    for c in range(1, n_customers + 1):
        past[key == c] = rng.permutation(int((key == c).sum()))
    order = rng.permutation(len(key))
    key, past = key[order], past[order]
    lengths = rng.integers(1, 7, len(key))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # Few products, so counts tie often and the tie rules matter.
    tokens = rng.integers(0, VOCAB, int(lengths.sum())).astype(np.int32)
    return SimpleNamespace(customer_key=key, past_baskets=past, offsets=offsets, tokens=tokens)


def _earlier(b: SimpleNamespace, i: int) -> list[int]:
    """Rows of the baskets of row i's customer strictly before it (none for an anonymous basket)."""
    if b.customer_key[i] == 0:
        return []
    return [j for j in range(len(b.customer_key))
            if b.customer_key[j] == b.customer_key[i] and b.past_baskets[j] < b.past_baskets[i]]


def _brute_memory(b: SimpleNamespace, k: int, decay: float = 0.97) -> tuple[np.ndarray, ...]:
    """tokens, counts, recency, decayed share: the definitions of history.Memory, basket by basket."""
    n = len(b.customer_key)
    out_tokens, out_counts = np.full((n, k), PAD, np.int32), np.zeros((n, k), np.uint16)
    out_recency, out_decayed = np.zeros((n, k), np.uint16), np.zeros((n, k), np.float64)
    for i in range(n):
        count, last, held = {}, {}, {}
        earlier = _earlier(b, i)
        for j in earlier:
            age = int(b.past_baskets[i]) - 1 - int(b.past_baskets[j])  # 0 = the previous basket
            for t in b.tokens[b.offsets[j]:b.offsets[j + 1]].tolist():
                if t >= N_SPECIAL:
                    count[t] = count.get(t, 0) + 1
                    last[t] = max(last.get(t, -1), int(b.past_baskets[j]))
            for t in {t for t in b.tokens[b.offsets[j]:b.offsets[j + 1]].tolist() if t >= N_SPECIAL}:
                held[t] = held.get(t, 0.0) + decay ** age
        total = sum(decay ** age for age in range(len(earlier)))
        top = sorted(count, key=lambda t: (-held[t], -count[t], -last[t], t))[:k]
        out_tokens[i, :len(top)] = top
        out_counts[i, :len(top)] = [count[t] for t in top]
        out_recency[i, :len(top)] = [int(b.past_baskets[i]) - 1 - last[t] for t in top]
        out_decayed[i, :len(top)] = [held[t] / total for t in top]
    return out_tokens, out_counts, out_recency, out_decayed


def _streamed(b: SimpleNamespace, k: int, decay: float, n_chunks: int, seed: int) -> Memory:
    """The memory of ``b`` through one :class:`MemoryState`, in ``n_chunks`` time-ordered chunks (cut
    along each basket's number among its customer's, rows shuffled inside a chunk)."""
    rng = np.random.default_rng(seed)
    time = np.lexsort((rng.random(len(b.customer_key)), b.past_baskets))  # interleaves the customers
    state = MemoryState(k, decay)
    out = Memory(*(np.zeros((len(b.customer_key), k), dtype) for dtype in (np.int32, np.uint16, np.uint16,
                                                                          np.float16)))
    for rows in np.array_split(time, n_chunks):
        rows = rng.permutation(rows)
        lengths = np.diff(b.offsets)[rows]
        lines = np.concatenate([np.arange(b.offsets[r], b.offsets[r + 1]) for r in rows]) if len(rows) else []
        part = state.advance(b.customer_key[rows], b.past_baskets[rows], np.r_[0, np.cumsum(lengths)],
                             b.tokens[np.asarray(lines, dtype=np.int64)])
        for dest, values in zip(out, part):
            dest[rows] = values
    return out


@pytest.mark.parametrize("n_chunks", [1, 3, 40])
@pytest.mark.parametrize("seed", range(4))
def test_point_in_time_memory_is_the_brute_force_top_k(seed, n_chunks):
    b = _random_baskets(seed)
    for k, decay in ((1, 0.97), (3, 1.0), (8, 0.5), (20, 0.97)):
        memory = point_in_time_memory(b.customer_key, b.past_baskets, b.offsets, b.tokens, k, decay=decay)
        streamed = _streamed(b, k, decay, n_chunks, seed)
        assert all(np.array_equal(a, s) for a, s in zip(memory, streamed)), (k, n_chunks)  # bit for bit
        want_tokens, want_counts, want_recency, want_decayed = _brute_memory(b, k, decay)
        assert memory.tokens.dtype == np.int32 and memory.counts.dtype == np.uint16
        assert memory.recency.dtype == np.uint16 and memory.decayed.dtype == np.float16
        assert np.array_equal(memory.tokens, want_tokens), k
        assert np.array_equal(memory.counts, want_counts), k
        assert np.array_equal(memory.recency, want_recency), k
        np.testing.assert_allclose(memory.decayed, want_decayed, rtol=1e-3, atol=0)  # float16
        assert ((memory.decayed > 0) == (memory.counts > 0)).all()
    first = (b.past_baskets == 0) | (b.customer_key == 0)
    assert first.any() and not any(a[first].any() for a in memory)  # nothing before: empty


def test_point_in_time_memory_refuses_a_decay_it_cannot_compute_exactly():
    b = _random_baskets(0)
    with pytest.raises(ValueError, match="decay must be in"):
        point_in_time_memory(b.customer_key, b.past_baskets, b.offsets, b.tokens, 4, decay=0.0)
    # A customer with 2,001 baskets: at decay 0.5, decay ** -2000 overflows.
    n = 2001
    with pytest.raises(ValueError, match="has 2001 baskets: the decayed share at decay 0.5 is exact over at most 865"):
        point_in_time_memory(np.ones(n, np.int64), np.arange(n), np.arange(n + 1),
                             np.where(np.isin(np.arange(n), [0, n - 1]), N_SPECIAL, N_SPECIAL + 1), 2, decay=0.5)


def test_point_in_time_memory_edge_cases():
    empty = point_in_time_memory(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64),
                                 np.zeros(0, np.int32), 4)
    assert all(a.shape == (0, 4) for a in empty)
    # Only anonymous baskets, or only special tokens: every memory is empty.
    b = _random_baskets(0)
    anonymous = point_in_time_memory(np.zeros_like(b.customer_key), np.zeros_like(b.past_baskets), b.offsets,
                                     b.tokens, 4)
    specials = point_in_time_memory(b.customer_key, b.past_baskets, b.offsets, b.tokens % N_SPECIAL, 4)
    for memory in (anonymous, specials):
        assert not any(a.any() for a in memory)
    # One product bought on every line of 3 baskets: counts 0, then the lines of the baskets before; it
    # is in every earlier basket (decayed share 1) and in the previous one (recency 0).
    tokens, counts, recency, decayed = point_in_time_memory(
        np.array([1, 1, 1]), np.array([2, 0, 1]), np.array([0, 2, 5, 6]), np.full(6, N_SPECIAL, np.int32), 2)
    assert counts[:, 0].tolist() == [4, 0, 3] and tokens[:, 0].tolist() == [N_SPECIAL, PAD, N_SPECIAL]
    assert recency[:, 0].tolist() == [0, 0, 0] and decayed[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert not counts[:, 1].any()


def test_customer_sequence_is_the_brute_force_count_of_earlier_baskets():
    rng = np.random.default_rng(3)
    n = 300
    codes = np.array([f"C{c:03d}" for c in rng.integers(0, 25, n)], dtype=object)
    codes[rng.random(n) < 0.2] = None  # anonymous
    start = datetime.date(2007, 1, 1)
    frame = pl.DataFrame({
        "basket_id": rng.permutation(10**6)[:n].astype(np.int64),
        "cust_code": codes.tolist(),
        "date": [start + datetime.timedelta(days=int(d)) for d in rng.integers(0, 20, n)],  # many ties
        "hour": rng.integers(8, 11, n).astype(np.int8),
    })
    seq = customer_sequence(frame)
    assert seq.select(frame.columns).equals(frame)  # same rows, same order
    assert seq.schema["customer_key"] == seq.schema["past_baskets"] == pl.Int32
    ranks = {c: i + 1 for i, c in enumerate(sorted(set(codes.tolist()) - {None}))}
    rows = frame.rows()
    for (bid, cust, date, hour), key, past in zip(rows, seq.get_column("customer_key"),
                                                  seq.get_column("past_baskets")):
        if cust is None:
            assert key == past == 0
            continue
        assert key == ranks[cust]
        assert past == sum(1 for b, c, d, h in rows if c == cust and (d, h, b) < (date, hour, bid))


def _splits(b: SimpleNamespace, cuts: tuple[int, ...]) -> list[SimpleNamespace]:
    """``b`` cut into consecutive row ranges, each a split of its own (CSR offsets rebased)."""
    out, bounds = [], [0, *cuts, len(b.customer_key)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        off = b.offsets[lo:hi + 1]
        out.append(SimpleNamespace(customer_key=b.customer_key[lo:hi], past_baskets=b.past_baskets[lo:hi],
                                   offsets=off - off[0], tokens=b.tokens[off[0]:off[-1]]))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_as_of_history_is_the_brute_force_over_earlier_baskets(seed):
    b = _random_baskets(seed)
    n = len(b.customer_key)
    history = AsOfHistory(_splits(b, (n // 3, n // 2)), VOCAB)
    counts = history.counts(b.customer_key, b.past_baskets).toarray()
    decay = 0.7
    sets = history.decayed_sets(b.customer_key, b.past_baskets, decay).toarray()
    for i in range(n):
        want_counts, want_sets, total = np.zeros(VOCAB), np.zeros(VOCAB), 0.0
        earlier = _earlier(b, i)
        for j in earlier:
            basket = [t for t in b.tokens[b.offsets[j]:b.offsets[j + 1]].tolist() if t >= N_SPECIAL]
            np.add.at(want_counts, basket, 1)
            weight = decay ** (len(earlier) - 1 - b.past_baskets[j])  # the latest earlier basket weighs 1
            want_sets[sorted(set(basket))] += weight
            total += weight
        assert np.array_equal(counts[i], want_counts), i
        np.testing.assert_allclose(sets[i], want_sets / total if total else want_sets, rtol=1e-12, atol=1e-12)
    # The memory is the top of these counts.
    tokens, top, _, decayed = point_in_time_memory(b.customer_key, b.past_baskets, b.offsets, b.tokens, VOCAB,
                                                   decay=decay)
    assert np.array_equal(np.sort(top, axis=1)[:, ::-1], -np.sort(-counts, axis=1).astype(np.uint16))
    # ... and its decayed shares are the decayed product sets' entries at the memory's products.
    rows = np.arange(len(tokens))[:, None]
    np.testing.assert_allclose(decayed, np.where(top > 0, sets[rows, tokens], 0.0), rtol=1e-3, atol=0)


def test_memory_state_refuses_chunks_out_of_time_order():
    b = _random_baskets(1)
    state = MemoryState(4)
    later = b.past_baskets > 0
    lengths = np.diff(b.offsets)[later]
    lines = np.concatenate([np.arange(b.offsets[r], b.offsets[r + 1]) for r in np.flatnonzero(later)])
    with pytest.raises(ValueError, match="each chunk must continue every customer's baskets in time order"):
        state.advance(b.customer_key[later], b.past_baskets[later], np.r_[0, np.cumsum(lengths)], b.tokens[lines])


def test_memory_state_pair_ids_are_stable_across_the_index_levels():
    """The pair table's index (a large sorted level and a recent one, merged when the recent one grows):
    a code keeps the id it got when first added, new codes get the next ids, a lookup of an unknown code
    without ``add`` raises; batches of every size exercise both levels and their merges."""
    rng = np.random.default_rng(3)
    state, known = MemoryState(4), {}
    levels_seen = set()
    for size in [50, 3, 1, 200, 7, 7, 30, 1000, 2, 60, 5, 400]:
        codes = np.unique(rng.integers(1, 5000, size))
        ids = state._pair_ids(codes, add=True)
        for code, i in zip(codes.tolist(), ids.tolist()):
            assert known.setdefault(code, i) == i
        assert sorted(known.values()) == list(range(len(known))) and state.n_pairs == len(known)
        levels_seen.add(tuple(len(keys) > 0 for keys, _ in state._index))
        probe = np.array(sorted(rng.choice(list(known), 20)))
        assert state._pair_ids(np.unique(probe), add=False).tolist() == [known[c] for c in np.unique(probe).tolist()]
    assert (True, True) in levels_seen and (True, False) in levels_seen  # both levels used, and merged
    with pytest.raises(KeyError, match="not in the table"):
        state._pair_ids(np.array([5001]), add=False)


def test_sequence_state_streams_the_customer_sequence():
    rng = np.random.default_rng(5)
    n = 400
    codes = np.array([f"C{c:03d}" for c in rng.integers(0, 30, n)], dtype=object)
    codes[rng.random(n) < 0.2] = None
    start = datetime.date(2007, 1, 1)
    day = rng.integers(0, 21, n)
    frame = pl.DataFrame({"basket_id": rng.permutation(10**6)[:n].astype(np.int64), "cust_code": codes.tolist(),
                          "date": [start + datetime.timedelta(days=int(d)) for d in day],
                          "hour": rng.integers(8, 11, n).astype(np.int8)})
    want = customer_sequence(frame)
    state = SequenceState(frame.get_column("cust_code"))
    key, past = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for lo, hi in ((0, 7), (7, 8), (8, 15), (15, 21)):  # weeks-like chunks in time order, rows shuffled
        rows = rng.permutation(np.flatnonzero((day >= lo) & (day < hi)))
        key[rows], past[rows] = state.advance(frame[rows])
    assert np.array_equal(key, want.get_column("customer_key").to_numpy())
    assert np.array_equal(past, want.get_column("past_baskets").to_numpy())
    assert past.max() > 3 and state.n_customers == len(set(codes.tolist()) - {None})
    # A chunk earlier than what the state has seen is refused, by name.
    with pytest.raises(ValueError, match="of an earlier chunk: chunks must be in time order"):
        state.advance(frame.filter(pl.Series(day < 3) & pl.col("cust_code").is_not_null()))


def test_gather_baskets_reads_the_rows_asked_in_their_order_repeats_included():
    b = _random_baskets(3)
    rows = np.array([5, 0, 5, len(b.customer_key) - 1, 2])
    offsets, tokens = gather_baskets(b.offsets, b.tokens, rows)
    assert offsets.dtype == np.int64 and offsets[0] == 0 and len(offsets) == len(rows) + 1
    for i, r in enumerate(rows):
        assert tokens[offsets[i]:offsets[i + 1]].tolist() == b.tokens[b.offsets[r]:b.offsets[r + 1]].tolist()
    empty = gather_baskets(b.offsets, b.tokens, np.zeros(0, np.int64))
    assert empty[0].tolist() == [0] and len(empty[1]) == 0


def test_as_of_history_holds_no_line_of_the_splits(tmp_path):
    """The history reads memory-mapped splits in place: what it keeps is an index of one int32 per basket
    (and one start per customer), never the lines; the answers are those of the brute force."""
    b = _random_baskets(4)
    np.save(tmp_path / "tokens.npy", np.asarray(b.tokens))
    mapped = SimpleNamespace(customer_key=b.customer_key, past_baskets=b.past_baskets, offsets=b.offsets,
                             tokens=np.load(tmp_path / "tokens.npy", mmap_mode="r"))
    history = AsOfHistory([mapped], VOCAB)
    kept = [v for v in vars(history).values() if isinstance(v, np.ndarray)]
    assert sum(v.nbytes for v in kept) <= 4 * len(b.customer_key) + 8 * (b.customer_key.max() + 2) + 8 * 2
    counts = history.counts(b.customer_key, b.past_baskets).toarray()
    for i in range(len(b.customer_key)):
        want = np.zeros(VOCAB)
        for j in _earlier(b, i):
            np.add.at(want, [t for t in b.tokens[b.offsets[j]:b.offsets[j + 1]].tolist() if t >= N_SPECIAL], 1)
        assert np.array_equal(counts[i], want), i
