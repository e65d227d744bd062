"""The tables of the tensor cache fitted on the train split only (DESIGN §3).

:func:`fit_train_tables_streamed` fits every table (:class:`FittedTables`) from the train split read
in chunks (a few weeks of baskets at a time), in memory that grows with the products, stores and
customers, not with the lines; :func:`fit_train_tables` is the same fit on a train frame in memory.
The builder calls it once; the leakage check calls it again on the train split re-read from disk and
compares, so anything the builder fitted on other data shows up as a difference.

Each line-level table is split in two: a per-chunk count that adds up over chunks (product line
counts, co-occurrence counts ``Xᵀ X``, store × product line counts, value counts of log unit prices)
and a fit from the summed counts. Both entry points run the same code, so they agree bit for bit.

* vocabulary — PAD, MASK, UNK, then train products by descending train line count (ties by code);
* product embeddings — :mod:`~retailsim_pipeline.prep.embeddings`;
* product log price — log of the product's median train unit price (the price normaliser);
* store context [S, store_dim] — standardised train statistics and mean product embeddings; row 0 =
  not seen in train;
* product neighbours [V, k] — each product's most co-occurring products (cosine over train baskets);
* customer profile [C, customer_profile_dim] — the card and the home store's format; row 0 =
  anonymous or not seen in train. (What customers bought is point-in-time, :mod:`.history`.)
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from retailsim_pipeline.config import MASK, N_SPECIAL, PAD, SPECIAL_CODES, UNK, CacheConfig
from retailsim_pipeline.prep.embeddings import (
    build_product_embeddings_from_counts,
    CooccurrenceSum,
    product_sets,  # re-exported: callers import it from here
)
from retailsim_pipeline.prep.features import one_hot_exprs
from retailsim_pipeline.prep.schema import LIFESTAGE_CODES, PRICE_SENSITIVITY_CODES, STORE_FORMAT_CODES

_HOUR_BINS = (0, 10, 12, 14, 16, 18, 24)  # 6 bins: early, late morning, lunch, afternoon, after work, evening

#: Columns of the train baskets the store and customer tables read, one value per basket (no lists);
#: :func:`basket_columns` adds ``basket_spend``, the sum of the basket's line spend.
BASKET_COLUMNS: tuple[str, ...] = ("cust_code", "store_code", "store_format", "store_region", "week", "weekday",
                                   "hour", "n_lines", "cust_price_sensitivity", "cust_lifestage")

__all__ = ["BASKET_COLUMNS", "FittedTables", "basket_columns", "basket_csr", "build_customer_context",
           "build_product_log_price", "build_product_neighbours", "build_store_context", "build_vocabulary",
           "cooccurrence_similarity", "fit_train_tables", "fit_train_tables_streamed", "home_stores",
           "median_from_value_counts", "price_value_counts", "product_line_counts", "product_log_price_from_counts",
           "product_sets", "similarity_from_counts", "store_table", "store_line_counts", "vocabulary_from_counts"]


def _add_counts(total: pl.DataFrame, part: pl.DataFrame, count: str) -> pl.DataFrame:
    """``total`` plus ``part``: count frames keyed by every column but ``count`` (Int64), summed per key."""
    keys = [c for c in part.columns if c != count]
    return pl.concat([total, part]).group_by(keys).agg(pl.col(count).sum())


def product_line_counts(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Lines per product of some baskets: PROD_CODE (String), train_count (Int64), unordered. Additive
    over chunks of baskets (sum per PROD_CODE)."""
    return (
        frame.lazy().select(pl.col("products").explode().cast(pl.String).alias("PROD_CODE"))
        .group_by("PROD_CODE").agg(pl.len().cast(pl.Int64).alias("train_count"))
        .collect()
    )


def build_vocabulary(train: pl.LazyFrame, products: pl.DataFrame) -> pl.DataFrame:
    """PAD/MASK/UNK then train products by descending train line count (ties by code)."""
    return vocabulary_from_counts(product_line_counts(train), products)


def vocabulary_from_counts(counts: pl.DataFrame, products: pl.DataFrame) -> pl.DataFrame:
    """The vocabulary from the train split's :func:`product_line_counts` (summed over its chunks): PAD,
    MASK, UNK, then the products by descending train line count (ties by code), with their hierarchy
    from ``products``. Columns: token_id (Int32), PROD_CODE, train_count (UInt32), PROD_CODE_10…40."""
    counts = counts.sort(["train_count", "PROD_CODE"], descending=[True, False])
    hierarchy = products.with_columns(pl.col(c).cast(pl.String) for c in products.columns if c.startswith("PROD"))
    hierarchy = hierarchy.sort("first_week").unique("PROD_CODE", keep="first").drop("first_week", "last_week")
    vocab = counts.with_row_index("token_id", offset=N_SPECIAL).with_columns(pl.col("token_id").cast(pl.Int32))
    specials = pl.DataFrame(
        {"token_id": [PAD, MASK, UNK], "PROD_CODE": list(SPECIAL_CODES), "train_count": [0, 0, 0]},
        schema={"token_id": pl.Int32, "PROD_CODE": pl.String, "train_count": pl.UInt32},
    )
    return pl.concat([specials, vocab.with_columns(pl.col("train_count").cast(pl.UInt32))]).join(
        hierarchy, on="PROD_CODE", how="left", maintain_order="left"
    )


def basket_csr(frame: pl.DataFrame, vocab: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays of a split: offsets [N+1], tokens [L], unit prices [L], quantities [L]."""
    lengths = frame.get_column("products").list.len().to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    lines = frame.select(
        pl.col("products").explode().cast(pl.String).alias("PROD_CODE"),
        pl.col("spend").explode().alias("spend"),
        pl.col("quantity").explode().alias("quantity"),
    )
    mapping = vocab.filter(pl.col("token_id") >= N_SPECIAL).select("PROD_CODE", "token_id")
    lines = lines.join(mapping, on="PROD_CODE", how="left", maintain_order="left")
    tokens = lines.get_column("token_id").fill_null(UNK).to_numpy().astype(np.int32)
    q = lines.get_column("quantity").to_numpy()
    return offsets, tokens, _unit_price(lines), q.astype(np.int16)


def _unit_price(lines: pl.DataFrame) -> np.ndarray:
    """[L] float64 SPEND / max(QUANTITY, 1) of exploded lines (columns spend, quantity)."""
    return (lines.get_column("spend").to_numpy() / np.maximum(lines.get_column("quantity").to_numpy(), 1)
            ).astype(np.float64)


def _log_unit_price(unit_price: np.ndarray) -> np.ndarray:
    """log of the unit price, below £0.001 counted as £0.001: the values whose median is the price normaliser."""
    return np.log(np.maximum(unit_price, 1e-3))


def _numbered(frame: pl.DataFrame, *exprs: pl.Expr) -> np.ndarray:
    """Evaluate unnamed statistic expressions into a float64 matrix (one column each)."""
    return frame.select(e.alias(f"__stat{i}") for i, e in enumerate(exprs)).to_numpy().astype(np.float64)


#: Lines of a split read at a time by the counts over a whole split (:func:`basket_ranges`): a
#: memory-mapped split is never copied whole.
COUNT_CHUNK_LINES = 1 << 22


def basket_ranges(offsets: np.ndarray, max_lines: int | None = None) -> Iterator[tuple[int, int]]:
    """Consecutive basket ranges ``[lo, hi)`` of a token CSR, each of at most ``max_lines`` lines (or one
    basket, if longer; default :data:`COUNT_CHUNK_LINES`), covering every basket. Any CSR's rows work
    alike (e.g. customers over their baskets)."""
    max_lines = COUNT_CHUNK_LINES if max_lines is None else max_lines
    offsets = np.asarray(offsets)
    n, lo = len(offsets) - 1, 0
    while lo < n:
        hi = int(np.searchsorted(offsets, int(offsets[lo]) + max_lines, side="right")) - 1
        hi = min(n, max(hi, lo + 1))
        yield lo, hi
        lo = hi


def cooccurrence_similarity(offsets: np.ndarray, tokens: np.ndarray, vocab_size: int,
                            normalize: Literal["cosine", "count"] = "cosine") -> sp.csr_matrix:
    """[V, V] float64 CSR co-occurrence of the baskets given: C_ij, the baskets holding both i and j
    (``"count"``), or C_ij / sqrt(c_i c_j) with c_i the baskets holding i (``"cosine"``); diagonal and
    special tokens 0. The one definition of "co-occurrence": the item-kNN baseline and the model's
    co-occurrence path (cosine) read it. Counted :data:`COUNT_CHUNK_LINES` lines at a time (integer
    counts: exact in any order)."""
    counts = CooccurrenceSum(vocab_size)
    for lo, hi in basket_ranges(offsets):
        off = np.asarray(offsets[lo:hi + 1], dtype=np.int64)
        counts.add(off - off[0], tokens[off[0]:off[-1]])
    return similarity_from_counts(counts.csr(), normalize)


def similarity_from_counts(counts: sp.spmatrix, normalize: Literal["cosine", "count"] = "cosine") -> sp.csr_matrix:
    """:func:`cooccurrence_similarity` from the baskets' :func:`cooccurrence_counts` [V, V] (summed over
    chunks of baskets; the diagonal holds c_i). Reads ``counts``, never modifies it."""
    vocab_size = counts.shape[0]
    c = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    baskets_with = c.diagonal().copy()  # [V] c_i
    c.setdiag(0.0)
    c.eliminate_zeros()
    if normalize == "count":
        return c
    inv = np.divide(1.0, np.sqrt(baskets_with), out=np.zeros(vocab_size), where=baskets_with > 0)
    return (sp.diags(inv) @ c @ sp.diags(inv)).tocsr()


def build_product_neighbours(similarity: sp.csr_matrix, k: int, block_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Each product's ``k`` most co-occurring products from :func:`cooccurrence_similarity`: tokens
    [V, k] int32 (PAD-filled) and similarities [V, k] float32, most similar first (ties: smaller token).

    Rows are taken ``block_rows`` at a time as dense blocks (absent entries -inf): a partition finds
    each row's k-th largest value, and only the entries at or above it (ties included) are sorted.
    """
    csr = sp.csr_matrix(similarity, dtype=np.float64, copy=True)
    csr.sum_duplicates()
    n, width = csr.shape
    neighbours = np.full((n, k), PAD, dtype=np.int32)
    weights = np.zeros((n, k), dtype=np.float32)
    if k <= 0:
        return neighbours, weights
    for lo in range(0, n, block_rows):
        block = csr[lo:lo + block_rows]
        if not block.nnz:
            continue
        dense = np.full(block.shape, -np.inf)
        dense[np.repeat(np.arange(block.shape[0]), np.diff(block.indptr)), block.indices] = block.data
        if k < width:  # each row's k-th largest value (-inf: the row holds fewer than k entries)
            kth = -np.partition(-dense, k - 1, axis=1)[:, k - 1]
            hit = (dense >= kth[:, None]) & (dense > -np.inf)
        else:
            hit = dense > -np.inf
        r, c = np.nonzero(hit)  # row-major: columns ascending within a row
        v = dense[r, c]
        order = np.lexsort((c, -v, r))
        r, c, v = r[order], c[order], v[order]
        rank = np.arange(len(r)) - np.searchsorted(r, np.arange(block.shape[0]))[r]
        keep = rank < k
        neighbours[lo + r[keep], rank[keep]] = c[keep]
        weights[lo + r[keep], rank[keep]] = v[keep]
    return neighbours, weights


def _standardise(x: np.ndarray) -> np.ndarray:
    mean, std = x.mean(axis=0), x.std(axis=0)
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def _hour_bin_exprs(prefix: str) -> list[pl.Expr]:
    return [pl.col("hour").is_between(lo, hi - 1).cast(pl.Float32).mean().alias(f"{prefix}_h{lo}")
            for lo, hi in zip(_HOUR_BINS[:-1], _HOUR_BINS[1:])]


def _weekday_exprs(prefix: str) -> list[pl.Expr]:
    return [(pl.col("weekday") == d).cast(pl.Float32).mean().alias(f"{prefix}_wd{d}") for d in range(1, 8)]


def _mean_embedding(counts: sp.csr_matrix, emb: np.ndarray) -> np.ndarray:
    """Mean embedding of each row's lines, from its [n_rows, V] line counts: [n_rows, emb.shape[1]]
    (zero where a row has no lines)."""
    n_lines = np.asarray(counts.sum(axis=1)).ravel()
    return (counts @ emb) / np.maximum(n_lines, 1)[:, None]


def home_stores(train: pl.DataFrame) -> pl.DataFrame:
    """Each carded customer's most frequent train store (ties: the smallest code): cust_code, home_store."""
    return (
        train.filter(pl.col("cust_code").is_not_null())
        .group_by("cust_code", "store_code").len()
        .with_columns(pl.col("cust_code", "store_code").cast(pl.String))  # per pair, not per basket
        .sort(["cust_code", "len", "store_code"], descending=[False, True, False])
        .unique("cust_code", keep="first").rename({"store_code": "home_store"}).select("cust_code", "home_store")
    )


def build_customer_context(train: pl.DataFrame, stores: pl.DataFrame, config: CacheConfig
                           ) -> tuple[np.ndarray, pl.DataFrame]:
    """Customer profile [C, customer_profile_dim = 32] float32 (row 0 = anonymous or not seen in train)
    and its index (cust_code, row, home_store).

    Card price sensitivity (LA, MM, UM, XX, none) · lifestage (7 + none) · home-store format (4) ·
    known flag · anonymous/unknown flag · zero padding. Only what does not change with time: what a
    shopper bought, and when, reaches the model as of each basket
    (:mod:`~retailsim_pipeline.prep.history`, :func:`~retailsim_pipeline.prep.features.history_vector`,
    the trip context), never as a whole-train summary that would hold a train basket's own products
    and its future.
    """
    per_cust = (
        train.filter(pl.col("cust_code").is_not_null())
        .group_by("cust_code")
        .agg(pl.col("cust_price_sensitivity").last().cast(pl.String).alias("ps"),
             pl.col("cust_lifestage").last().cast(pl.String).alias("ls"))
        .with_columns(pl.col("cust_code").cast(pl.String))  # per customer, not per basket
        .sort("cust_code")
        .with_row_index("row", offset=1)
        .join(home_stores(train), on="cust_code", how="left", maintain_order="left")
    )
    n = per_cust.height + 1
    profile = per_cust.select(
        *one_hot_exprs("ps", PRICE_SENSITIVITY_CODES, "ps"), pl.col("ps").is_null().cast(pl.Float32),
        *one_hot_exprs("ls", LIFESTAGE_CODES, "ls"), pl.col("ls").is_null().cast(pl.Float32),
    ).to_numpy()
    home_format = (
        per_cust.select("home_store").join(stores.select("store_code", "store_format"), left_on="home_store",
                                           right_on="store_code", how="left", maintain_order="left")
        .select(*one_hot_exprs("store_format", STORE_FORMAT_CODES, "hf")).to_numpy()
    )
    width = profile.shape[1] + home_format.shape[1] + 2
    if config.customer_profile_dim < width:
        raise ValueError(f"customer_profile_dim = {config.customer_profile_dim}: the profile has {width} columns")
    ctx = np.zeros((n, config.customer_profile_dim), dtype=np.float32)
    ctx[1:, :profile.shape[1]] = profile
    ctx[1:, profile.shape[1]: profile.shape[1] + 4] = home_format
    ctx[1:, profile.shape[1] + 4] = 1.0  # known customer
    ctx[0, profile.shape[1] + 5] = 1.0  # the anonymous/unknown row has its own flag
    index = per_cust.select("cust_code", pl.col("row").cast(pl.Int32), "home_store")
    return ctx, index


def basket_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """The basket-level columns of some baskets: :data:`BASKET_COLUMNS` and ``basket_spend`` (Float64,
    the sum of the basket's line spend), one row per basket in ``frame``'s order, no lists (~35 bytes a
    basket), so the whole train split's fit in memory while its lines are read a chunk at a time. The
    store and customer tables read only these."""
    return frame.select(*BASKET_COLUMNS, pl.col("spend").list.sum().alias("basket_spend"))


def store_table(baskets: pl.DataFrame) -> pl.DataFrame:
    """The store index :func:`build_store_context` returns — store_code (String, sorted), row (Int32, from
    1), store_format (String, of the store's first basket) — from the basket-level columns alone."""
    return (
        baskets.group_by("store_code").agg(pl.col("store_format").first().cast(pl.String))
        .with_columns(pl.col("store_code").cast(pl.String)).sort("store_code")
        .with_row_index("row", offset=1).select("store_code", pl.col("row").cast(pl.Int32), "store_format")
    )


def store_line_counts(frame: pl.DataFrame, offsets: np.ndarray, tokens: np.ndarray, stores: pl.DataFrame,
                      vocab_size: int) -> sp.csr_matrix:
    """[S, V] int64 CSR (canonical): the lines of each token in each store's baskets, S = ``stores.height``
    + 1 with rows from :func:`store_table` (a store not in ``stores`` counts in row 0). ``(offsets [n + 1],
    tokens)`` are ``frame``'s baskets under the vocabulary (:func:`basket_csr`). Additive over chunks."""
    row = (
        frame.select(pl.col("store_code").cast(pl.String))
        .join(stores.select("store_code", "row"), on="store_code", how="left", maintain_order="left")
        .get_column("row").fill_null(0).to_numpy().astype(np.int64)
    )
    lines = np.repeat(row, np.diff(offsets))
    counts = sp.csr_matrix((np.ones(len(lines), np.int64), (lines, np.asarray(tokens, dtype=np.int64))),
                           shape=(stores.height + 1, vocab_size))
    counts.sum_duplicates()
    return counts


def build_store_context(
    baskets: pl.DataFrame, store_lines: sp.spmatrix, emb: np.ndarray, config: CacheConfig
) -> tuple[np.ndarray, pl.DataFrame]:
    """Store context [S, 96] float32 (row 0 = store not seen in train) and its index.

    ``baskets``: the train baskets' :func:`basket_columns`; ``store_lines`` [S, V]: their lines per store
    and token (:func:`store_line_counts`, summed over chunks; rows as :func:`store_table`), read only.

    Format one-hot (4) · region one-hot over the train regions sorted, folded into 16 · 18
    standardised statistics: log baskets per week, log mean lines and spend, anonymous share,
    weekday (7) and hour (6) mix, log distinct products, log distinct customers · mean product
    embedding of the store's lines, first 56 dims · zero padding to 96.
    """
    per_store = (
        baskets.group_by("store_code")
        .agg(
            pl.col("store_format").first().cast(pl.String),
            pl.col("store_region").first().cast(pl.String),
            (pl.len() / pl.col("week").n_unique()).alias("baskets_per_week"),
            pl.col("n_lines").mean().alias("mean_lines"),
            pl.col("basket_spend").mean().alias("mean_spend"),
            pl.col("cust_code").is_null().mean().alias("anonymous_share"),
            *_weekday_exprs("s"),
            *_hour_bin_exprs("s"),
            pl.col("cust_code").n_unique().alias("distinct_customers"),
        )
        .with_columns(pl.col("store_code").cast(pl.String))  # per store, not per basket
        .sort("store_code")  # the order of store_table
        .with_row_index("row", offset=1)
    )
    n = per_store.height + 1
    if store_lines.shape != (n, emb.shape[0]):
        raise ValueError(f"store line counts of shape {store_lines.shape}: the train baskets have {n - 1} stores and "
                         f"the embeddings {emb.shape[0]} tokens, expected ({n}, {emb.shape[0]})")
    lines = sp.csr_matrix(store_lines, dtype=np.float32, copy=True)  # [S, V]
    lines.sum_duplicates()
    lines.eliminate_zeros()
    per_store = per_store.with_columns(pl.Series("distinct_products", np.diff(lines.indptr)[1:]))
    ctx = np.zeros((n, config.store_dim), dtype=np.float32)
    ctx[1:, :4] = per_store.select(*one_hot_exprs("store_format", STORE_FORMAT_CODES, "f")).to_numpy()
    regions = sorted(per_store.get_column("store_region").unique().to_list())
    region_idx = per_store.get_column("store_region").replace_strict(
        {r: i % 16 for i, r in enumerate(regions)}, return_dtype=pl.Int64).to_numpy()
    ctx[np.arange(1, n), 4 + region_idx] = 1.0
    stats = _numbered(per_store,
        pl.col("baskets_per_week").log1p(), pl.col("mean_lines").log1p(), pl.col("mean_spend").log1p(),
        pl.col("anonymous_share"), *[pl.col(f"s_wd{d}") for d in range(1, 8)],
        *[pl.col(f"s_h{lo}") for lo in _HOUR_BINS[:-1]],
        pl.col("distinct_products").log1p(), pl.col("distinct_customers").log1p(),
    )
    ctx[1:, 20: 20 + stats.shape[1]] = _standardise(stats)
    e0 = 20 + stats.shape[1]
    width = min(56, config.store_dim - e0)
    ctx[:, e0: e0 + width] = _mean_embedding(lines, emb[:, :width])
    ctx[0, e0: e0 + width] = 0.0
    index = per_store.select("store_code", pl.col("row").cast(pl.Int32), "store_format")
    return ctx, index


def price_value_counts(tokens: np.ndarray, unit_price: np.ndarray) -> pl.DataFrame:
    """Value counts of the lines' log unit price per token: token (Int32), log_price (Float64), lines
    (Int64), unordered. Unit prices below £0.001 count as £0.001. Additive over chunks (sum per token and
    log_price); prices take few distinct values per product, so the counts grow with products, not lines."""
    return (
        pl.DataFrame({"token": np.asarray(tokens), "log_price": _log_unit_price(unit_price)})
        .group_by(pl.col("token").cast(pl.Int32), "log_price").agg(pl.len().cast(pl.Int64).alias("lines"))
    )


def median_from_value_counts(values: np.ndarray, counts: np.ndarray, starts: np.ndarray,
                             like: Literal["polars", "numpy"] = "polars") -> np.ndarray:
    """Median of each group of a weighted sample, [len(starts)] float64: a group is the run of rows from
    one of ``starts`` to the next, sorted by value, and a row stands for ``counts`` (≥ 1) copies of its
    value. Bit for bit the median of the copies as ``like`` computes it: the middle value of an odd
    count, else from the two middle values ``lower ≤ upper``, ``lower + (upper - lower) * 0.5`` (polars'
    ``median()``, a linear interpolation) or ``(lower + upper) / 2`` (numpy's, a mean); the two differ in
    the last bit for some pairs."""
    cum = np.cumsum(counts)  # copies up to and including each row
    before = cum[starts] - counts[starts]  # copies before each group
    n = np.diff(np.append(before, cum[-1] if len(cum) else 0))
    lower = values[np.searchsorted(cum, before + (n - 1) // 2, side="right")]  # the ((n - 1) // 2)-th from 0
    upper = values[np.searchsorted(cum, before + n // 2, side="right")]  # the (n // 2)-th: lower when n is odd
    return lower + (upper - lower) * 0.5 if like == "polars" else (lower + upper) / 2


def product_log_price_from_counts(counts: pl.DataFrame, vocab_size: int) -> np.ndarray:
    """:func:`build_product_log_price` from the train lines' :func:`price_value_counts` (summed over
    chunks): [V] float32, bit for bit the median of the lines' values as polars (per token) and numpy (over
    all lines, for the tokens without a line) compute it on the lines themselves."""
    if counts.is_empty():
        return np.zeros(vocab_size, np.float32)
    by_token = counts.sort("token", "log_price")
    token = by_token.get_column("token").to_numpy()
    starts = np.flatnonzero(np.r_[True, token[1:] != token[:-1]])
    per_token = median_from_value_counts(by_token.get_column("log_price").to_numpy(),
                                         by_token.get_column("lines").to_numpy(), starts)
    overall = counts.group_by("log_price").agg(pl.col("lines").sum()).sort("log_price")
    all_lines = median_from_value_counts(overall.get_column("log_price").to_numpy(),
                                         overall.get_column("lines").to_numpy(), np.zeros(1, np.int64), like="numpy")
    out = np.full(vocab_size, all_lines[0], np.float32)
    out[token[starts]] = per_token
    return out


def build_product_log_price(tokens: np.ndarray, unit_price: np.ndarray, vocab_size: int) -> np.ndarray:
    """Log of each token's median train unit price: [V] float32 (tokens without a line, UNK among them:
    the median over all lines). Unit prices below £0.001 count as £0.001."""
    return product_log_price_from_counts(price_value_counts(tokens, unit_price), vocab_size)


@dataclass(frozen=True)
class FittedTables:
    """Every table of the cache fitted on the train split (shapes: V products, C customers, S stores)."""

    vocabulary: pl.DataFrame  # V rows: token_id, PROD_CODE, train_count, hierarchy
    product_embeddings: np.ndarray  # [V, product_dim] float32
    product_log_price: np.ndarray  # [V] float32
    customer_context: np.ndarray  # [C, customer_profile_dim] float32: the profile
    customers: pl.DataFrame  # C - 1 rows: cust_code, row, home_store
    store_context: np.ndarray  # [S, store_dim] float32
    stores: pl.DataFrame  # S - 1 rows: store_code, row, store_format
    product_neighbours: np.ndarray  # [V, cooccurrence_neighbours] int32
    product_neighbour_weights: np.ndarray  # [V, cooccurrence_neighbours] float32
    #: The train split under the vocabulary (offsets, tokens, unit prices, quantities): not a table,
    #: handed back by :func:`fit_train_tables` so the builder does not compute it twice; None from
    #: :func:`fit_train_tables_streamed`, which never holds the split's lines.
    train_csr: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


def fit_train_tables(train: pl.DataFrame, products: pl.DataFrame, config: CacheConfig) -> FittedTables:
    """Fit every table on ``train`` (the train split's basket samples) and ``products`` (hierarchy):
    :func:`fit_train_tables_streamed` with ``train`` as the one chunk, and ``train_csr`` set."""
    return _fit(lambda: iter([train]), products, config, keep_csr=True)


def fit_train_tables_streamed(train_chunks: Callable[[], Iterable[pl.DataFrame]], products: pl.DataFrame,
                              config: CacheConfig) -> FittedTables:
    """Fit every table on the train split read in chunks, and ``products`` (hierarchy).

    ``train_chunks()`` returns a fresh iterable over the train split's basket samples (the columns of
    :mod:`~retailsim_pipeline.prep.samples`), split into frames of whole baskets (e.g. a few weeks each)
    whose concatenation in order is the split; it is called exactly twice (product line counts, then
    the lines under the vocabulary) and must yield the same baskets each time (else ValueError).

    The result equals :func:`fit_train_tables` on the concatenated split, bit for bit, except
    ``train_csr`` = None. Held across chunks: the basket-level columns (:func:`basket_columns`, one row
    a basket) and counts bounded by products V, stores S and customers: product line counts [V],
    co-occurrence counts [V, V], store × product line counts [S, V], log unit price value counts per
    product. Peak memory beyond those: one chunk and its line-level arrays.
    """
    return _fit(train_chunks, products, config, keep_csr=False)


class TrainFit:
    """The fit of :func:`fit_train_tables_streamed` in the order the streamed cache builder needs it.

    1. :meth:`first_pass` over the train chunks: the product line counts (→ the vocabulary), the
       basket-level columns (→ the store and customer tables) and the log unit price value counts per
       product (→ the product log price). Everything a basket's arrays read is then known.
    2. :meth:`add_lines` for each train chunk under the vocabulary (the builder calls it with the CSR it
       computes for the chunk anyway, so the lines are read once): co-occurrence and store × product
       line counts.
    3. :meth:`finish`: the product embeddings, neighbours and store context (what no basket reads: the
       builder computes them beside the validation and test chunks).

    Held: the basket-level columns (~35 bytes a train basket) and counts bounded by products, stores and
    customers; never the split's lines.
    """

    def __init__(self, products: pl.DataFrame, config: CacheConfig):
        self.products, self.config = products, config

    def first_pass(self, chunks: Iterable[pl.DataFrame]) -> None:
        counts = pl.DataFrame(schema={"PROD_CODE": pl.String, "train_count": pl.Int64})
        prices = pl.DataFrame(schema={"PROD_CODE": pl.String, "log_price": pl.Float64, "lines": pl.Int64})
        basket_parts = []
        for chunk in chunks:
            counts = _add_counts(counts, product_line_counts(chunk), "train_count")
            prices = _add_counts(prices, _product_price_counts(chunk), "lines")
            basket_parts.append(basket_columns(chunk))
        if not basket_parts:
            raise ValueError("train_chunks() yielded no chunk: it must yield the train split's baskets, a frame of "
                             "a few weeks at a time")
        self.baskets = pl.concat(basket_parts, rechunk=True)  # one block: the same aggregates however cut
        self.n_lines = int(counts.get_column("train_count").sum())
        self.vocabulary = vocabulary_from_counts(counts, self.products)
        self.stores = store_table(self.baskets)
        self.customer_context, self.customers = build_customer_context(self.baskets, self.stores, self.config)
        token_prices = (prices.join(self.vocabulary.select("PROD_CODE", "token_id"), on="PROD_CODE", how="inner")
                        .select(pl.col("token_id").cast(pl.Int32).alias("token"), "log_price", "lines"))
        self.product_log_price = product_log_price_from_counts(token_prices, self.vocabulary.height)
        v = self.vocabulary.height
        self._cooc = CooccurrenceSum(v)  # [V, V] baskets holding both
        self._store_lines = sp.csr_matrix((self.stores.height + 1, v), dtype=np.int64)  # [S, V]
        self._seen = (0, 0)

    def add_lines(self, chunk: pl.DataFrame, offsets: np.ndarray, tokens: np.ndarray) -> None:
        """Count a train chunk's lines: ``(offsets, tokens)`` its :func:`basket_csr` under the vocabulary."""
        v = self.vocabulary.height
        self._cooc.add(offsets, tokens)
        self._store_lines = self._store_lines + store_line_counts(chunk, offsets, tokens, self.stores, v)
        self._seen = (self._seen[0] + len(offsets) - 1, self._seen[1] + len(tokens))

    def finish(self) -> FittedTables:
        if self._seen != (self.baskets.height, self.n_lines):
            raise ValueError(f"the train chunks gave {self.baskets.height:,} baskets and {self.n_lines:,} lines in "
                             f"the first pass and {self._seen[0]:,} and {self._seen[1]:,} to add_lines: train_chunks() "
                             "must return a fresh iterator over the same chunks on every call, and add_lines see every "
                             "chunk")
        cooc = self._cooc.csr()
        emb = build_product_embeddings_from_counts(cooc, self.vocabulary, self.config)
        store_ctx, stores = build_store_context(self.baskets, self._store_lines, emb, self.config)
        if not stores.equals(self.stores):
            raise AssertionError("store_table and build_store_context number the stores differently")
        neighbours, weights = build_product_neighbours(similarity_from_counts(cooc),
                                                       self.config.cooccurrence_neighbours)
        return FittedTables(self.vocabulary, emb, self.product_log_price, self.customer_context, self.customers,
                            store_ctx, self.stores, neighbours, weights)


def _product_price_counts(chunk: pl.DataFrame) -> pl.DataFrame:
    """:func:`price_value_counts` keyed by PROD_CODE (String), before the vocabulary exists: the same unit
    prices and logs as :func:`basket_csr` and :func:`price_value_counts` (the same functions), so the
    medians are bit for bit the same."""
    lines = chunk.select(pl.col("products").explode().alias("PROD_CODE"), pl.col("spend").explode(),
                         pl.col("quantity").explode())
    log_unit = _log_unit_price(_unit_price(lines))
    return (pl.DataFrame({"PROD_CODE": lines.get_column("PROD_CODE"), "log_price": log_unit})
            .group_by("PROD_CODE", "log_price").agg(pl.len().cast(pl.Int64).alias("lines"))
            .with_columns(pl.col("PROD_CODE").cast(pl.String)))


def _fit(train_chunks: Callable[[], Iterable[pl.DataFrame]], products: pl.DataFrame, config: CacheConfig,
         keep_csr: bool) -> FittedTables:
    """:func:`fit_train_tables_streamed`, with ``train_csr`` the chunks' :func:`basket_csr` joined when
    ``keep_csr`` (the one-shot fit: one chunk, already in memory)."""
    fit = TrainFit(products, config)
    fit.first_pass(train_chunks())
    csr_parts = []
    for chunk in train_chunks():
        csr = basket_csr(chunk, fit.vocabulary)
        fit.add_lines(chunk, csr[0], csr[1])
        if keep_csr:
            csr_parts.append(csr)
    tables = fit.finish()
    return dataclasses.replace(tables, train_csr=_concat_csr(csr_parts)) if keep_csr else tables


def _concat_csr(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One CSR ``(offsets, tokens, unit prices, quantities)`` of consecutive chunks' :func:`basket_csr`."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([np.diff(p[0]) for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, *(np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
