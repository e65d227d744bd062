"""The tensor cache: every array the world model reads, in one content-addressed, memory-mapped folder.

Layout of ``cache/<key>/`` (``key`` = hash of the upstream samples version, the config and
:data:`CACHE_FORMAT`; the folder is built under a temporary name and renamed, so it is complete or absent):

====================================  ==================  =============================================
file                                  shape, dtype        contents
====================================  ==================  =============================================
manifest.json                                             shapes, dtypes, sha256 of every array, the
                                                          upstream data version, config and its hash,
                                                          the weeks the tables were fitted on
vocabulary.parquet                    V rows              token_id, PROD_CODE, train_count, hierarchy
product_embeddings.npy                [V, 256] float32    see :func:`build_product_embeddings`
product_log_price.npy                 [V] float32         log of the product's median train unit price
customer_context.npy                  [C, 192] float32    history 160 + profile 32; row 0 = anonymous
                                                          or unknown (not seen in train) customer
customer_history_tokens.npy,          [C, 32] int32/f32   each customer's most bought train products
customer_history_counts.npy                               and their line counts (a per-customer memory)
customers.parquet                     C - 1 rows          cust_code → row
store_context.npy                     [S, 96] float32     row 0 = store not seen in train
stores.parquet                        S - 1 rows          store_code → row
<split>/offsets.npy                   [N + 1] int64       CSR offsets of the basket tokens
<split>/tokens.npy                    [L] int32           token ids in line order (≤ 50 per basket)
<split>/line_log_price_ratio.npy      [L] float32         log(unit price / product's train median)
<split>/line_quantity.npy             [L] int16           QUANTITY of the line
<split>/customer_index.npy            [N] int32           row of customer_context
<split>/store_index.npy               [N] int32           row of store_context
<split>/temporal.npy                  [N, 64] float16     :func:`temporal_features`
<split>/trip.npy                      [N, 48] float16     :func:`trip_features`
<split>/labels.npy                    [N, 4] int8         class index of the four labels (schema order)
<split>/basket_id.npy, week.npy,      [N]                 ids for joining back, full line count
n_lines.npy
====================================  ==================  =============================================

Vocabulary: PAD = 0, MASK = 1, UNK = 2, then every product seen in the train split by descending
train frequency (ties by code). Price features [lines, 64] are computed on the fly from the line's
log price ratio and the product's log price by :func:`price_features` (storing them would cost
128 bytes a line).

Leakage rules (DESIGN §3): everything fitted — vocabulary, product embeddings, median prices,
customer and store tables, the standardisation of their statistics — uses train baskets only, and a
basket's own labels never enter its features: the trip context's "past mission mix" counts only
train baskets strictly before it. :func:`check_leakage` verifies both on a built cache.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from retailsim_pipeline.config import MASK, N_SPECIAL, PAD, SPECIAL_CODES, UNK, CacheConfig, config_hash
from retailsim_pipeline.prep.samples import (
    LABELS,
    PRODUCTS_FILE,
    SPLITS,
    read_manifest,
    scan_samples,
)
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.schema import (
    LABEL_CODES,
    LABEL_COLUMNS,
    LIFESTAGE_CODES,
    PRICE_SENSITIVITY_CODES,
    FIRST_WEEK,
    STORE_FORMAT_CODES,
    WEEKS_PER_YEAR,
    week_index,
)

log = logging.getLogger(__name__)

#: Bump when the cache's layout or any feature definition changes: it is part of the content address.
CACHE_FORMAT = 2  # 2: customer history items
LATEST_FILE = "LATEST"

_HOUR_BINS = (0, 10, 12, 14, 16, 18, 24)  # 6 bins: early, late morning, lunch, afternoon, after work, evening


# --------------------------------------------------------------------------------------------
# Pure feature functions (numpy in, numpy out; also used by the training code at batch time)
# --------------------------------------------------------------------------------------------


def price_features(log_ratio: np.ndarray, log_price: np.ndarray, dim: int = 64) -> np.ndarray:
    """Fourier encoding of a line's price: [..., dim] float32.

    First half: the log of the unit price relative to the product's train median (promotions,
    store price levels); second half: the product's log median price (budget vs premium). Each is
    encoded as sin/cos at ``dim // 4`` geometric frequencies, so nearby prices get nearby codes.
    """
    quarter = dim // 4
    freqs_ratio = (2.0 ** np.arange(quarter, dtype=np.float32)) * np.float32(np.pi / 4)  # ratio in ~[-2, 2]
    freqs_price = (2.0 ** np.arange(quarter, dtype=np.float32)) * np.float32(np.pi / 16)  # log £ in ~[-3, 4]
    r = np.asarray(log_ratio, dtype=np.float32)[..., None] * freqs_ratio
    p = np.asarray(log_price, dtype=np.float32)[..., None] * freqs_price
    return np.concatenate([np.sin(r), np.cos(r), np.sin(p), np.cos(p)], axis=-1).astype(np.float32)


def temporal_features(
    week_idx: np.ndarray, day_of_year: np.ndarray, month: np.ndarray, weekday: np.ndarray, hour: np.ndarray,
    trend_scale: float,
) -> np.ndarray:
    """When the basket happens: [N, 64] float32.

    day of year sin/cos k = 1..4 (8) · fiscal week of year sin/cos k = 1..3 (6) · weekday one-hot (7)
    + sin/cos (2) · weekend flag (1) · hour one-hot (24) + sin/cos (2) · month one-hot (12) ·
    trend = weeks since 200607 / ``trend_scale`` and its square (2).
    """
    n = len(week_idx)
    out = np.zeros((n, 64), dtype=np.float32)
    doy = 2 * np.pi * np.asarray(day_of_year, np.float32) / 365.25
    woy = 2 * np.pi * ((np.asarray(week_idx) + 6) % 52).astype(np.float32) / 52
    col = 0
    for k in range(1, 5):
        out[:, col], out[:, col + 1] = np.sin(k * doy), np.cos(k * doy)
        col += 2
    for k in range(1, 4):
        out[:, col], out[:, col + 1] = np.sin(k * woy), np.cos(k * woy)
        col += 2
    wd = np.asarray(weekday, np.int64)
    out[np.arange(n), col + wd - 1] = 1.0
    col += 7
    ang = 2 * np.pi * (wd - 1) / 7
    out[:, col], out[:, col + 1] = np.sin(ang), np.cos(ang)
    out[:, col + 2] = (wd == 1) | (wd == 7)
    col += 3
    hr = np.asarray(hour, np.int64)
    out[np.arange(n), col + hr] = 1.0
    col += 24
    ang = 2 * np.pi * hr / 24
    out[:, col], out[:, col + 1] = np.sin(ang), np.cos(ang)
    col += 2
    out[np.arange(n), col + np.asarray(month, np.int64) - 1] = 1.0
    col += 12
    trend = np.asarray(week_idx, np.float32) / max(trend_scale, 1.0)
    out[:, col], out[:, col + 1] = trend, trend**2
    assert col + 2 == 64
    return out


def _one_hot_expr(col: str, codes: tuple[str, ...], prefix: str) -> list[pl.Expr]:
    """One float column per code; works on Enum columns (compared without building strings) and String."""
    return [(pl.col(col) == c).fill_null(False).cast(pl.Float32).alias(f"{prefix}_{c}") for c in codes]


_TRIP_HISTORY_LABELS = {
    "basket_type": LABEL_CODES["BASKET_TYPE"],
    "basket_dominant_mission": LABEL_CODES["BASKET_DOMINANT_MISSION"],
    "basket_size": LABEL_CODES["BASKET_SIZE"],
    "basket_price_sensitivity": LABEL_CODES["BASKET_PRICE_SENSITIVITY"],
}


def trip_features(samples: pl.DataFrame, home_store: pl.DataFrame) -> pl.DataFrame:
    """What is known about a trip before its basket is filled: ``basket_id`` + 48 float columns.

    ``samples`` holds the baskets of every split (columns of ``basket_samples`` plus ``is_train``);
    a customer's history comes from their *train* baskets strictly before this one (by date, hour,
    basket id), never from the basket itself, so its own labels cannot leak in.

    past mix of basket_type (4), dominant mission (5), size (3), price sensitivity (4) · log1p days
    since the last train trip, has-previous flag, log1p past trips (3) · cold-start bucket one-hot:
    anonymous, 0, 1–2, 3–9, 10+ trips (5) · carded flag + price-sensitivity (4) and lifestage (7)
    one-hots of the card (12) · store format one-hot (4) + at-home-store flag (1) · hour bucket:
    < 11, 11–14, 14–17, ≥ 17 (4) · weekend flag (1) · past mean lines and spend per trip, log1p (2).
    """
    carded = pl.col("cust_code").is_not_null()
    train = pl.col("is_train").cast(pl.Float32)
    hist_cols, indicator_cols = [], []
    df = samples.sort("cust_code", "date", "hour", "basket_id", nulls_last=True).with_columns(
        (pl.col("spend").list.sum()).alias("__spend"),
    )
    exprs = []
    for label, codes in _TRIP_HISTORY_LABELS.items():
        for code in codes:
            name = f"__ind_{label}_{code}"
            exprs.append(((pl.col(label) == code).fill_null(False).cast(pl.Float32) * train).alias(name))
            indicator_cols.append(name)
    exprs += [train.alias("__ind_trips"), (pl.col("n_lines").cast(pl.Float32) * train).alias("__ind_lines"),
              (pl.col("__spend").cast(pl.Float32) * train).alias("__ind_spend")]
    df = df.with_columns(exprs)
    # Exclusive cumulative sums per customer: history strictly before this basket.
    past = [(pl.col(c).cum_sum().over("cust_code") - pl.col(c)).alias(c.replace("__ind_", "__past_"))
            for c in [*indicator_cols, "__ind_trips", "__ind_lines", "__ind_spend"]]
    df = df.with_columns(past).with_columns(
        pl.when(pl.col("is_train")).then(pl.col("date")).otherwise(None).shift(1).forward_fill()
        .over("cust_code").alias("__last_train_date")
    )
    n_past = pl.col("__past_trips")
    safe = pl.max_horizontal(n_past, pl.lit(1.0))
    for label, codes in _TRIP_HISTORY_LABELS.items():
        for code in codes:
            hist_cols.append((pl.col(f"__past_{label}_{code}") / safe).alias(f"past_{label}_{code}"))
    days = (pl.col("date") - pl.col("__last_train_date")).dt.total_days().cast(pl.Float32)
    hour = pl.col("hour")
    weekday = pl.col("weekday")
    # Anonymous baskets share the null key, so their cumulative sums are meaningless: zero them.
    history = [
        *hist_cols,
        pl.when(days.is_not_null()).then(days.log1p()).otherwise(0.0).alias("log_days_since_last"),
        days.is_not_null().cast(pl.Float32).alias("has_previous"),
        n_past.log1p().alias("log_past_trips"),
        (pl.col("__past_lines") / safe).log1p().alias("past_mean_lines"),
        (pl.col("__past_spend") / safe).log1p().alias("past_mean_spend"),
    ]
    history = [pl.when(carded).then(f).otherwise(0.0).cast(pl.Float32).alias(f.meta.output_name())
               for f in history]
    context = [
        (~carded).cast(pl.Float32).alias("bucket_anonymous"),
        (carded & (n_past == 0)).cast(pl.Float32).alias("bucket_0"),
        (carded & n_past.is_between(1, 2)).cast(pl.Float32).alias("bucket_1_2"),
        (carded & n_past.is_between(3, 9)).cast(pl.Float32).alias("bucket_3_9"),
        (carded & (n_past >= 10)).cast(pl.Float32).alias("bucket_10p"),
        carded.cast(pl.Float32).alias("carded"),
        *_one_hot_expr("cust_price_sensitivity", PRICE_SENSITIVITY_CODES, "card_ps"),
        *_one_hot_expr("cust_lifestage", LIFESTAGE_CODES, "card_ls"),
        *_one_hot_expr("store_format", STORE_FORMAT_CODES, "store_format"),
        (pl.col("store_code") == pl.col("home_store")).fill_null(False).cast(pl.Float32).alias("at_home_store"),
        (hour < 11).cast(pl.Float32).alias("hour_morning"),
        hour.is_between(11, 13).cast(pl.Float32).alias("hour_lunch"),
        hour.is_between(14, 16).cast(pl.Float32).alias("hour_afternoon"),
        (hour >= 17).cast(pl.Float32).alias("hour_evening"),
        ((weekday == 1) | (weekday == 7)).cast(pl.Float32).alias("weekend"),
    ]
    out = df.join(home_store, on="cust_code", how="left").select("basket_id", *history, *context)
    assert out.width == 49, out.width
    return out


# --------------------------------------------------------------------------------------------
# Fitted tables (train split only)
# --------------------------------------------------------------------------------------------


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


def _csr(frame: pl.DataFrame, vocab: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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


def _randomized_svd(m: sp.csr_matrix, k: int, seed: int, n_iter: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` left singular vectors and values of a sparse matrix (Halko et al. 2011), deterministic."""
    rng = np.random.default_rng(seed)
    n = m.shape[1]
    k = min(k, min(m.shape))
    q = m @ rng.standard_normal((n, k + 10))
    q, _ = np.linalg.qr(q)
    for _ in range(n_iter):
        q, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ q)
    b = q.T @ m
    u_b, s, _ = np.linalg.svd(np.asarray(b), full_matrices=False)
    u = (q @ u_b)[:, :k]
    s = s[:k]
    # Fix each vector's sign (largest component positive) so the embedding is reproducible.
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, s


def build_product_embeddings(
    offsets: np.ndarray, tokens: np.ndarray, vocab: pl.DataFrame, config: CacheConfig
) -> np.ndarray:
    """Product embeddings [V, 256] float32 from train baskets.

    Method (documented for the README):

    1. Co-occurrence counts ``C = Xᵀ X`` of the basket × product incidence matrix of train baskets
       (diagonal removed), i.e. how often two products share a basket.
    2. Positive PMI with context-distribution smoothing α = 0.75 (Levy, Goldberg & Dagan 2015):
       ``PPMI(i, j) = max(0, log P(i, j) / (P(i) P_α(j)))``.
    3. Randomized truncated SVD of the PPMI matrix; a product's co-occurrence vector is
       ``U_k √S_k``, L2-normalised (192 dims by default; rank at most a quarter of the products, the
       rest zero, so small vocabularies are still compressed).
    4. Hierarchy: for each of the 4 levels (CL, DEP, G, D) the mean co-occurrence vector of the
       product's group, projected by a fixed random Gaussian matrix to 16 dims and normalised, so
       rare products borrow strength from their class (64 dims).

    PAD and MASK rows are zero (the model learns its own MASK embedding); UNK is the mean product.
    """
    v = vocab.height
    k = config.cooccurrence_dim
    n_baskets = len(offsets) - 1
    rows = np.repeat(np.arange(n_baskets), np.diff(offsets))
    real = tokens >= N_SPECIAL  # special tokens never co-occur
    x = sp.csr_matrix((np.ones(int(real.sum()), np.float32), (rows[real], tokens[real])), shape=(n_baskets, v))
    x.sum_duplicates()
    x.data = np.minimum(x.data, 1.0)  # a product counted once per basket
    c = (x.T @ x).tocsr().astype(np.float64)
    c.setdiag(0)
    c.eliminate_zeros()
    total = c.sum()
    emb = np.zeros((v, config.product_dim), dtype=np.float32)
    if total > 0:
        row_sum = np.asarray(c.sum(axis=1)).ravel()
        ctx = row_sum**config.ppmi_smoothing
        ctx = ctx / ctx.sum()
        coo = c.tocoo()
        pmi = np.log(coo.data / total) - np.log(row_sum[coo.row] / total) - np.log(ctx[coo.col])
        keep = pmi > 0
        ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(v, v))
        # The truncation is what makes products that share contexts similar: a near-full-rank SVD
        # of a small vocabulary would reproduce the PPMI rows and keep every product orthogonal.
        rank = min(k, max(16, (v - N_SPECIAL) // 4))
        u, s = _randomized_svd(ppmi, rank, config.seed)
        cooc = u * np.sqrt(s)
        norms = np.linalg.norm(cooc, axis=1, keepdims=True)
        cooc = np.divide(cooc, norms, out=np.zeros_like(cooc), where=norms > 0)
        emb[:, : cooc.shape[1]] = cooc
    rng = np.random.default_rng(config.seed + 1)
    h = config.hierarchy_dim_per_level
    for level, col in enumerate(("PROD_CODE_10", "PROD_CODE_20", "PROD_CODE_30", "PROD_CODE_40")):
        groups = vocab.get_column(col).fill_null("<none>").to_numpy()
        _, group_idx = np.unique(groups, return_inverse=True)
        sums = np.zeros((group_idx.max() + 1, k), dtype=np.float64)
        np.add.at(sums, group_idx[N_SPECIAL:], emb[N_SPECIAL:, :k])
        proj = rng.standard_normal((k, h)) / np.sqrt(k)
        code = sums[group_idx] @ proj
        norms = np.linalg.norm(code, axis=1, keepdims=True)
        code = np.divide(code, norms, out=np.zeros_like(code), where=norms > 0)
        emb[:, k + level * h: k + (level + 1) * h] = code
    emb[PAD] = 0.0
    emb[MASK] = 0.0
    emb[UNK] = emb[N_SPECIAL:].mean(axis=0) if v > N_SPECIAL else 0.0
    return emb


def _week_index_expr(week: pl.Expr) -> pl.Expr:
    """Vectorized :func:`schema.week_index`: weeks since 200607."""
    w = week.cast(pl.Int64)
    return (w // 100 - FIRST_WEEK // 100) * WEEKS_PER_YEAR + w % 100 - FIRST_WEEK % 100


def _numbered(frame: pl.DataFrame, *exprs: pl.Expr) -> np.ndarray:
    """Evaluate unnamed statistic expressions into a float64 matrix (one column each)."""
    return frame.select(e.alias(f"__stat{i}") for i, e in enumerate(exprs)).to_numpy().astype(np.float64)


def build_customer_history(
    train_customer_index: np.ndarray, offsets: np.ndarray, tokens: np.ndarray, n_customers: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each customer's ``k`` most bought train products: tokens [C, k] int32 (PAD-filled) and line
    counts [C, k] float32, most bought first (ties: smaller token). Row 0 (anonymous/unknown) is empty.

    The model reads them as a per-customer memory (what this shopper re-buys). For a *train* basket
    the batch assembler subtracts the basket's own lines, so a masked product is never "known" from
    the very basket it was hidden in.
    """
    rows = np.repeat(np.asarray(train_customer_index, dtype=np.int64), np.diff(offsets))
    real = (rows > 0) & (tokens >= N_SPECIAL)
    counts = sp.csr_matrix((np.ones(int(real.sum()), np.float32), (rows[real], tokens[real])),
                           shape=(n_customers, int(tokens.max(initial=0)) + 1 if len(tokens) else 1))
    counts.sum_duplicates()
    coo = counts.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    r, c, v = coo.row[order], coo.col[order], coo.data[order]
    start = np.searchsorted(r, np.arange(n_customers))
    rank = np.arange(len(r)) - start[r]
    keep = rank < k
    hist_tokens = np.zeros((n_customers, k), dtype=np.int32)
    hist_counts = np.zeros((n_customers, k), dtype=np.float32)
    hist_tokens[r[keep], rank[keep]] = c[keep]
    hist_counts[r[keep], rank[keep]] = v[keep]
    return hist_tokens, hist_counts


def _standardise(x: np.ndarray) -> np.ndarray:
    mean, std = x.mean(axis=0), x.std(axis=0)
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def _hour_bin_exprs(prefix: str) -> list[pl.Expr]:
    return [pl.col("hour").is_between(lo, hi - 1).cast(pl.Float32).mean().alias(f"{prefix}_h{lo}")
            for lo, hi in zip(_HOUR_BINS[:-1], _HOUR_BINS[1:])]


def _weekday_exprs(prefix: str) -> list[pl.Expr]:
    return [(pl.col("weekday") == d).cast(pl.Float32).mean().alias(f"{prefix}_wd{d}") for d in range(1, 8)]


def _mean_embedding(index: np.ndarray, offsets: np.ndarray, tokens: np.ndarray, n_rows: int,
                    emb: np.ndarray) -> np.ndarray:
    """Mean embedding of the lines of each row's baskets: [n_rows, emb.shape[1]] (zero where no lines)."""
    line_row = np.repeat(index, np.diff(offsets))
    m = sp.csr_matrix((np.ones(len(tokens), np.float32), (line_row, tokens)), shape=(n_rows, emb.shape[0]))
    counts = np.asarray(m.sum(axis=1)).ravel()
    return (m @ emb) / np.maximum(counts, 1)[:, None]


def home_stores(train: pl.DataFrame) -> pl.DataFrame:
    """Each carded customer's most frequent train store (ties: the smallest code): cust_code, home_store."""
    return (
        train.filter(pl.col("cust_code").is_not_null())
        .group_by(pl.col("cust_code").cast(pl.String), pl.col("store_code").cast(pl.String)).len()
        .sort(["cust_code", "len", "store_code"], descending=[False, True, False])
        .unique("cust_code", keep="first").rename({"store_code": "home_store"}).select("cust_code", "home_store")
    )


def build_customer_context(
    train: pl.DataFrame, offsets: np.ndarray, tokens: np.ndarray, emb: np.ndarray, stores: pl.DataFrame,
    config: CacheConfig,
) -> tuple[np.ndarray, pl.DataFrame, pl.DataFrame]:
    """Customer context [C, 192] float32 (row 0 = anonymous/unknown), its index and home stores.

    History (160): mean product embedding of the customer's train lines, first 128 dims · 32
    behaviour statistics (standardised over customers): log trips, log lines, log mean lines and
    spend per trip, weekday (7) and hour (6) mix, home-store share, log distinct stores, distinct
    products / lines, log active weeks, trips per active week, log weeks since last train trip,
    mean log price ratio, zero padding. Profile (32): card price sensitivity (LA, MM, UM, XX, none),
    lifestage (7 + none), home-store format (4), known flag, zero padding. No label enters it.
    """
    carded = train.with_row_index("__row").filter(pl.col("cust_code").is_not_null())
    last_week = int(train.get_column("week").max())
    per_cust = (
        carded.with_columns(pl.col("spend").list.sum().alias("__spend"), pl.col("cust_code").cast(pl.String))
        .group_by("cust_code")
        .agg(
            pl.len().alias("trips"),
            pl.col("n_lines").sum().alias("lines"),
            pl.col("__spend").mean().alias("mean_spend"),
            *_weekday_exprs("c"),
            *_hour_bin_exprs("c"),
            pl.col("store_code").n_unique().alias("n_stores"),
            pl.col("week").n_unique().alias("active_weeks"),
            pl.col("week").max().alias("last_week"),
            pl.col("products").explode().n_unique().alias("distinct_products"),
            pl.col("cust_price_sensitivity").cast(pl.String).last().alias("ps"),
            pl.col("cust_lifestage").cast(pl.String).last().alias("ls"),
        )
        .sort("cust_code")
        .with_row_index("row", offset=1)
        .join(home_stores(train), on="cust_code", how="left", maintain_order="left")
    )
    n = per_cust.height + 1
    home_share = (
        carded.with_columns(pl.col("cust_code").cast(pl.String), pl.col("store_code").cast(pl.String))
        .join(per_cust.select("cust_code", "home_store"), on="cust_code")
        .group_by("cust_code").agg((pl.col("store_code") == pl.col("home_store")).mean().alias("home_share"))
    )
    per_cust = per_cust.join(home_share, on="cust_code", how="left", maintain_order="left")
    weeks_since = week_index(last_week) - _week_index_expr(pl.col("last_week"))
    stats = _numbered(per_cust,
        pl.col("trips").log1p(), pl.col("lines").log1p(), (pl.col("lines") / pl.col("trips")).log1p(),
        pl.col("mean_spend").log1p(),
        *[pl.col(f"c_wd{d}") for d in range(1, 8)],
        *[pl.col(f"c_h{lo}") for lo in _HOUR_BINS[:-1]],
        pl.col("home_share"), pl.col("n_stores").log1p(),
        (pl.col("distinct_products") / pl.col("lines")),
        pl.col("active_weeks").log1p(), (pl.col("trips") / pl.col("active_weeks")),
        weeks_since.cast(pl.Float64).log1p(),
    )
    # Mean log price ratio per customer from the CSR lines.
    cust_row_of_sample = (
        train.with_columns(pl.col("cust_code").cast(pl.String))
        .join(per_cust.select("cust_code", "row"), on="cust_code", how="left", maintain_order="left")
        .get_column("row").fill_null(0).to_numpy().astype(np.int64)
    )
    hist_dim = config.customer_history_dim
    emb_part = min(128, hist_dim - 32)
    mean_emb = _mean_embedding(cust_row_of_sample, offsets, tokens, n, emb[:, :emb_part])
    ctx = np.zeros((n, hist_dim + config.customer_profile_dim), dtype=np.float32)
    ctx[1:, :emb_part] = mean_emb[1:]
    ctx[1:, emb_part: emb_part + stats.shape[1]] = _standardise(stats)
    profile = per_cust.select(
        *_one_hot_expr("ps", PRICE_SENSITIVITY_CODES, "ps"), pl.col("ps").is_null().cast(pl.Float32),
        *_one_hot_expr("ls", LIFESTAGE_CODES, "ls"), pl.col("ls").is_null().cast(pl.Float32),
    ).to_numpy()
    home_format = (
        per_cust.select("home_store").join(stores.select("store_code", "store_format"), left_on="home_store",
                                           right_on="store_code", how="left", maintain_order="left")
        .select(*_one_hot_expr("store_format", STORE_FORMAT_CODES, "hf")).to_numpy()
    )
    p0 = hist_dim
    ctx[1:, p0: p0 + profile.shape[1]] = profile
    ctx[1:, p0 + profile.shape[1]: p0 + profile.shape[1] + 4] = home_format
    ctx[1:, p0 + profile.shape[1] + 4] = 1.0  # known customer
    ctx[0, p0 + profile.shape[1] + 5] = 1.0  # the anonymous/unknown row has its own flag
    index = per_cust.select("cust_code", pl.col("row").cast(pl.Int32), "home_store")
    home = per_cust.select("cust_code", "home_store")
    return ctx, index, home


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
    ctx[1:, :4] = per_store.select(*_one_hot_expr("store_format", STORE_FORMAT_CODES, "f")).to_numpy()
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
    ctx[:, e0: e0 + width] = _mean_embedding(store_row, offsets, tokens, n, emb[:, :width])
    ctx[0, e0: e0 + width] = 0.0
    index = per_store.select("store_code", pl.col("row").cast(pl.Int32), "store_format")
    return ctx, index


# --------------------------------------------------------------------------------------------
# Building, writing, loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheBuildResult:
    path: Path
    key: str
    manifest: dict
    reused: bool
    seconds: float


def cache_key(samples_version: str, config: CacheConfig) -> str:
    payload = f"{samples_version}|{config_hash(config)}|format={CACHE_FORMAT}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _label_codes(frame: pl.DataFrame) -> np.ndarray:
    """[N, 4] int8 class index of each label (order of ``schema.LABEL_CODES``)."""
    cols = []
    for col in LABEL_COLUMNS:
        codes = LABEL_CODES[col]
        cols.append(frame.get_column(col.lower()).cast(pl.String)
                    .replace_strict({c: i for i, c in enumerate(codes)}, return_dtype=pl.Int8).to_numpy())
    return np.stack(cols, axis=1).astype(np.int8)


def trip_features_all(frames: dict[str, pl.DataFrame], home: pl.DataFrame) -> pl.DataFrame:
    """:func:`trip_features` of every basket of every split (history from the train split only)."""
    everything = pl.concat(
        [f.select("basket_id", "cust_code", "store_code", "store_format", "date", "hour", "weekday", "n_lines",
                  "spend", "cust_price_sensitivity", "cust_lifestage", *LABELS)
         .with_columns(pl.lit(name == "train").alias("is_train"), pl.col("cust_code").cast(pl.String),
                       pl.col("store_code").cast(pl.String))
         for name, f in frames.items()]
    )
    return trip_features(everything, home)


def _customer_rows(frame: pl.DataFrame, customers: pl.DataFrame) -> np.ndarray:
    """Row of ``customer_context`` for every sample of ``frame`` (0 = anonymous or unknown)."""
    return (frame.select(pl.col("cust_code").cast(pl.String))
            .join(customers.select("cust_code", "row"), on="cust_code", how="left", maintain_order="left")
            .get_column("row").fill_null(0).to_numpy().astype(np.int64))


def build_split_features(
    frames: dict[str, pl.DataFrame], customers: pl.DataFrame, stores: pl.DataFrame, trip: pl.DataFrame,
    trend_scale: float,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-sample arrays of every split: indices, temporal and trip context, labels, ids."""
    out = {}
    for name, frame in frames.items():
        keyed = frame.select(
            "basket_id", "week", "date", "weekday", "hour", "n_lines",
            pl.col("cust_code").cast(pl.String), pl.col("store_code").cast(pl.String), *LABELS,
        )
        joined = (
            keyed.join(customers.select("cust_code", "row"), on="cust_code", how="left", maintain_order="left")
            .join(stores.select("store_code", pl.col("row").alias("store_row")), on="store_code", how="left",
                  maintain_order="left")
            .join(trip, on="basket_id", how="left", maintain_order="left")
        )
        week = joined.get_column("week").to_numpy()
        date = joined.get_column("date")
        temporal = temporal_features(
            joined.select(_week_index_expr(pl.col("week"))).to_series().to_numpy(),
            date.dt.ordinal_day().to_numpy(), date.dt.month().to_numpy(),
            joined.get_column("weekday").to_numpy(), joined.get_column("hour").to_numpy(), trend_scale,
        )
        trip_cols = [c for c in trip.columns if c != "basket_id"]
        out[name] = {
            "customer_index": joined.get_column("row").fill_null(0).to_numpy().astype(np.int32),
            "store_index": joined.get_column("store_row").fill_null(0).to_numpy().astype(np.int32),
            "temporal": temporal.astype(np.float16),
            "trip": joined.select(trip_cols).to_numpy().astype(np.float16),
            "labels": _label_codes(joined),
            "basket_id": joined.get_column("basket_id").to_numpy().astype(np.int64),
            "week": week.astype(np.int32),
            "n_lines": joined.get_column("n_lines").to_numpy().astype(np.int32),
        }
    return out


def _describe(arr: np.ndarray, file: str, path: Path) -> dict:
    return {"file": file, "shape": list(arr.shape), "dtype": str(arr.dtype), "sha256": file_sha256(path)}


def build_tensor_cache(
    samples_dir: Path, cache_root: Path, config: CacheConfig | None = None, *, force: bool = False
) -> CacheBuildResult:
    """Build (or reuse) the tensor cache for the samples in ``samples_dir``."""
    t0 = time.perf_counter()
    config = config or CacheConfig()
    samples_dir, cache_root = Path(samples_dir), Path(cache_root)
    samples_manifest = read_manifest(samples_dir)
    key = cache_key(samples_manifest["data_version"], config)
    final = cache_root / key
    if (final / "manifest.json").exists() and not force:
        log.info("tensor cache %s exists; reusing it", final)
        manifest = json.loads((final / "manifest.json").read_text())
        _write_latest(cache_root, key)
        return CacheBuildResult(final, key, manifest, True, time.perf_counter() - t0)

    frames = {s: scan_samples(samples_dir, s).collect() for s in SPLITS}
    products = pl.read_parquet(samples_dir / PRODUCTS_FILE)
    train = frames["train"]
    vocab = build_vocabulary(train.lazy(), products)
    csr = {s: _csr(frames[s], vocab) for s in SPLITS}
    offsets, tokens, unit_price, _ = csr["train"]
    # The trip context (polars, multi-threaded) needs no embedding: compute it beside the
    # embeddings (scipy/numpy, mostly one thread).
    with ThreadPoolExecutor(max_workers=1) as pool:
        trip_future = pool.submit(trip_features_all, frames, home_stores(train))
        emb = build_product_embeddings(offsets, tokens, vocab, config)
        trip = trip_future.result()
    # Median train unit price per token (UNK: median over all lines): the price normaliser.
    log_unit = np.log(np.maximum(unit_price, 1e-3))
    med = pl.DataFrame({"t": tokens, "p": log_unit}).group_by("t").agg(pl.col("p").median())
    product_log_price = np.full(vocab.height, float(np.median(log_unit)) if len(log_unit) else 0.0, np.float32)
    product_log_price[med.get_column("t").to_numpy()] = med.get_column("p").to_numpy()
    stores_ctx, stores_index = build_store_context(train, offsets, tokens, emb, config)
    cust_ctx, cust_index, _ = build_customer_context(train, offsets, tokens, emb, stores_index, config)
    train_weeks = sorted(train.get_column("week").unique().to_list())
    hist_tokens, hist_counts = build_customer_history(
        per_split_customer_index := _customer_rows(train, cust_index), offsets, tokens, cust_ctx.shape[0],
        config.history_items)
    del per_split_customer_index
    per_split = build_split_features(frames, cust_index, stores_index, trip, trend_scale=float(len(train_weeks)))

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays: dict[str, dict] = {}
    try:
        def save(name: str, arr: np.ndarray) -> None:
            path = tmp / f"{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.ascontiguousarray(arr))
            arrays[name] = _describe(arr, f"{name}.npy", path)

        save("product_embeddings", emb)
        save("product_log_price", product_log_price)
        save("customer_context", cust_ctx)
        save("customer_history_tokens", hist_tokens)
        save("customer_history_counts", hist_counts)
        save("store_context", stores_ctx)
        for s in SPLITS:
            off, tok, unit, qty = csr[s]
            ratio = (np.log(np.maximum(unit, 1e-3)) - product_log_price[tok]).astype(np.float32)
            save(f"{s}/offsets", off)
            save(f"{s}/tokens", tok)
            save(f"{s}/line_log_price_ratio", ratio)
            save(f"{s}/line_quantity", qty)
            for name, arr in per_split[s].items():
                save(f"{s}/{name}", arr)
        vocab.write_parquet(tmp / "vocabulary.parquet")
        cust_index.write_parquet(tmp / "customers.parquet")
        stores_index.write_parquet(tmp / "stores.parquet")
        manifest = {
            "format": CACHE_FORMAT,
            "key": key,
            "created_unix": time.time(),
            # Relative to the data folder (the cache root's parent): a moved or copied data folder
            # keeps pointing at its own samples.
            "upstream": {"basket_samples": samples_manifest["data_version"],
                         "samples_dir": os.path.relpath(samples_dir.resolve(), cache_root.resolve().parent)},
            "config": config.model_dump(mode="json"),
            "config_hash": config_hash(config),
            "fit": {"split": "train", "weeks": [train_weeks[0], train_weeks[-1]]},
            "splits": {
                s: {"n_samples": int(len(frames[s])), "n_tokens": int(len(csr[s][1])),
                    "weeks": samples_manifest["splits"][s]}
                for s in SPLITS
            },
            "sizes": {"vocab": int(vocab.height), "customers": int(cust_ctx.shape[0]),
                      "stores": int(stores_ctx.shape[0])},
            "special_tokens": {"PAD": PAD, "MASK": MASK, "UNK": UNK},
            "label_codes": {c.lower(): list(LABEL_CODES[c]) for c in LABEL_COLUMNS},
            "arrays": arrays,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _publish(tmp, final, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_latest(cache_root, key)
    seconds = time.perf_counter() - t0
    log.info("tensor cache %s built in %.1fs", final, seconds)
    return CacheBuildResult(final, key, manifest, False, seconds)


def _publish(tmp: Path, final: Path, force: bool) -> None:
    """Rename the finished ``tmp`` folder to ``final`` without ever deleting a folder a reader may use.

    The key is a content hash: a ``final`` that appeared meanwhile (another process built the same
    inputs) holds the same arrays, so it is kept and ``tmp`` dropped. A forced rebuild moves the old
    folder aside with one atomic rename, puts the new one in place with another, and only then
    deletes the old one (open memory maps stay valid after the unlink).
    """
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not (final / "manifest.json").exists():
            raise
    if not force:
        log.info("tensor cache %s was built meanwhile by another process; keeping it", final)
        return
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(cache_root: Path, key: str) -> None:
    tmp = cache_root / f".{LATEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(key + "\n")
    os.replace(tmp, cache_root / LATEST_FILE)


@dataclass(frozen=True)
class SplitArrays:
    """Memory-mapped arrays of one split (see the module docstring for shapes)."""

    offsets: np.ndarray
    tokens: np.ndarray
    line_log_price_ratio: np.ndarray
    line_quantity: np.ndarray
    customer_index: np.ndarray
    store_index: np.ndarray
    temporal: np.ndarray
    trip: np.ndarray
    labels: np.ndarray
    basket_id: np.ndarray
    week: np.ndarray
    n_lines: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def padded_tokens(self, idx: np.ndarray, pad_to: int | None = None) -> np.ndarray:
        """Token ids of samples ``idx`` as a [B, S] int32 array padded with PAD (vectorized gather)."""
        idx = np.asarray(idx, dtype=np.int64)
        starts, lengths = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        width = int(lengths.max(initial=0)) if pad_to is None else pad_to
        pos = np.arange(width)
        valid = pos[None, :] < lengths[:, None]
        gather = np.where(valid, starts[:, None] + pos[None, :], 0)
        return np.where(valid, self.tokens[gather], PAD).astype(np.int32)


class TensorCache:
    """A built tensor cache, opened read-only with every array memory-mapped."""

    def __init__(self, path: Path, manifest: dict, arrays: dict[str, np.ndarray]):
        self.path = path
        self.manifest = manifest
        self._arrays = arrays

    @classmethod
    def open(cls, path: Path, *, verify_hashes: bool = False) -> "TensorCache":
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path}: not a tensor cache (no manifest)")
        manifest = json.loads(manifest_path.read_text())
        arrays = {}
        for name, meta in manifest["arrays"].items():
            file = path / meta["file"]
            arr = np.load(file, mmap_mode="r")
            if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                raise ValueError(
                    f"{file}: shape {arr.shape} dtype {arr.dtype} disagree with manifest "
                    f"{tuple(meta['shape'])} {meta['dtype']}"
                )
            if verify_hashes and file_sha256(file) != meta["sha256"]:
                raise ValueError(f"{file}: content hash differs from the manifest; the cache is corrupt")
            arrays[name] = arr
        return cls(path, manifest, arrays)

    @classmethod
    def latest(cls, cache_root: Path) -> "TensorCache":
        """The cache named by ``cache_root/LATEST``, which must hold a cache key (hex) that exists."""
        latest = Path(cache_root) / LATEST_FILE
        if not latest.is_file():
            raise FileNotFoundError(f"{latest}: no tensor cache yet; materialize tensor_cache first")
        key = latest.read_text().strip()
        if not re.fullmatch(r"[0-9a-f]{8,64}", key) or not (Path(cache_root) / key / "manifest.json").is_file():
            raise ValueError(f"{latest}: {key[:80]!r} does not name a tensor cache in {cache_root}; "
                             "rebuild it with `retailsim run --select key:tensor_cache`")
        return cls.open(Path(cache_root) / key)

    @property
    def samples_dir(self) -> Path:
        """The basket samples this cache was built from (stored relative to the data folder)."""
        stored = Path(self.manifest["upstream"]["samples_dir"])
        return stored if stored.is_absolute() else (self.path.parent.parent / stored).resolve()

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    @property
    def array_names(self) -> list[str]:
        return list(self._arrays)

    @property
    def product_embeddings(self) -> np.ndarray:
        return self._arrays["product_embeddings"]

    @property
    def product_log_price(self) -> np.ndarray:
        return self._arrays["product_log_price"]

    @property
    def customer_context(self) -> np.ndarray:
        return self._arrays["customer_context"]

    @property
    def store_context(self) -> np.ndarray:
        return self._arrays["store_context"]

    def split(self, name: str) -> SplitArrays:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; one of {SPLITS}")
        return SplitArrays(**{f: self._arrays[f"{name}/{f}"] for f in SplitArrays.__dataclass_fields__})

    def vocabulary(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / "vocabulary.parquet")


# --------------------------------------------------------------------------------------------
# Checks on a built cache (used by the asset checks and the tests)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    failures: list[str]
    details: dict

    def summary(self) -> str:
        return "ok" if self.passed else "; ".join(self.failures)


def check_manifest(cache: TensorCache, *, verify_hashes: bool = True) -> CheckOutcome:
    """The manifest agrees with the arrays: files, shapes, dtypes, hashes, and cross-array invariants."""
    failures: list[str] = []
    m = cache.manifest
    for name, meta in m["arrays"].items():
        arr = cache[name]
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            failures.append(f"{name}: {arr.shape} {arr.dtype} vs manifest {meta['shape']} {meta['dtype']}")
        if verify_hashes and file_sha256(cache.path / meta["file"]) != meta["sha256"]:
            failures.append(f"{name}: sha256 differs from the manifest")
    v, c, s = m["sizes"]["vocab"], m["sizes"]["customers"], m["sizes"]["stores"]
    cfg = CacheConfig(**m["config"])
    expect = {
        "product_embeddings": (v, cfg.product_dim), "product_log_price": (v,),
        "customer_context": (c, cfg.customer_history_dim + cfg.customer_profile_dim),
        "store_context": (s, cfg.store_dim),
    }
    for name, shape in expect.items():
        if tuple(cache[name].shape) != shape:
            failures.append(f"{name}: shape {cache[name].shape}, expected {shape}")
    for name in m["arrays"]:  # every float array, split arrays included: no NaN/Inf may reach the model
        arr = cache[name]
        if np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all():
            failures.append(f"{name}: holds {int((~np.isfinite(arr)).sum()):,} NaN/Inf value(s)")
    for split in SPLITS:
        a = cache.split(split)
        n, info = len(a), m["splits"][split]
        if n != info["n_samples"] or int(a.offsets[-1]) != len(a.tokens) or len(a.tokens) != info["n_tokens"]:
            failures.append(f"{split}: {n} samples / {len(a.tokens)} tokens disagree with offsets or manifest")
        if np.any(np.diff(a.offsets) < 1):
            failures.append(f"{split}: a basket has no tokens")
        for name, bound in (("tokens", v), ("customer_index", c), ("store_index", s)):
            arr = a.__getattribute__(name)
            if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= bound):
                failures.append(f"{split}/{name}: values outside [0, {bound})")
        for name in ("temporal", "trip", "labels", "customer_index", "basket_id", "n_lines", "week"):
            if a.__getattribute__(name).shape[0] != n:
                failures.append(f"{split}/{name}: {a.__getattribute__(name).shape[0]} rows for {n} samples")
        if len(a.line_log_price_ratio) != len(a.tokens) or len(a.line_quantity) != len(a.tokens):
            failures.append(f"{split}: line arrays are not aligned with tokens")
    return CheckOutcome(not failures, failures, {"arrays": len(m["arrays"]), "vocab": v, "customers": c,
                                                  "stores": s})


def check_leakage(cache: TensorCache, samples_dir: Path, *, n_probe: int = 200, seed: int = 0) -> CheckOutcome:
    """Nothing in the cache was computed from validation/test weeks, and labels never leak into features.

    1. The tables were fitted on train weeks only, all before the first validation week.
    2. The vocabulary is exactly the train products with their train line counts.
    3. Every customer and store row belongs to someone seen in the train split.
    4. Label perturbation: for ``n_probe`` random carded baskets (all splits, one per customer) the
       labels are changed to another class and the trip context of their customers is recomputed from
       scratch; the probed baskets' features must equal the cached ones, bit for bit.
    """
    failures: list[str] = []
    details: dict = {}
    samples_dir = Path(samples_dir)
    sm = read_manifest(samples_dir)
    fit_last = cache.manifest["fit"]["weeks"][1]
    val_first = sm["splits"]["validation"][0]
    details["fit_last_week"], details["validation_first_week"] = fit_last, val_first
    if not fit_last < val_first:
        failures.append(f"tables fitted up to week {fit_last}, not before validation week {val_first}")

    train = scan_samples(samples_dir, "train")
    counts = (train.select(pl.col("products").explode().cast(pl.String).alias("PROD_CODE"))
              .group_by("PROD_CODE").len("expected").collect())
    vocab = cache.vocabulary().filter(pl.col("token_id") >= N_SPECIAL)
    cmp = vocab.join(counts, on="PROD_CODE", how="full", coalesce=True)
    bad_vocab = cmp.filter(pl.col("train_count").cast(pl.Int64).fill_null(-1)
                           != pl.col("expected").cast(pl.Int64).fill_null(-1))
    details["vocab_mismatches"] = bad_vocab.height
    if bad_vocab.height:
        failures.append(f"{bad_vocab.height} vocabulary entries are not train products with train counts "
                        f"(e.g. {bad_vocab.get_column('PROD_CODE').head(3).to_list()})")

    train_ids = train.select(pl.col("cust_code").cast(pl.String), pl.col("store_code").cast(pl.String)).collect()
    customers = pl.read_parquet(cache.path / "customers.parquet")
    stores = pl.read_parquet(cache.path / "stores.parquet")
    stray_c = customers.filter(~pl.col("cust_code").is_in(train_ids.get_column("cust_code").drop_nulls().implode()))
    stray_s = stores.filter(~pl.col("store_code").is_in(train_ids.get_column("store_code").implode()))
    if stray_c.height or stray_s.height:
        failures.append(f"{stray_c.height} customer and {stray_s.height} store rows come from outside the train split")

    frames = {s: scan_samples(samples_dir, s).collect() for s in SPLITS}
    carded = pl.concat([f.select("basket_id", "cust_code").with_columns(pl.lit(s).alias("split"))
                        for s, f in frames.items()]).filter(pl.col("cust_code").is_not_null())
    # One basket per customer: a basket's labels may (and do) shape its customer's *later* baskets.
    probe = (carded.sample(fraction=1.0, shuffle=True, seed=seed).unique("cust_code", keep="first",
                                                                          maintain_order=True).head(n_probe))
    probe_ids = probe.get_column("basket_id")
    custs = probe.get_column("cust_code").unique()
    subset = {s: f.filter(pl.col("cust_code").is_in(custs.implode())) for s, f in frames.items()}
    home = customers.select("cust_code", "home_store")

    def recompute(perturb: bool) -> pl.DataFrame:
        parts = []
        for s, f in subset.items():
            f = f.select("basket_id", "cust_code", "store_code", "store_format", "date", "hour", "weekday", "n_lines",
                         "spend", "cust_price_sensitivity", "cust_lifestage", *LABELS)
            if perturb:
                hit = pl.col("basket_id").is_in(probe_ids.implode())
                f = f.with_columns(
                    pl.when(hit).then(pl.col(lab).cast(pl.String).replace_strict(
                        {c: codes[(i + 1) % len(codes)] for i, c in enumerate(codes)})).otherwise(
                        pl.col(lab).cast(pl.String)).cast(f.schema[lab]).alias(lab)
                    for lab, codes in ((c.lower(), LABEL_CODES[c]) for c in LABEL_COLUMNS)
                )
            parts.append(f.with_columns(pl.lit(s == "train").alias("is_train"), pl.col("cust_code").cast(pl.String),
                                        pl.col("store_code").cast(pl.String)))
        return trip_features(pl.concat(parts), home).filter(pl.col("basket_id").is_in(probe_ids.implode()))

    cached_rows = []
    for s in SPLITS:
        a = cache.split(s)
        ids = np.asarray(a.basket_id)
        want = probe.filter(pl.col("split") == s).get_column("basket_id").to_numpy()
        pos = np.searchsorted(ids, want, sorter=np.argsort(ids))
        rows = np.argsort(ids)[pos]
        cached_rows.append(pl.DataFrame({"basket_id": ids[rows], "__row": np.arange(len(rows))})
                           .with_columns(pl.Series("__feat", np.asarray(a.trip[rows]).astype(np.float32))))
    cached = pl.concat(cached_rows).sort("basket_id")
    for perturb in (False, True):
        fresh = recompute(perturb).sort("basket_id")
        fresh_np = fresh.drop("basket_id").to_numpy().astype(np.float16).astype(np.float32)
        cached_np = np.stack(cached.get_column("__feat").to_list()) if cached.height else fresh_np
        same = fresh.get_column("basket_id").equals(cached.get_column("basket_id")) and np.array_equal(
            fresh_np, cached_np)
        details["labels_perturbed" if perturb else "recomputed"] = bool(same)
        if not same:
            failures.append("trip features change when the basket's own labels change" if perturb
                            else "trip features recomputed from the samples differ from the cache")
    details["probed_baskets"] = int(probe.height)
    return CheckOutcome(not failures, failures, details)
