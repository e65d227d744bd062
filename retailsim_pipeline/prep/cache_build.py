"""The tensor cache's writer: fit the train tables, encode every split, write a content-addressed folder.

:func:`build_tensor_cache` reads the basket samples, calls :func:`~retailsim_pipeline.prep.fitting.fit_train_tables`
on the train split, computes the per-sample arrays of every split (:func:`build_split_features`),
writes everything under ``cache/.tmp-<key>-<pid>/`` and renames it to ``cache/<key>/``
(:func:`_publish`), then points ``cache/LATEST`` at it. The layout is documented in
:mod:`~retailsim_pipeline.prep.cache`, the reader.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retailsim_pipeline.config import MASK, PAD, UNK, CacheConfig, config_hash
from retailsim_pipeline.prep.cache import (
    CACHE_FORMAT,
    CUSTOMERS_FILE,
    FITTED_ARRAYS,
    LATEST_FILE,
    MANIFEST_FILE,
    STORES_FILE,
    VOCABULARY_FILE,
)
from retailsim_pipeline.prep.features import temporal_features, trip_features_all, week_index_expr
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.fitting import FittedTables, basket_csr, fit_train_tables, home_stores
from retailsim_pipeline.prep.history import customer_sequence, point_in_time_memory
from retailsim_pipeline.prep.samples import LABELS, PRODUCTS_FILE, SPLITS, read_manifest, scan_samples
from retailsim_pipeline.prep.schema import LABEL_CODES, LABEL_COLUMNS

log = logging.getLogger(__name__)


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



def line_log_price_ratio(unit: np.ndarray, tokens: np.ndarray, product_log_price: np.ndarray) -> np.ndarray:
    """[L] float32 log(unit price / the product's median train price); an unknown unit price (NaN: a served
    request without spend) counts as the median (ratio 0)."""
    ratio = (np.log(np.maximum(unit, 1e-3)) - product_log_price[tokens]).astype(np.float32)
    return np.where(np.isnan(ratio), np.float32(0.0), ratio)


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
            joined.select(week_index_expr(pl.col("week"))).to_series().to_numpy(),
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


def build_history(frames: dict[str, pl.DataFrame], csr: dict[str, tuple], k: int, decay: float
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Per split: ``customer_key``, ``past_baskets`` (:func:`~.history.customer_sequence` over every split)
    and the point-in-time memory ``history_tokens`` [N, k] int32, ``history_counts`` / ``history_recency``
    [N, k] uint16, ``history_decayed`` [N, k] float16 (:func:`~.history.point_in_time_memory` over every
    split's lines under the train vocabulary, decayed shares at ``decay`` per basket)."""
    names = list(frames)
    sizes = [frames[s].height for s in names]
    seq = customer_sequence(pl.concat([frames[s].select("basket_id", pl.col("cust_code").cast(pl.String), "date",
                                                        "hour") for s in names]))
    key = seq.get_column("customer_key").to_numpy()
    past = seq.get_column("past_baskets").to_numpy()
    tokens = np.concatenate([csr[s][1] for s in names])
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(csr[s][0]) for s in names]))])
    memory = point_in_time_memory(key, past, offsets, tokens, k, decay=decay)
    out, lo = {}, 0
    for s, n in zip(names, sizes):
        out[s] = {"customer_key": key[lo:lo + n].astype(np.int32), "past_baskets": past[lo:lo + n].astype(np.int32),
                  **{f"history_{name}": values[lo:lo + n] for name, values in memory._asdict().items()}}
        lo += n
    return out


def cache_widths(tables: FittedTables, split: dict[str, np.ndarray], config: CacheConfig) -> dict[str, int]:
    """The width of every vector the model reads, as built (the trainer sizes the model from these).

    ``customer`` = ``history`` (:func:`~retailsim_pipeline.prep.features.history_vector` of the
    point-in-time memory, computed per batch) + ``profile`` (a row of ``customer_context``)."""
    history, profile = config.customer_history_dim, int(tables.customer_context.shape[1])
    widths = {"product": int(tables.product_embeddings.shape[1]), "price": config.price_dim,
              "history": history, "profile": profile, "customer": history + profile,
              "store": int(tables.store_context.shape[1]),
              "temporal": int(split["temporal"].shape[1]), "trip": int(split["trip"].shape[1])}
    widths["context"] = widths["customer"] + widths["temporal"] + widths["store"] + widths["trip"]
    return widths


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
    if (final / MANIFEST_FILE).exists() and not force:
        log.info("tensor cache %s exists; reusing it", final)
        manifest = json.loads((final / MANIFEST_FILE).read_text())
        _write_latest(cache_root, key)
        return CacheBuildResult(final, key, manifest, True, time.perf_counter() - t0)

    frames = {s: scan_samples(samples_dir, s).collect() for s in SPLITS}
    products = pl.read_parquet(samples_dir / PRODUCTS_FILE)
    train = frames["train"]
    # The trip context (polars, multi-threaded) needs no fitted table but the home stores: compute it
    # beside the fitting (the embeddings' scipy/numpy work is mostly one thread).
    with ThreadPoolExecutor(max_workers=1) as pool:
        trip_future = pool.submit(trip_features_all, frames, home_stores(train))
        tables = fit_train_tables(train, products, config)
        trip = trip_future.result()
    vocab = tables.vocabulary
    csr = {s: tables.train_csr if s == "train" else basket_csr(frames[s], vocab) for s in SPLITS}
    train_weeks = sorted(train.get_column("week").unique().to_list())
    per_split = build_split_features(frames, tables.customers, tables.stores, trip,
                                     trend_scale=float(len(train_weeks)))
    for s, arrays in build_history(frames, csr, config.history_items, config.memory_decay).items():
        per_split[s].update(arrays)

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

        for name in FITTED_ARRAYS:
            save(name, getattr(tables, name))
        for s in SPLITS:
            off, tok, unit, qty = csr[s]
            ratio = line_log_price_ratio(unit, tok, tables.product_log_price)
            save(f"{s}/offsets", off)
            save(f"{s}/tokens", tok)
            save(f"{s}/line_log_price_ratio", ratio)
            save(f"{s}/line_quantity", qty)
            for name, arr in per_split[s].items():
                save(f"{s}/{name}", arr)
        vocab.write_parquet(tmp / VOCABULARY_FILE)
        tables.customers.write_parquet(tmp / CUSTOMERS_FILE)
        tables.stores.write_parquet(tmp / STORES_FILE)
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
            "sizes": {"vocab": int(vocab.height), "customers": int(tables.customer_context.shape[0]),
                      "stores": int(tables.store_context.shape[0])},
            "widths": cache_widths(tables, per_split["train"], config),
            "special_tokens": {"PAD": PAD, "MASK": MASK, "UNK": UNK},
            "label_codes": {c.lower(): list(LABEL_CODES[c]) for c in LABEL_COLUMNS},
            "arrays": arrays,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
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
        if not (final / MANIFEST_FILE).exists():
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
