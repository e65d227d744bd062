"""Point-in-time customer history: what a shopper had bought *before* each basket (issue 11 §3).

The leakage rule of these features is "nothing at or after the basket's own time": a basket's history
uses every basket of the same customer strictly before it, in any split, ordered by (date, hour,
basket id) — the order :func:`~retailsim_pipeline.prep.features.trip_features` uses too. Fitted
*parameters* (the vocabulary that turns products into tokens among them) still come from train only.

* :func:`customer_sequence` — per basket: ``customer_key`` (1 + the customer's rank among every carded
  customer of every split; 0 = anonymous) and ``past_baskets`` (how many baskets that customer made
  before this one; 0 for anonymous baskets). A basket's history is exactly the baskets with the same
  key and a smaller ``past_baskets``.
* :func:`point_in_time_memory` — per basket, the ``k`` products of the customer's history before it
  with the largest time-decayed share of their baskets (the personal vector of TIFU-KNN; ties: more
  lines, the more recently bought, the smaller token) as ``[N, k]`` tokens, with their line counts,
  recency (baskets since each was last bought) and decayed share, PAD/0 where the history holds fewer
  products. Ordered by the decayed share, a regular's memory keeps what they buy *now*: on the real
  data's validation split the decayed share read from a memory ordered by line counts scored Recall@10
  0.2612, ordered by itself 0.2637 (= the complete history's).
* :class:`AsOfHistory` — the same history, complete (not truncated to ``k``), for any scored basket:
  line counts and time-decayed product sets over its customer's earlier baskets.

Memory is bounded per basket (``k`` slots), and :class:`MemoryState` computes it by a recurrence over
each customer's baskets in time order (the memory after a basket is the top ``k`` of the memory before it
and the basket's products), so its state grows with customers × the products they bought, not with
baskets, and the cache builder streams the baskets through it chunk by chunk.
"""

import logging
from typing import NamedTuple

import numpy as np
import polars as pl
import scipy.sparse as sp

from retailsim_pipeline.config import MEMORY_DECAY, N_SPECIAL, PAD

log = logging.getLogger(__name__)

#: Counts are stored as uint16: a customer's count of one product saturates at this value.
MAX_COUNT = np.iinfo(np.uint16).max
#: exp(-_MAX_EXPONENT) still is a normal float64: the decayed sums are exact below that span.
_MAX_EXPONENT = 600.0


class Memory(NamedTuple):
    """The point-in-time memory of N baskets, ``k`` slots each (PAD/0 in empty slots)."""

    tokens: np.ndarray  #: [N, k] int32 the products, largest decayed share first (ties: more lines, more
    #: recently bought, smaller token)
    counts: np.ndarray  #: [N, k] uint16 their line counts before the basket (saturating at MAX_COUNT)
    recency: np.ndarray  #: [N, k] uint16 baskets of the customer since the product was last bought
    #: (0 = in the customer's previous basket; saturating)
    decayed: np.ndarray  #: [N, k] float16 Σ over the earlier baskets holding it of decay ** age, divided
    #: by Σ over all earlier baskets of decay ** age (age 0 = the previous basket): in (0, 1]


def customer_sequence(baskets: pl.DataFrame) -> pl.DataFrame:
    """``baskets`` (one row per basket of every split: basket_id, cust_code, date, hour; any order) →
    the same rows in the same order with ``customer_key`` (int32) and ``past_baskets`` (int32) added."""
    key = pl.col("cust_code").cast(pl.String)
    ordered = (
        baskets.with_row_index("__row")
        .with_columns(key.rank("dense").fill_null(0).cast(pl.Int32).alias("customer_key"))
        .sort("customer_key", "date", "hour", "basket_id")
        .with_columns(
            pl.when(pl.col("customer_key") > 0)
            .then(pl.int_range(pl.len(), dtype=pl.Int32).over("customer_key"))
            .otherwise(0).cast(pl.Int32).alias("past_baskets")
        )
        .sort("__row")
    )
    return ordered.drop("__row")


class SequenceState:
    """:func:`customer_sequence` streamed: ``customer_key`` and ``past_baskets`` of baskets given in
    time-ordered chunks (every basket of a chunk after every basket of the same customer in earlier
    chunks, by (date, hour, basket id); rows in any order inside a chunk), equal to
    :func:`customer_sequence` over all of them at once.

    ``customer_codes``: every carded customer of every split (any order, duplicates allowed); a
    customer's key is 1 + its rank among them (byte order of the code). The state per customer: baskets
    seen and the (date, hour, basket id) of the latest, to refuse a chunk out of time order.
    """

    def __init__(self, customer_codes: pl.Series):
        codes = customer_codes.cast(pl.String).drop_nulls().unique().sort()
        self._keys = pl.DataFrame({"cust_code": codes, "customer_key": pl.int_range(1, len(codes) + 1,
                                                                                      dtype=pl.Int32, eager=True)})
        self.n_seen = np.zeros(len(codes) + 1, dtype=np.int64)
        self._latest = np.full((len(codes) + 1, 3), np.iinfo(np.int64).min, dtype=np.int64)  # date, hour, id

    @property
    def n_customers(self) -> int:
        return len(self.n_seen) - 1

    def advance(self, baskets: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``baskets`` (basket_id, cust_code, date, hour) → ``customer_key`` [n] int32, ``past_baskets`` [n]
        int32 in the same row order; the chunk then joins the state."""
        keyed = baskets.select(pl.col("cust_code").cast(pl.String), pl.col("date").cast(pl.Int32).alias("date"),
                               pl.col("hour").cast(pl.Int64), pl.col("basket_id").cast(pl.Int64)) \
            .join(self._keys, on="cust_code", how="left", maintain_order="left")
        unknown = keyed.filter(pl.col("cust_code").is_not_null() & pl.col("customer_key").is_null())
        if unknown.height:
            raise ValueError(f"customer {unknown.item(0, 'cust_code')!r} is not among the customer codes the "
                             "sequence was built with")
        key = keyed.get_column("customer_key").fill_null(0).to_numpy().astype(np.int64)
        when = keyed.select("date", "hour", "basket_id").to_numpy().astype(np.int64)  # [n, 3]
        past = np.zeros(len(key), dtype=np.int64)
        carded = np.flatnonzero(key > 0)
        if len(carded):
            order = carded[np.lexsort((when[carded, 2], when[carded, 1], when[carded, 0], key[carded]))]
            ks = key[order]
            position = np.arange(len(order))
            first = np.r_[True, ks[1:] != ks[:-1]]
            rank = position - np.maximum.accumulate(np.where(first, position, 0))
            head = order[first]  # each customer's earliest basket of the chunk
            before = self._latest[key[head]]
            earlier = _lex_less(when[head], before)
            if earlier.any():
                i = int(np.flatnonzero(earlier)[0])
                raise ValueError(
                    f"customer key {int(key[head][i])}: basket {int(when[head][i, 2])} (day {int(when[head][i, 0])}, "
                    f"hour {int(when[head][i, 1])}) comes before basket {int(before[i, 2])} (day {int(before[i, 0])}, "
                    f"hour {int(before[i, 1])}) of an earlier chunk: chunks must be in time order")
            past[order] = self.n_seen[ks] + rank
            last = np.r_[ks[1:] != ks[:-1], True]
            self._latest[ks[last]] = when[order[last]]
            self.n_seen += np.bincount(ks, minlength=len(self.n_seen))
        return key.astype(np.int32), past.astype(np.int32)


def _lex_less(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ``tuple(a[i]) <= tuple(b[i])`` over [n, 3] int64 rows (equal counts: a basket given twice)."""
    less = np.zeros(len(a), dtype=bool)
    equal = np.ones(len(a), dtype=bool)
    for c in range(a.shape[1]):
        less |= equal & (a[:, c] < b[:, c])
        equal &= a[:, c] == b[:, c]
    return less | equal


def point_in_time_memory(
    customer_key: np.ndarray, past_baskets: np.ndarray, offsets: np.ndarray, tokens: np.ndarray, k: int,
    *, decay: float = MEMORY_DECAY,
) -> Memory:
    """The ``k`` products of each basket's customer's history before it with the largest decayed share
    (:class:`Memory`: tokens, line counts, recency, decayed share), largest first (ties: more lines, the
    more recently bought, the smaller token). The decayed share of a product for a basket with ``j`` earlier
    baskets is ``Σ_{earlier baskets i holding it} decay ** (j - 1 - i) / Σ_{i < j} decay ** (j - 1 - i)``.

    ``customer_key`` [N], ``past_baskets`` [N] from :func:`customer_sequence` (rows in any order, every
    customer's baskets 0 .. n - 1 present); ``offsets`` [N + 1] and ``tokens`` [L] the baskets' lines under
    the train vocabulary (special tokens, UNK among them, never enter a memory). Anonymous baskets (key 0)
    and first baskets get an empty memory. One :class:`MemoryState` over all the baskets at once; the
    cache builder streams them through one state in time-ordered chunks and gets the same arrays.
    """
    return MemoryState(k, decay).advance(customer_key, past_baskets, offsets, tokens)


#: Bits of a token in a (customer, product) pair code ``key << _TOKEN_BITS | token``.
_TOKEN_BITS = 20
_TOKEN_MASK = (1 << _TOKEN_BITS) - 1
#: Tie-break fields packed into one int64 (count desc, last purchase desc, token asc).
_COUNT_CAP = (1 << 23) - 1
_LAST_CAP = (1 << 20) - 1
#: The tie key of an empty slot (no lines, last purchase 0, token PAD).
_EMPTY_TIE = (_COUNT_CAP << 40) | (_LAST_CAP << _TOKEN_BITS) | PAD


class MemoryState:
    """The point-in-time memory of every customer, advanced basket by basket in time order.

    A product's decayed share for a basket with ``j`` earlier baskets is ``G · decay ** (j - 1)`` over the
    decayed total, with ``G = Σ_{earlier baskets p holding it} decay ** -p``: ``G`` changes only when the
    product is bought, and only upwards, so a product outside a customer's top ``k`` can enter it only
    in a basket that holds it. The memory after a basket is therefore the top ``k`` of (the memory before
    it ∪ the basket's products, with their updated ``G``): one row sort of ``k`` + (products in the
    basket) entries per basket, whatever the length of the history. The state is

    * per customer: the ``k`` memory slots (``G`` and the tie key :func:`_tie`, which packs the token, the
      line count and the basket of the last purchase) and how many of its baskets were seen;
    * per (customer, product) ever bought: ``G``, line count, last purchase, whether it is in the memory
      now; stored by pair id (the order of first purchase: new pairs are appended, never inserted) and
      found by its pair code through :meth:`_pair_ids`,

    so it grows with customers × products they bought, never with baskets or lines. :meth:`advance` takes
    any chunk of baskets whose every customer's baskets continue where the previous chunk stopped
    (``past_baskets`` = the customer's baskets seen so far, then consecutive); rows in any order.
    ``G`` is exact in float64 while ``past_baskets · -log(decay) ≤ 600`` (19,700 baskets of one customer
    at the default decay 0.97).
    """

    def __init__(self, k: int, decay: float = MEMORY_DECAY):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.k, self.decay, self.log_decay = int(k), float(decay), float(np.log(decay))
        self._g = np.full((1, k), -np.inf)  # [K + 1, k] row = customer key, best first (empty: -inf)
        self._tie = np.full((1, k), _EMPTY_TIE, dtype=np.int64)  # [K + 1, k] the slots' _tie (token in it)
        self.n_seen = np.zeros(1, dtype=np.int64)  # [K + 1] baskets of each customer advanced so far
        # Per pair id, the first _n_pairs entries of each (the rest is spare capacity, zero).
        self._n_pairs = 0
        self._pair_g = np.zeros(0)
        self._pair_counts = np.zeros(0, dtype=np.int32)  # line counts (saturating in the output, not here)
        self._pair_last = np.zeros(0, dtype=np.int32)
        self._pair_in_memory = np.zeros(0, dtype=bool)  # the pair is in its customer's top k now
        # Pair code (key << _TOKEN_BITS | token) -> pair id: (sorted codes, their ids) in two levels, the
        # large one and the recent one, merged when the recent one outgrows a quarter of the large one.
        self._index = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)) for _ in range(2)]

    @property
    def n_pairs(self) -> int:
        """(customer, product) pairs bought so far: the size of the state beyond the ``k`` slots."""
        return self._n_pairs

    def _grow(self, max_key: int) -> None:
        n = len(self.n_seen)
        if max_key < n:
            return
        extra = max(max_key + 1, 2 * n) - n
        self._g = np.concatenate([self._g, np.full((extra, self.k), -np.inf)])
        self._tie = np.concatenate([self._tie, np.full((extra, self.k), _EMPTY_TIE, dtype=np.int64)])
        self.n_seen = np.concatenate([self.n_seen, np.zeros(extra, dtype=np.int64)])

    def memory_at(self, customer_key: np.ndarray, j: np.ndarray) -> Memory:
        """The memory of each customer's next basket, its ``j``-th (``j`` = baskets before it), from the
        state as it stands."""
        key, j = np.asarray(customer_key, dtype=np.int64), np.asarray(j, dtype=np.int64)
        tokens, slot_counts, last = _untie(self._tie[key])
        filled = tokens != PAD
        counts = np.where(filled, np.minimum(slot_counts, MAX_COUNT), 0).astype(np.uint16)
        recency = np.where(filled, np.minimum(j[:, None] - 1 - last, MAX_COUNT), 0).astype(np.uint16)
        scale = np.exp((j - 1).astype(np.float64) * self.log_decay)  # decay ** (j - 1)
        total = j.astype(np.float64) if self.decay == 1.0 else -np.expm1(j * self.log_decay) / -np.expm1(self.log_decay)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.minimum(self._g[key] * scale[:, None] / total[:, None], 1.0)
        decayed = np.where(filled, share, 0.0).astype(np.float16)
        return Memory(tokens, counts, recency, decayed)

    def advance(self, customer_key: np.ndarray, past_baskets: np.ndarray, offsets: np.ndarray,
                tokens: np.ndarray) -> Memory:
        """The memory of each basket of a chunk (``customer_key`` [n], ``past_baskets`` [n], CSR
        ``offsets`` [n + 1] and ``tokens`` [L]); then the chunk's baskets join the state."""
        key = np.asarray(customer_key, dtype=np.int64)
        past = np.asarray(past_baskets, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        n, k = len(key), self.k
        out = Memory(np.full((n, k), PAD, dtype=np.int32), np.zeros((n, k), dtype=np.uint16),
                     np.zeros((n, k), dtype=np.uint16), np.zeros((n, k), dtype=np.float16))
        carded = np.flatnonzero(key > 0)
        if k == 0 or len(carded) == 0:
            return out
        self._grow(int(key.max()))
        order = carded[np.lexsort((past[carded], key[carded]))]  # by customer, then in time
        ks = key[order]
        position = np.arange(len(order))
        first = np.r_[True, ks[1:] != ks[:-1]]
        rank = position - np.maximum.accumulate(np.where(first, position, 0))  # the basket's round in the chunk
        expected = self.n_seen[ks] + rank
        if not np.array_equal(past[order], expected):
            bad = int(np.flatnonzero(past[order] != expected)[0])
            raise ValueError(f"customer key {int(ks[bad])}: basket number {int(past[order][bad])} follows its "
                             f"{int(expected[bad])} earlier baskets: each chunk must continue every customer's "
                             "baskets in time order (0, 1, 2, ...), without gaps or repeats")
        top = int(past[order].max())
        if top * -self.log_decay > _MAX_EXPONENT or top > _LAST_CAP:
            raise ValueError(f"customer key {int(ks[past[order].argmax()])} has {top + 1} baskets: the decayed share "
                             f"at decay {self.decay} is exact over at most "
                             f"{min(_LAST_CAP, int(_MAX_EXPONENT / max(-self.log_decay, 1e-300)))} baskets of one "
                             "customer; raise the decay")
        # The chunk's (basket, product) entries with their line counts, carded baskets only.
        line_basket = np.repeat(np.arange(n), np.diff(offsets))
        keep = (key[line_basket] > 0) & (tokens >= N_SPECIAL)
        if keep.any() and int(tokens[keep].max()) > _TOKEN_MASK:
            raise ValueError(f"token {int(tokens[keep].max())} exceeds the memory's {_TOKEN_BITS}-bit token field")
        code, lines = _unique_counts((line_basket[keep] << _TOKEN_BITS) | tokens[keep])
        entry_basket, entry_token = code >> _TOKEN_BITS, code & _TOKEN_MASK
        pair = (key[entry_basket] << _TOKEN_BITS) | entry_token
        by_pair = np.argsort(pair, kind="stable")
        sorted_pairs = pair[by_pair]
        first = _run_starts(sorted_pairs)
        entry_pair = np.empty(len(pair), dtype=np.int64)  # the entry's pair id
        entry_pair[by_pair] = np.repeat(self._pair_ids(sorted_pairs[first], add=True),
                                        np.diff(np.r_[first, len(sorted_pairs)]))
        round_of = np.empty(n, dtype=np.int64)
        round_of[order] = rank
        by_round = np.argsort(round_of[entry_basket], kind="stable")  # entries by round, then basket, token
        entry_bounds = np.searchsorted(round_of[entry_basket][by_round], np.arange(int(rank.max()) + 2))
        by_rank = np.argsort(rank, kind="stable")
        basket_bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
        baskets_by_round = order[by_rank]
        for r in range(int(rank.max()) + 1):
            rows = baskets_by_round[basket_bounds[r]:basket_bounds[r + 1]]  # one basket per customer
            memory = self.memory_at(key[rows], past[rows])
            for dest, values in zip(out, memory):
                dest[rows] = values
            sel = by_round[entry_bounds[r]:entry_bounds[r + 1]]
            if len(sel):
                self._buy(entry_basket[sel], entry_token[sel], lines[sel], entry_pair[sel], key, past)
        self.n_seen += np.bincount(ks, minlength=len(self.n_seen))
        return out

    def _pair_ids(self, pairs: np.ndarray, add: bool) -> np.ndarray:
        """The pair ids of the pair codes ``pairs`` (sorted, unique); with ``add``, codes not seen yet get
        the next ids (their values zero), else every code must be known.

        A lookup is a binary search in each level of the index, with sorted needles (cache-friendly). New
        codes go into the recent level, so an insertion moves that level's entries, not the large one's
        (at full scale the table holds 10^8 pairs, and each chunk adds ~2·10^6)."""
        (keys, ids), (recent_keys, recent_ids) = self._index
        found = _find(keys, ids, pairs)
        miss = np.flatnonzero(found < 0)
        if not len(miss):
            return found
        at = np.searchsorted(recent_keys, pairs[miss])
        found[miss] = _find(recent_keys, recent_ids, pairs[miss], at)
        new = found[miss] < 0
        if not new.any():
            return found
        if not add:
            raise KeyError(f"MemoryState: pair code {int(pairs[miss[new][0]])} is not in the table")
        if self._n_pairs + int(new.sum()) > np.iinfo(np.int32).max:
            raise OverflowError("MemoryState: more than 2^31 (customer, product) pairs")
        new_ids = np.arange(self._n_pairs, self._n_pairs + int(new.sum()), dtype=np.int32)
        found[miss[new]] = new_ids
        self._reserve(self._n_pairs + len(new_ids))
        self._n_pairs += len(new_ids)
        recent_keys = np.insert(recent_keys, at[new], pairs[miss[new]])
        recent_ids = np.insert(recent_ids, at[new], new_ids)
        if 4 * len(recent_keys) > len(keys):
            where = np.searchsorted(keys, recent_keys)
            keys, ids = np.insert(keys, where, recent_keys), np.insert(ids, where, recent_ids)
            recent_keys, recent_ids = recent_keys[:0], recent_ids[:0]
        self._index = [(keys, ids), (recent_keys, recent_ids)]
        return found

    def _reserve(self, n: int) -> None:
        """Room for ``n`` pairs in the per-pair arrays (growing by a quarter: appends are amortized O(1),
        and the spare room at most a quarter of the table)."""
        if n <= len(self._pair_g):
            return
        size = max(n, len(self._pair_g) * 5 // 4)
        for name in ("_pair_g", "_pair_counts", "_pair_last", "_pair_in_memory"):
            old = getattr(self, name)
            grown = np.zeros(size, dtype=old.dtype)
            grown[:self._n_pairs] = old[:self._n_pairs]
            setattr(self, name, grown)

    def _buy(self, basket: np.ndarray, token: np.ndarray, lines: np.ndarray, pair: np.ndarray,
             key: np.ndarray, past: np.ndarray) -> None:
        """One round: each basket (at most one per customer, entries grouped by basket) buys its
        products; the pair table and the customers' top ``k`` follow.

        The new top ``k`` merges two sorted lists without sorting them together: the memory minus the
        products bought again (still in order: their ``G`` did not change) and the basket's products
        (a handful, sorted among themselves). A bought product's new slot is its rank among the basket's
        plus the memory items that stay and rank above it (a binary search in the sorted row); the
        memory items fill the other slots in their order. The pair table flags which pairs are in a
        memory, so a product bought again is found by a binary search for its old key."""
        k = self.k
        p = past[basket]
        in_memory = self._pair_in_memory[pair]
        old_g = self._pair_g[pair]
        old_tie = _tie(self._pair_counts[pair], self._pair_last[pair], token)
        self._pair_g[pair] += np.exp(p.astype(np.float64) * -self.log_decay)  # decay ** -p
        self._pair_counts[pair] += lines
        self._pair_last[pair] = p
        e_g, e_tie = self._pair_g[pair], _tie(self._pair_counts[pair], p, token)
        start = np.r_[True, basket[1:] != basket[:-1]]
        group = np.cumsum(start) - 1  # [E] the entry's customer among this round's
        cust = key[basket[start]]  # [m] distinct customers
        m = len(cust)
        mem_g, mem_tie = self._g[cust], self._tie[cust]  # [m, k], best first, PAD (G -inf) last
        mem_tokens = mem_tie & _TOKEN_MASK
        # Products of the memory bought again: found at their old key; their old slot goes.
        again = np.zeros((m, k), dtype=bool)
        hit = np.flatnonzero(in_memory)
        if len(hit):
            slot = _rank_in_rows(mem_g, mem_tie, group[hit], old_g[hit], old_tie[hit])
            if not np.array_equal(mem_tokens[group[hit], np.minimum(slot, k - 1)], token[hit]):
                raise RuntimeError("MemoryState: a pair flagged as in the memory is not where its key says")
            again[group[hit], slot] = True
        kept = (mem_tokens != PAD) & ~again
        above = _rank_in_rows(mem_g, mem_tie, group, e_g, e_tie)  # memory items above the entry, again ones too
        if len(hit):
            again_before = np.concatenate([np.zeros((m, 1), dtype=np.int64), np.cumsum(again, axis=1)], axis=1)
            above -= again_before[group, above]  # the kept items above the entry
        order = np.lexsort((e_tie, -e_g, group))  # the basket's entries: G desc, then the tie key
        first = _run_starts(group[order])
        e_rank = np.empty(len(order), dtype=np.int64)
        e_rank[order] = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
        e_slot = e_rank + above
        # The r-th kept item goes after r kept items and the entries with at most r kept items above them.
        entries_by = np.cumsum(np.bincount(group * (k + 1) + above, minlength=m * (k + 1)).reshape(m, k + 1), axis=1)
        kept_rank = np.cumsum(kept, axis=1) - 1
        k_slot = kept_rank + np.take_along_axis(entries_by, np.maximum(kept_rank, 0), axis=1)
        new_g = np.full(m * k, -np.inf)
        new_tie = np.full(m * k, _EMPTY_TIE, dtype=np.int64)
        placed = e_slot < k
        dst = group[placed] * k + e_slot[placed]
        new_g[dst], new_tie[dst] = e_g[placed], e_tie[placed]
        stays = kept & (k_slot < k)
        src = np.flatnonzero(stays)
        dst = (src // k) * k + k_slot.ravel()[src]
        new_g[dst], new_tie[dst] = mem_g.ravel()[src], mem_tie.ravel()[src]
        self._g[cust], self._tie[cust] = new_g.reshape(m, k), new_tie.reshape(m, k)
        self._pair_in_memory[pair] = placed
        pushed = np.flatnonzero(kept & (k_slot >= k))  # out of the memory now
        if len(pushed):
            out = (cust[pushed // k] << _TOKEN_BITS) | mem_tokens.ravel()[pushed]
            self._pair_in_memory[self._pair_ids(np.sort(out), add=False)] = False


def _unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct int64 ``values`` and how often each occurs (a radix sort: faster than np.unique's
    default on tens of millions of codes)."""
    ordered = np.sort(values, kind="stable")
    first = _run_starts(ordered)
    return ordered[first], np.diff(np.r_[first, len(ordered)])


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    """Positions where a sorted array's runs of equal values begin."""
    return np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(ordered) else np.zeros(0, np.int64)


def _find(keys: np.ndarray, ids: np.ndarray, needles: np.ndarray, at: np.ndarray | None = None) -> np.ndarray:
    """The ids of ``needles`` in one level of the pair index (``keys`` sorted, ``ids`` beside them), -1
    where absent; ``at``: ``np.searchsorted(keys, needles)`` if already known."""
    if not len(keys):
        return np.full(len(needles), -1, dtype=ids.dtype)
    at = np.searchsorted(keys, needles) if at is None else at
    at = np.minimum(at, len(keys) - 1)
    return np.where(keys[at] == needles, ids[at], -1)


def _rank_in_rows(g: np.ndarray, tie: np.ndarray, rows: np.ndarray, q_g: np.ndarray, q_tie: np.ndarray
                  ) -> np.ndarray:
    """For each query, how many items of its row of ``(g, tie)`` [m, k] — sorted best first (larger ``g``,
    then smaller ``tie``; empty slots, ``g = -inf``, last) — rank strictly above ``(q_g, q_tie)``: a
    vectorized binary search, ``log2(k)`` gathers per query."""
    k = g.shape[1]
    lo, hi = np.zeros(len(rows), dtype=np.int64), np.full(len(rows), k, dtype=np.int64)
    flat_g, flat_tie = g.ravel(), tie.ravel()
    base = rows * k
    for _ in range(max(1, int(k).bit_length())):
        mid = (lo + hi) >> 1
        at = base + np.minimum(mid, k - 1)
        item_g = flat_g[at]
        better = (item_g > q_g) | ((item_g == q_g) & (flat_tie[at] < q_tie))
        open_ = lo < hi
        lo = np.where(open_ & better, mid + 1, lo)
        hi = np.where(open_ & ~better, mid, hi)
    return lo


def _tie(counts: np.ndarray, last: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The memory's tie-break between products of equal ``G`` as one int64, smaller first: more lines, then
    bought more recently, then the smaller token."""
    counts, last = np.asarray(counts, dtype=np.int64), np.asarray(last, dtype=np.int64)
    return (((_COUNT_CAP - np.minimum(counts, _COUNT_CAP)) << 40) | ((_LAST_CAP - last) << _TOKEN_BITS)
            | tokens.astype(np.int64))


def _untie(tie: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_tie` unpacked: tokens (int32), line counts (capped at ``_COUNT_CAP``), last purchases."""
    return ((tie & _TOKEN_MASK).astype(np.int32), _COUNT_CAP - (tie >> 40),
            _LAST_CAP - ((tie >> _TOKEN_BITS) & _LAST_CAP))


def gather_baskets(offsets: np.ndarray, tokens: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR ``(offsets [n + 1], tokens)`` of the baskets at ``rows`` (any order, repeats allowed) of a
    token CSR, read from it in place: on a memory-mapped split only those baskets' pages are read."""
    rows = np.asarray(rows, dtype=np.int64)
    lo = np.asarray(offsets[rows], dtype=np.int64)
    length = np.asarray(offsets[rows + 1], dtype=np.int64) - lo
    out = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(length, out=out[1:])
    index = np.repeat(lo - out[:-1], length) + np.arange(int(out[-1]))
    return out, np.asarray(tokens[index], dtype=np.int64)


class AsOfHistory:
    """Every basket of a tensor cache's splits, indexed by customer and time, to answer "what had this
    customer bought before this basket?" for any scored basket — the as-of history the baselines and
    the evaluation's buckets read, with the same rule as the memory (strictly earlier baskets of the
    same ``customer_key``, any split).

    Baskets are sorted by (customer_key, past_baskets), so customer ``c``'s earlier baskets of a basket
    with ``past_baskets = p`` are the rows ``start[c] .. start[c] + p - 1`` of that order.

    Bounded memory: the splits' token arrays (memory-mapped in a tensor cache) are not copied. The
    index holds ``start`` [K + 2] and the sorted order as one int32 per basket (each basket's row in the
    splits laid end to end: 128 MB for the full-scale 32M baskets); a query gathers the lines of its
    earlier baskets, and only theirs, from the splits. The sums are the very sparse products of the
    complete ``[N_all, V]`` line matrix, restricted to the rows a query reads (in the same order), so
    the values are bit-identical to it.
    """

    def __init__(self, splits: list, vocab_size: int):
        key = np.concatenate([np.asarray(s.customer_key, dtype=np.int64) for s in splits])
        past = np.concatenate([np.asarray(s.past_baskets, dtype=np.int64) for s in splits])
        if len(key) >= 2**31:
            raise ValueError(f"{len(key):,} baskets: the as-of index numbers them in int32")
        self.vocab_size = vocab_size
        self._splits = splits
        self._bounds = np.cumsum([0, *(len(np.asarray(s.offsets)) - 1 for s in splits)])  # [S + 1] first row of each
        self.order = np.lexsort((past, key)).astype(np.int32)  # sorted position → basket (of the concatenation)
        del past
        self.start = np.zeros(int(key.max(initial=0)) + 2, dtype=np.int64)  # [K + 1]: first sorted row per key
        np.add.at(self.start, key + 1, 1)
        self.start = np.cumsum(self.start)[:-1]
        self.n_baskets = len(key)

    def held(self) -> np.ndarray:
        """[K + 1] the baskets of each customer key in the splits (key 0: anonymous)."""
        return np.diff(np.append(self.start, self.n_baskets))

    def mix(self, customer_key: np.ndarray, past_baskets: np.ndarray, decay: float = 1.0
            ) -> tuple[sp.csr_matrix, np.ndarray]:
        """``(weights, rows)``: [n, B] weights over each scored basket's earlier baskets (anonymous: none),
        column j standing for the sorted row ``rows[j]`` (ascending: the columns of the complete [n, N_all]
        mix that hold a weight, in their order). With ``decay`` < 1 the i-th most recent earlier basket
        weighs ``decay ** i`` (1 for the latest)."""
        key = np.asarray(customer_key, dtype=np.int64)
        past = np.where(key > 0, np.asarray(past_baskets, dtype=np.int64), 0)
        rows = np.repeat(np.arange(len(key)), past)
        first = np.repeat(np.cumsum(past) - past, past)
        rank = np.arange(len(rows)) - first  # 0 = the oldest earlier basket
        cols = self.start[np.repeat(key, past)] + rank
        age = np.repeat(past, past) - 1 - rank  # 0 = the latest earlier basket
        weights = np.ones(len(rows)) if decay == 1.0 else np.power(float(decay), age)
        used, local = np.unique(cols, return_inverse=True)
        return sp.csr_matrix((weights, (rows, local.reshape(-1))), shape=(len(key), len(used))), used

    def lines(self, sorted_rows: np.ndarray) -> sp.csr_matrix:
        """[B, V] float64 line counts per product of the baskets at these sorted rows (special tokens
        dropped; anonymous baskets are never an earlier basket), gathered from the splits."""
        basket = self.order[np.asarray(sorted_rows, dtype=np.int64)].astype(np.int64)
        split = np.searchsorted(self._bounds, basket, side="right") - 1
        line_row, tokens = [], []
        for s in np.unique(split):
            at = np.flatnonzero(split == s)
            split_s = self._splits[s]
            offsets, part = gather_baskets(split_s.offsets, split_s.tokens, basket[at] - self._bounds[s])
            line_row.append(np.repeat(at, np.diff(offsets)))
            tokens.append(part)
        line_row = np.concatenate(line_row) if line_row else np.zeros(0, np.int64)
        tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
        keep = tokens >= N_SPECIAL
        out = sp.csr_matrix((np.ones(int(keep.sum()), np.float64), (line_row[keep], tokens[keep])),
                            shape=(len(basket), self.vocab_size))
        out.sum_duplicates()
        return out

    def counts(self, customer_key: np.ndarray, past_baskets: np.ndarray) -> sp.csr_matrix:
        """[n, V] the customer's line counts per product over the baskets before each scored basket."""
        mix, rows = self.mix(customer_key, past_baskets)
        return (mix @ self.lines(rows)).tocsr()

    def decayed_sets(self, customer_key: np.ndarray, past_baskets: np.ndarray, decay: float) -> sp.csr_matrix:
        """[n, V] the time-decayed mean of the earlier baskets' product sets (entries in [0, 1]): basket
        i-th most recent weighs ``decay ** i``, weights normalised to sum to 1 (empty row: no history)."""
        mix, rows = self.mix(customer_key, past_baskets, decay)
        sets = self.lines(rows)
        sets.data[:] = 1.0
        total = np.asarray(mix.sum(axis=1)).ravel()
        inv = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
        return (sp.diags(inv) @ mix @ sets).tocsr()
