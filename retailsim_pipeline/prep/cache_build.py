"""The tensor cache's writer: fit the train tables, encode every split, write a content-addressed folder.

:func:`build_tensor_cache` reads the basket samples, calls :func:`~retailsim_pipeline.prep.fitting.fit_train_tables`
on the train split, computes the per-sample arrays of every split (:func:`build_split_features`),
writes everything under ``cache/.tmp-<key>-<pid>/`` and renames it to ``cache/<key>/``
(:func:`_publish`), then points ``cache/LATEST`` at it. The layout is documented in
:mod:`~retailsim_pipeline.prep.cache`, the reader.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retailsim_pipeline.config import MASK, PAD, TEMPORAL_WIDTH, TRIP_WIDTH, UNK, CacheConfig, config_hash
from retailsim_pipeline.prep.cache import (
    CACHE_FORMAT,
    CUSTOMERS_FILE,
    FITTED_ARRAYS,
    LATEST_FILE,
    MANIFEST_FILE,
    STORES_FILE,
    VOCABULARY_FILE,
)
from retailsim_pipeline.prep.features import temporal_features, week_index_expr
from retailsim_pipeline.prep import features, history
from retailsim_pipeline.prep.fitting import FittedTables, TrainFit, basket_csr
from retailsim_pipeline.prep.history import customer_sequence
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
        values = frame.get_column(col.lower())
        if values.dtype == pl.Enum(list(codes)) and not values.null_count():
            cols.append(values.to_physical().to_numpy())  # the Enum's own index: the code's (the samples')
        else:
            cols.append(values.cast(pl.String).replace_strict({c: i for i, c in enumerate(codes)},
                                                              return_dtype=pl.Int8).to_numpy())
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
        # The temporal features read only (week, date, weekday, hour): computed once per distinct moment
        # (a chunk of two weeks has a few hundred) and gathered, the same values row by row.
        moments = joined.select("week", "date", "weekday", "hour")
        distinct = moments.unique(maintain_order=True)
        at = (moments.join(distinct.with_row_index("__moment"), on=["week", "date", "weekday", "hour"], how="left",
                           maintain_order="left", nulls_equal=True)
              .get_column("__moment").to_numpy())
        date = distinct.get_column("date")
        temporal = temporal_features(
            distinct.select(week_index_expr(pl.col("week"))).to_series().to_numpy(),
            date.dt.ordinal_day().to_numpy(), date.dt.month().to_numpy(),
            distinct.get_column("weekday").to_numpy(), distinct.get_column("hour").to_numpy(), trend_scale,
        ).astype(np.float16)[at]
        trip_cols = [c for c in trip.columns if c != "basket_id"]
        out[name] = {
            "customer_index": joined.get_column("row").fill_null(0).to_numpy().astype(np.int32),
            "store_index": joined.get_column("store_row").fill_null(0).to_numpy().astype(np.int32),
            "temporal": temporal,
            "trip": joined.select(trip_cols).to_numpy(order="c").astype(np.float16),
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
    split's lines under the train vocabulary, decayed shares at ``decay`` per basket). The frames may come
    in any order (the serving code hands a customer's log and the requests); the builder streams the same
    arrays through :class:`~.history.SequenceState` and :class:`~.history.MemoryState`."""
    names = list(frames)
    sizes = [frames[s].height for s in names]
    seq = customer_sequence(pl.concat([frames[s].select("basket_id", pl.col("cust_code").cast(pl.String), "date",
                                                        "hour") for s in names]))
    key = seq.get_column("customer_key").to_numpy()
    past = seq.get_column("past_baskets").to_numpy()
    tokens = np.concatenate([csr[s][1] for s in names])
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(csr[s][0]) for s in names]))])
    memory = history.point_in_time_memory(key, past, offsets, tokens, k, decay=decay)
    out, lo = {}, 0
    for s, n in zip(names, sizes):
        out[s] = {"customer_key": key[lo:lo + n].astype(np.int32), "past_baskets": past[lo:lo + n].astype(np.int32),
                  **{f"history_{name}": values[lo:lo + n] for name, values in memory._asdict().items()}}
        lo += n
    return out


def trip_features_all(frames: dict[str, pl.DataFrame], home: pl.DataFrame) -> pl.DataFrame:
    """The trip context of ``frames`` — every split, in time order (train, validation, test) — through one
    :class:`~.features.TripStream`, as the builder computes it chunk by chunk: ``basket_id`` + the trip
    columns, rows in the frames' order. (Frames in any order: :func:`~.features.trip_features_all`.)"""
    stream = features.TripStream(home)
    return pl.concat([stream.step(frame) for frame in frames.values()])


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


#: Lines (after truncation) of one chunk of the streamed build, a range of whole weeks of one split: by
#: default 1/32 of all the lines, between these bounds. Small chunks pipeline better (the memory of one
#: chunk runs beside the next one's other work) and hold less (~150 bytes a line at their widest); each
#: chunk costs a pass over the memory's (customer, product) table, which large data makes large.
CHUNK_LINES_MIN, CHUNK_LINES_MAX = 2_000_000, 8_000_000


@dataclass(frozen=True)
class _SplitPlan:
    """One split of the samples as the streamed build reads it: its weeks in chunks, its sizes."""

    name: str
    chunks: list[tuple[int, int]]  # (first week, last week) of each chunk, in time order
    n_samples: int
    n_tokens: int
    weeks: list[int]


def _plan(samples_dir: Path, chunk_lines: int | None) -> tuple[dict[str, _SplitPlan], pl.Series]:
    """Pass 0 over the samples, basket-level columns only: each split's weeks grouped into chunks of about
    ``chunk_lines`` lines (None: 1/32 of all, within ``CHUNK_LINES_MIN`` .. ``CHUNK_LINES_MAX``), its
    baskets and lines, and every carded customer's code."""
    plans, codes, weekly = {}, [], {}
    for split in SPLITS:
        per_week, split_codes = pl.collect_all([
            scan_samples(samples_dir, split).group_by("week")
            .agg(pl.len().alias("baskets"), pl.col("products").list.len().sum().alias("lines")).sort("week"),
            scan_samples(samples_dir, split).select(pl.col("cust_code").cast(pl.String).unique()),
        ])
        codes.append(split_codes.get_column("cust_code"))
        weekly[split] = per_week
    if chunk_lines is None:
        total = sum(int(w.get_column("lines").sum()) for w in weekly.values())
        chunk_lines = min(CHUNK_LINES_MAX, max(CHUNK_LINES_MIN, total // 32))
    for split, per_week in weekly.items():
        chunks: list[tuple[int, int]] = []
        lines = 0
        for week, n in per_week.select("week", "lines").iter_rows():
            if chunks and lines + n <= chunk_lines:
                chunks[-1] = (chunks[-1][0], week)
                lines += n
            else:
                chunks.append((week, week))
                lines = n
        plans[split] = _SplitPlan(split, chunks, int(per_week.get_column("baskets").sum()),
                                  int(per_week.get_column("lines").sum()), per_week.get_column("week").to_list())
    return plans, pl.concat(codes)


def _chunks(samples_dir: Path, plan: _SplitPlan) -> Iterator[pl.DataFrame]:
    """The split's baskets chunk by chunk, in time order (the week filter prunes the parquet's row groups).
    The next chunk is read in a background thread while the caller works on this one (one chunk ahead)."""
    return _read_ahead(scan_samples(samples_dir, plan.name).filter(pl.col("week").is_between(lo, hi))
                       for lo, hi in plan.chunks)


def _read_ahead(queries: Iterator[pl.LazyFrame]) -> Iterator[pl.DataFrame]:
    """``query.collect()`` of each query in order, the next one collected in a thread meanwhile."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as reader:
        ahead = None
        for query in queries:
            current, ahead = ahead, reader.submit(query.collect)
            if current is not None:
                yield current.result()
        if ahead is not None:
            yield ahead.result()


class _NpyStream:
    """One ``.npy`` file written front to back in chunks: the header holds the final shape (known up front),
    the rows follow as they come, and the file's sha256 is computed on the way (no second read). The file
    is ``root/<name>.npy``; :meth:`close` returns its manifest entry."""

    def __init__(self, root: Path, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.file = f"{name}.npy"
        path = root / self.file
        self.path, self.shape, self.dtype = path, tuple(int(d) for d in shape), np.dtype(dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": self.shape})
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        self._rows = 0
        self._write(header.getvalue())

    def _write(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path}: rows of shape {arr.shape[1:]}, the file holds {self.shape[1:]}")
        self._write(memoryview(arr).cast("B"))
        self._rows += len(arr)

    def close(self) -> dict:
        self._file.close()
        if self._rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: {self._rows} rows written, {self.shape[0]} announced")
        return {"file": self.file, "shape": list(self.shape), "dtype": str(self.dtype), "sha256": self._hash.hexdigest()}


#: Per-sample arrays of a split: dtype and the width of a row (() for a vector).
_SAMPLE_ARRAYS: dict[str, tuple[type, tuple[int, ...]]] = {
    "customer_index": (np.int32, ()), "store_index": (np.int32, ()), "labels": (np.int8, (len(LABEL_COLUMNS),)),
    "basket_id": (np.int64, ()), "week": (np.int32, ()), "n_lines": (np.int32, ()),
    "customer_key": (np.int32, ()), "past_baskets": (np.int32, ()),
    "temporal": (np.float16, (TEMPORAL_WIDTH,)), "trip": (np.float16, (TRIP_WIDTH,)),
}
_LINE_ARRAYS: dict[str, type] = {"tokens": np.int32, "line_log_price_ratio": np.float32, "line_quantity": np.int16}
_MEMORY_DTYPES: dict[str, type] = {"tokens": np.int32, "counts": np.uint16, "recency": np.uint16,
                                   "decayed": np.float16}


def build_tensor_cache(
    samples_dir: Path, cache_root: Path, config: CacheConfig | None = None, *, force: bool = False,
    chunk_lines: int | None = None,
) -> CacheBuildResult:
    """Build (or reuse) the tensor cache for the samples in ``samples_dir``, streamed.

    The contract at any scale: memory grows with products, stores and customers, never with baskets or
    lines. Pass 0 reads the basket-level columns (weeks, line counts, customer codes); the fit reads the
    train split chunk by chunk (:func:`~.fitting.fit_train_tables_streamed`); then every split is read
    chunk by chunk — ``chunk_lines`` lines of whole weeks (default: see :data:`CHUNK_LINES_MIN`), train,
    validation, test, in time order — and
    each chunk's arrays are appended to their ``.npy`` files (:class:`_NpyStream`), with the customer
    sequence (:class:`~.history.SequenceState`), the trip context (:class:`~.features.TripStream`) and the
    memory (:class:`~.history.MemoryState`) carried from chunk to chunk. The arrays do not depend on
    ``chunk_lines``: any chunking gives the same files, bit for bit.
    """
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

    plans, codes = _plan(samples_dir, chunk_lines)
    products = pl.read_parquet(samples_dir / PRODUCTS_FILE)
    fit = TrainFit(products, config)
    fit.first_pass(_chunks(samples_dir, plans["train"]))
    t_fit = time.perf_counter()
    vocab = fit.vocabulary
    train_weeks = plans["train"].weeks
    trend_scale = float(len(train_weeks))
    sequence = history.SequenceState(codes)
    memory = history.MemoryState(config.history_items, config.memory_decay)
    trip = features.TripStream(fit.customers.select("cust_code", "home_store"))

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays: dict[str, dict] = {}
    try:
        def save(name: str, arr: np.ndarray) -> None:
            stream = _NpyStream(tmp, name, arr.shape, arr.dtype)
            stream.append(arr)
            arrays[name] = stream.close()

        k = config.history_items
        finished = None  # the fit's last part, computed beside the validation and test chunks
        # The memory (numpy, one core) of chunk i runs in a worker thread while this thread reads chunk
        # i + 1 and computes its other arrays (polars, the other core); chunks still enter each state in order.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory") as worker, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="fit") as fitter:
            for split in SPLITS:
                plan = plans[split]
                n, n_lines = plan.n_samples, plan.n_tokens
                streams = {"offsets": _NpyStream(tmp, f"{split}/offsets", (n + 1,), np.int64)}
                streams |= {name: _NpyStream(tmp, f"{split}/{name}", (n_lines,), dtype)
                            for name, dtype in _LINE_ARRAYS.items()}
                streams |= {name: _NpyStream(tmp, f"{split}/{name}", (n, *width), dtype)
                            for name, (dtype, width) in _SAMPLE_ARRAYS.items()}
                streams |= {f"history_{name}": _NpyStream(tmp, f"{split}/history_{name}", (n, k), dtype)
                            for name, dtype in _MEMORY_DTYPES.items()}
                streams["offsets"].append(np.zeros(1, np.int64))

                def write_memory(future: Future) -> None:
                    for name, values in future.result()._asdict().items():
                        streams[f"history_{name}"].append(values)

                written, pending = 0, None
                for frame in _chunks(samples_dir, plan):
                    off, tok, unit, qty = basket_csr(frame, vocab)
                    if split == "train":
                        fit.add_lines(frame, off, tok)
                    customer_key, past = sequence.advance(frame.select("basket_id", "cust_code", "date", "hour"))
                    memory_future = worker.submit(memory.advance, customer_key, past, off, tok)
                    streams["offsets"].append(off[1:] + written)
                    written += len(tok)
                    streams["tokens"].append(tok)
                    streams["line_log_price_ratio"].append(line_log_price_ratio(unit, tok, fit.product_log_price))
                    streams["line_quantity"].append(qty)
                    per_sample = build_split_features({split: frame}, fit.customers, fit.stores,
                                                      trip.step(frame, customer_key),
                                                      trend_scale=trend_scale)[split]
                    per_sample |= {"customer_key": customer_key, "past_baskets": past}
                    for name, values in per_sample.items():
                        streams[name].append(values)
                    if pending is not None:
                        write_memory(pending)
                    pending = memory_future
                    log.debug("tensor cache: %s weeks of %d baskets, %d lines", split, frame.height, len(tok))
                if pending is not None:
                    write_memory(pending)
                for name, stream in streams.items():
                    arrays[f"{split}/{name}"] = stream.close()
                if split == "train":
                    finished = fitter.submit(fit.finish)
            tables = finished.result()
        for name in FITTED_ARRAYS:
            save(name, getattr(tables, name))
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
                s: {"n_samples": plans[s].n_samples, "n_tokens": plans[s].n_tokens,
                    "weeks": samples_manifest["splits"][s]}
                for s in SPLITS
            },
            "sizes": {"vocab": int(vocab.height), "customers": int(tables.customer_context.shape[0]),
                      "stores": int(tables.store_context.shape[0])},
            "widths": cache_widths(tables, {"temporal": np.zeros((0, TEMPORAL_WIDTH)), "trip": np.zeros((0, TRIP_WIDTH))},
                                   config),
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
    log.info("tensor cache %s built in %.1fs (fit %.1fs; %d customers, %s (customer, product) pairs in the memory)",
             final, seconds, t_fit - t0, sequence.n_customers, f"{memory.n_pairs:,}")
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
