"""The tables of the tensor cache fitted on the train split only (DESIGN §3).

:func:`fit_train_tables` is the one entry point: it takes the train baskets and the product
dimension and returns every fitted table (:class:`FittedTables`). The builder calls it once; the
leakage check calls it again on the train split re-read from disk and compares, so anything the
builder fitted on other data shows up as a difference.

* vocabulary — PAD, MASK, UNK, then train products by descending train line count (ties by code);
* product embeddings — :mod:`~retailsim_pipeline.prep.embeddings`;
* product log price — log of the product's median train unit price (the price normaliser);
* store context [S, store_dim] — standardised train statistics and mean product embeddings; row 0 =
  not seen in train;
* product neighbours [V, k] — each product's most co-occurring products (cosine over train baskets);
* customer profile [C, customer_profile_dim] — the card and the home store's format; row 0 =
  anonymous or not seen in train. (What customers bought is point-in-time, :mod:`.history`.)
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from retailsim_pipeline.config import MASK, N_SPECIAL, PAD, SPECIAL_CODES, UNK, CacheConfig
from retailsim_pipeline.prep.embeddings import build_product_embeddings
from retailsim_pipeline.prep.features import one_hot_exprs
from retailsim_pipeline.prep.schema import LIFESTAGE_CODES, PRICE_SENSITIVITY_CODES, STORE_FORMAT_CODES

_HOUR_BINS = (0, 10, 12, 14, 16, 18, 24)  # 6 bins: early, late morning, lunch, afternoon, after work, evening


def build_vocabulary(train: pl.LazyFrame, products: pl.DataFrame) -> pl.DataFrame:
    """PAD/MASK/UNK then train products by descending train line count (ties by code)."""
    counts = (
        train.select(pl.col("products").explode().cast(pl.String).alias("PROD_CODE"))
        .group_by("PROD_CODE").len("train_count")
        .sort(["train_count", "PROD_CODE"], descending=[True, False])
        .collect()
    )
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
    unit = lines.get_column("spend").to_numpy() / np.maximum(q, 1)
    return offsets, tokens, unit.astype(np.float64), q.astype(np.int16)


def _numbered(frame: pl.DataFrame, *exprs: pl.Expr) -> np.ndarray:
    """Evaluate unnamed statistic expressions into a float64 matrix (one column each)."""
    return frame.select(e.alias(f"__stat{i}") for i, e in enumerate(exprs)).to_numpy().astype(np.float64)


def _count_matrix(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """[shape] float32 CSR counting each (row, col) pair (the constructor sums duplicates)."""
    counts = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    counts.sum_duplicates()
    return counts


def product_sets(offsets: np.ndarray, tokens: np.ndarray, vocab_size: int) -> sp.csr_matrix:
    """[n, V] 0/1 float64 CSR of a token CSR ``(offsets [n + 1], tokens)``: which products each row
    holds (a set: duplicates count once; special tokens dropped). Rows are baskets, or a position's
    visible items."""
    offsets = np.asarray(offsets, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    keep = tokens >= N_SPECIAL
    m = sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], tokens[keep])), shape=(len(offsets) - 1, vocab_size))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def cooccurrence_similarity(offsets: np.ndarray, tokens: np.ndarray, vocab_size: int,
                            normalize: Literal["cosine", "count"] = "cosine") -> sp.csr_matrix:
    """[V, V] float64 CSR co-occurrence of the baskets given: C_ij, the baskets holding both i and j
    (``"count"``), or C_ij / sqrt(c_i c_j) with c_i the baskets holding i (``"cosine"``); diagonal and
    special tokens 0. The one definition of "co-occurrence": the item-kNN baseline and the model's
    co-occurrence path (cosine) read it."""
    x = product_sets(offsets, tokens, vocab_size)  # [N, V] 0/1: a basket counts a product once
    c = (x.T @ x).tocsr()
    baskets_with = c.diagonal().copy()  # [V] c_i
    c.setdiag(0.0)
    c.eliminate_zeros()
    if normalize == "count":
        return c.astype(np.float64)
    inv = np.divide(1.0, np.sqrt(baskets_with), out=np.zeros(vocab_size), where=baskets_with > 0)
    return (sp.diags(inv) @ c @ sp.diags(inv)).tocsr()


def build_product_neighbours(similarity: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each product's ``k`` most co-occurring products from :func:`cooccurrence_similarity`: tokens
    [V, k] int32 (PAD-filled) and similarities [V, k] float32, most similar first (ties: smaller token)."""
    coo = similarity.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    r, c, v = coo.row[order], coo.col[order], coo.data[order]
    n = similarity.shape[0]
    rank = np.arange(len(r)) - np.searchsorted(r, np.arange(n))[r]
    keep = rank < k
    neighbours = np.full((n, k), PAD, dtype=np.int32)
    weights = np.zeros((n, k), dtype=np.float32)
    neighbours[r[keep], rank[keep]] = c[keep]
    weights[r[keep], rank[keep]] = v[keep]
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
        .group_by(pl.col("cust_code").cast(pl.String), pl.col("store_code").cast(pl.String)).len()
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
        .group_by(pl.col("cust_code").cast(pl.String))
        .agg(pl.col("cust_price_sensitivity").cast(pl.String).last().alias("ps"),
             pl.col("cust_lifestage").cast(pl.String).last().alias("ls"))
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


def build_store_context(
    train: pl.DataFrame, offsets: np.ndarray, tokens: np.ndarray, emb: np.ndarray, config: CacheConfig
) -> tuple[np.ndarray, pl.DataFrame]:
    """Store context [S, 96] float32 (row 0 = store not seen in train) and its index.

    Format one-hot (4) · region one-hot over the train regions sorted, folded into 16 · 18
    standardised statistics: log baskets per week, log mean lines and spend, anonymous share,
    weekday (7) and hour (6) mix, log distinct products, log distinct customers · mean product
    embedding of the store's lines, first 56 dims · zero padding to 96.
    """
    per_store = (
        train.with_columns(pl.col("spend").list.sum().alias("__spend"), pl.col("store_code").cast(pl.String),
                           pl.col("store_region").cast(pl.String))
        .group_by("store_code")
        .agg(
            pl.col("store_format").cast(pl.String).first(),
            pl.col("store_region").first(),
            (pl.len() / pl.col("week").n_unique()).alias("baskets_per_week"),
            pl.col("n_lines").mean().alias("mean_lines"),
            pl.col("__spend").mean().alias("mean_spend"),
            pl.col("cust_code").is_null().mean().alias("anonymous_share"),
            *_weekday_exprs("s"),
            *_hour_bin_exprs("s"),
            pl.col("products").explode().n_unique().alias("distinct_products"),
            pl.col("cust_code").n_unique().alias("distinct_customers"),
        )
        .sort("store_code")
        .with_row_index("row", offset=1)
    )
    n = per_store.height + 1
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
    store_row = (
        train.select(pl.col("store_code").cast(pl.String))
        .join(per_store.select("store_code", "row"), on="store_code", how="left", maintain_order="left")
        .get_column("row").to_numpy().astype(np.int64)
    )
    e0 = 20 + stats.shape[1]
    width = min(56, config.store_dim - e0)
    store_counts = _count_matrix(np.repeat(store_row, np.diff(offsets)), tokens, (n, emb.shape[0]))  # [S, V]
    ctx[:, e0: e0 + width] = _mean_embedding(store_counts, emb[:, :width])
    ctx[0, e0: e0 + width] = 0.0
    index = per_store.select("store_code", pl.col("row").cast(pl.Int32), "store_format")
    return ctx, index



def build_product_log_price(tokens: np.ndarray, unit_price: np.ndarray, vocab_size: int) -> np.ndarray:
    """Log of each token's median train unit price: [V] float32 (tokens without a line, UNK among them:
    the median over all lines). Unit prices below £0.001 count as £0.001."""
    log_unit = np.log(np.maximum(unit_price, 1e-3))
    med = pl.DataFrame({"t": tokens, "p": log_unit}).group_by("t").agg(pl.col("p").median())
    out = np.full(vocab_size, float(np.median(log_unit)) if len(log_unit) else 0.0, np.float32)
    out[med.get_column("t").to_numpy()] = med.get_column("p").to_numpy()
    return out


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
    #: handed back so the builder does not compute it twice.
    train_csr: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def fit_train_tables(train: pl.DataFrame, products: pl.DataFrame, config: CacheConfig) -> FittedTables:
    """Fit every table on ``train`` (the train split's basket samples) and ``products`` (hierarchy)."""
    vocab = build_vocabulary(train.lazy(), products)
    csr = basket_csr(train, vocab)
    offsets, tokens, unit_price, _ = csr
    emb = build_product_embeddings(offsets, tokens, vocab, config)
    product_log_price = build_product_log_price(tokens, unit_price, vocab.height)
    store_ctx, stores = build_store_context(train, offsets, tokens, emb, config)
    cust_ctx, customers = build_customer_context(train, stores, config)
    neighbours, weights = build_product_neighbours(cooccurrence_similarity(offsets, tokens, vocab.height),
                                                   config.cooccurrence_neighbours)
    return FittedTables(vocab, emb, product_log_price, cust_ctx, customers, store_ctx, stores, neighbours, weights,
                        csr)
