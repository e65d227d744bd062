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

Memory is bounded per basket (``k`` slots), and the computation runs over chunks of customers whose
intermediate rows (one per basket × product bought earlier) stay under ``chunk_rows``, so its peak
grows with the largest customer, not with the data.
"""

import logging
from typing import NamedTuple

import numpy as np
import polars as pl
import scipy.sparse as sp

from retailsim_pipeline.config import MEMORY_DECAY, N_SPECIAL, PAD

log = logging.getLogger(__name__)

#: Rows of the basket × earlier-product table one chunk may hold (~40 bytes each).
CHUNK_ROWS = 8_000_000
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


def point_in_time_memory(
    customer_key: np.ndarray, past_baskets: np.ndarray, offsets: np.ndarray, tokens: np.ndarray, k: int,
    *, decay: float = MEMORY_DECAY, chunk_rows: int = CHUNK_ROWS,
) -> Memory:
    """The ``k`` products of each basket's customer's history before it with the largest decayed share
    (:class:`Memory`: tokens, line counts, recency, decayed share), largest first (ties: more lines, the
    more recently bought, the smaller token). The decayed share of a product for a basket with ``j`` earlier baskets is
    ``Σ_{earlier baskets i holding it} decay ** (j - 1 - i) / Σ_{i < j} decay ** (j - 1 - i)``.

    ``customer_key`` [N], ``past_baskets`` [N] from :func:`customer_sequence`; ``offsets`` [N + 1] and
    ``tokens`` [L] the baskets' lines under the train vocabulary (special tokens, UNK among them, never
    enter a memory). Anonymous baskets (key 0) and first baskets get an empty memory.
    """
    customer_key = np.asarray(customer_key, dtype=np.int64)
    past_baskets = np.asarray(past_baskets, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(customer_key)
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    out = Memory(np.full((n, k), PAD, dtype=np.int32), np.zeros((n, k), dtype=np.uint16),
                 np.zeros((n, k), dtype=np.uint16), np.zeros((n, k), dtype=np.float16))
    if n == 0 or k == 0:
        return out
    log_decay = float(np.log(decay))
    line_basket = np.repeat(np.arange(n), np.diff(offsets))
    keep = (customer_key[line_basket] > 0) & (np.asarray(tokens) >= N_SPECIAL)
    # One row per (customer, product, basket) with the lines bought: an "event".
    events = (
        pl.DataFrame({"key": customer_key[line_basket[keep]], "token": np.asarray(tokens)[keep].astype(np.int64),
                      "seq": past_baskets[line_basket[keep]]})
        .group_by("key", "token", "seq").len("lines")
    )
    n_baskets = pl.DataFrame({"key": customer_key, "seq": past_baskets}).filter(pl.col("key") > 0) \
        .group_by("key").agg((pl.col("seq").max() + 1).alias("n_baskets"))
    # After an event at basket p, the count holds for the customer's baskets p + 1 .. (the next event of
    # the same product, inclusive; or the customer's last basket). ``held`` = Σ over the events e ≤ this one
    # of decay ** (p - p_e), as decay ** (p - p₀) · Σ decay ** -(p_e - p₀) from the product's first event p₀.
    rel = pl.col("seq") - pl.col("seq").first().over("key", "token")
    events = (
        events.sort("key", "token", "seq")
        .join(n_baskets, on="key", how="left")
        .with_columns(
            pl.col("lines").cum_sum().over("key", "token").alias("count"),
            pl.col("seq").shift(-1).over("key", "token").fill_null(pl.col("n_baskets") - 1).alias("until"),
            (rel.cast(pl.Float64) * -log_decay).alias("exponent"),
        )
        .with_columns(
            ((pl.col("exponent").exp().cum_sum().over("key", "token")) * (-pl.col("exponent")).exp()).alias("held"),
            (pl.col("until") - pl.col("seq")).alias("span"),
        )
        .filter(pl.col("span") > 0)
        .select("key", "token", "seq", "count", "held", "until", "span", "exponent")
    )
    widest = events.get_column("exponent").max()
    if widest is not None and widest > _MAX_EXPONENT:
        raise ValueError(f"a customer's purchases of one product span {widest / -log_decay:.0f} baskets: the decayed "
                         f"share at decay {decay} is exact over at most {_MAX_EXPONENT / -log_decay:.0f}; raise the "
                         f"decay")
    # Chunks of whole customers, each expanding to at most ~chunk_rows rows.
    per_key = events.group_by("key").agg(pl.col("span").sum()).sort("key")
    keys, spans = per_key.get_column("key").to_numpy(), per_key.get_column("span").to_numpy()
    bounds = _chunk_bounds(np.cumsum(spans), chunk_rows)
    # (key, seq) → basket row.
    basket_of = pl.DataFrame({"key": customer_key, "j": past_baskets, "row": np.arange(n)}) \
        .filter(pl.col("key") > 0)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunk = events.filter(pl.col("key").is_between(int(keys[lo]), int(keys[hi - 1])))
        expanded = (
            chunk.with_columns(pl.int_ranges(pl.col("seq") + 1, pl.col("until") + 1).alias("j"))
            .explode("j")
            .with_columns((pl.col("held") * ((pl.col("j") - 1 - pl.col("seq")).cast(pl.Float64) * log_decay).exp())
                          .alias("score"))
            .sort(["key", "j", "score", "count", "seq", "token"], descending=[False, False, True, True, True, False])
            .with_columns(pl.int_range(pl.len()).over("key", "j").alias("slot"))
            .filter(pl.col("slot") < k)
            .join(basket_of, on=["key", "j"], how="inner")
        )
        rows = expanded.get_column("row").to_numpy()
        slots = expanded.get_column("slot").to_numpy()
        j = expanded.get_column("j").to_numpy()
        age = j - 1 - expanded.get_column("seq").to_numpy()  # baskets since the last purchase
        out.tokens[rows, slots] = expanded.get_column("token").to_numpy()
        out.counts[rows, slots] = np.minimum(expanded.get_column("count").to_numpy(), MAX_COUNT)
        out.recency[rows, slots] = np.minimum(age, MAX_COUNT)
        score = expanded.get_column("score").to_numpy()  # Σ decay ** age over the baskets holding it
        total = j.astype(np.float64) if decay == 1.0 else -np.expm1(j * log_decay) / -np.expm1(log_decay)
        out.decayed[rows, slots] = np.minimum(score / total, 1.0)
    log.debug("point-in-time memory of %d baskets in %d chunk(s)", n, len(bounds) - 1)
    return out


def _chunk_bounds(cumulative: np.ndarray, limit: int) -> list[int]:
    """Split points over items with running totals ``cumulative`` so each chunk totals ≤ ``limit``
    (an item larger than ``limit`` gets a chunk of its own)."""
    bounds, start, base = [0], 0, 0
    while start < len(cumulative):
        stop = int(np.searchsorted(cumulative, base + limit, side="right"))
        stop = max(stop, start + 1)
        bounds.append(stop)
        base, start = int(cumulative[stop - 1]), stop
    return bounds


class AsOfHistory:
    """Every basket of a tensor cache's splits, indexed by customer and time, to answer "what had this
    customer bought before this basket?" for any scored basket — the as-of history the baselines and
    the evaluation's buckets read, with the same rule as the memory (strictly earlier baskets of the
    same ``customer_key``, any split).

    Baskets are sorted by (customer_key, past_baskets), so customer ``c``'s earlier baskets of a basket
    with ``past_baskets = p`` are the rows ``start[c] .. start[c] + p - 1`` of that order. ``lines``
    [N_all, V] counts each sorted basket's lines per product (special tokens dropped).
    """

    def __init__(self, splits: list, vocab_size: int):
        key = np.concatenate([np.asarray(s.customer_key, dtype=np.int64) for s in splits])
        past = np.concatenate([np.asarray(s.past_baskets, dtype=np.int64) for s in splits])
        lengths = np.concatenate([np.diff(np.asarray(s.offsets, dtype=np.int64)) for s in splits])
        tokens = np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in splits])
        order = np.lexsort((past, key))  # sorted position → basket (of the concatenation)
        self.vocab_size = vocab_size
        self.start = np.zeros(int(key.max(initial=0)) + 2, dtype=np.int64)  # [K + 1]: first sorted row per key
        np.add.at(self.start, key + 1, 1)
        self.start = np.cumsum(self.start)[:-1]
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        line_row = np.repeat(position, lengths)  # [L] sorted row of each line
        keep = (np.repeat(key, lengths) > 0) & (tokens >= N_SPECIAL)
        self.lines = sp.csr_matrix((np.ones(int(keep.sum()), np.float64), (line_row[keep], tokens[keep])),
                                   shape=(len(order), vocab_size))
        self.lines.sum_duplicates()
        self._sets = self.lines.copy()
        self._sets.data[:] = 1.0

    def mix(self, customer_key: np.ndarray, past_baskets: np.ndarray, decay: float = 1.0) -> sp.csr_matrix:
        """[n, N_all] weights over each scored basket's earlier baskets (anonymous: none). With ``decay``
        < 1 the i-th most recent earlier basket weighs ``decay ** i`` (1 for the latest)."""
        key = np.asarray(customer_key, dtype=np.int64)
        past = np.where(key > 0, np.asarray(past_baskets, dtype=np.int64), 0)
        rows = np.repeat(np.arange(len(key)), past)
        first = np.repeat(np.cumsum(past) - past, past)
        rank = np.arange(len(rows)) - first  # 0 = the oldest earlier basket
        cols = self.start[np.repeat(key, past)] + rank
        age = np.repeat(past, past) - 1 - rank  # 0 = the latest earlier basket
        weights = np.ones(len(rows)) if decay == 1.0 else np.power(float(decay), age)
        return sp.csr_matrix((weights, (rows, cols)), shape=(len(key), self.lines.shape[0]))

    def counts(self, customer_key: np.ndarray, past_baskets: np.ndarray) -> sp.csr_matrix:
        """[n, V] the customer's line counts per product over the baskets before each scored basket."""
        return (self.mix(customer_key, past_baskets) @ self.lines).tocsr()

    def decayed_sets(self, customer_key: np.ndarray, past_baskets: np.ndarray, decay: float) -> sp.csr_matrix:
        """[n, V] the time-decayed mean of the earlier baskets' product sets (entries in [0, 1]): basket
        i-th most recent weighs ``decay ** i``, weights normalised to sum to 1 (empty row: no history)."""
        mix = self.mix(customer_key, past_baskets, decay)
        total = np.asarray(mix.sum(axis=1)).ravel()
        inv = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
        return (sp.diags(inv) @ mix @ self._sets).tocsr()
