"""The tensor cache's reader: every array the world model reads, in one content-addressed, memory-mapped folder.

This module only reads (numpy and the standard library at import time; polars is imported by the
methods that return a frame), so training, evaluation and serving load it cheaply. The writer is
:mod:`~retailsim_pipeline.prep.cache_build`, the checks :mod:`~retailsim_pipeline.prep.cache_checks`,
the features :mod:`~retailsim_pipeline.prep.features`, the fitted tables :mod:`~retailsim_pipeline.prep.fitting`.

Layout of ``cache/<key>/`` (``key`` = hash of the upstream samples version, the config and
:data:`CACHE_FORMAT`; the folder is built under a temporary name and renamed, so it is complete or absent):

====================================  ==================  =============================================
file                                  shape, dtype        contents
====================================  ==================  =============================================
manifest.json                                             shapes, dtypes, sha256 of every array, the
                                                          upstream data version, config and its hash,
                                                          the weeks the tables were fitted on, the
                                                          width of every vector (``widths``)
vocabulary.parquet                    V rows              token_id, PROD_CODE, train_count, hierarchy
product_embeddings.npy                [V, 256] float32    see :func:`~retailsim_pipeline.prep.embeddings.build_product_embeddings`
product_log_price.npy                 [V] float32         log of the product's median train unit price
product_neighbours.npy,               [V, 100] int32,     each product's most co-occurring products in
product_neighbour_weights.npy         [V, 100] float32    train baskets (cosine), most similar first
customer_context.npy                  [C, 32] float32     the customer's profile (card, home-store
                                                          format); row 0 = anonymous or unknown (not
                                                          seen in train) customer
customers.parquet                     C - 1 rows          cust_code → row
store_context.npy                     [S, 96] float32     row 0 = store not seen in train
stores.parquet                        S - 1 rows          store_code → row
<split>/offsets.npy                   [N + 1] int64       CSR offsets of the basket tokens
<split>/tokens.npy                    [L] int32           token ids in line order (≤ 50 per basket)
<split>/line_log_price_ratio.npy      [L] float32         log(unit price / product's train median)
<split>/line_quantity.npy             [L] int16           QUANTITY of the line
<split>/customer_index.npy            [N] int32           row of customer_context
<split>/customer_key.npy              [N] int32           the customer over every split (0 = anonymous)
<split>/past_baskets.npy              [N] int32           the customer's baskets before this one
<split>/history_tokens.npy,           [N, 32] int32,      the 32 products of the customer's baskets
<split>/history_counts.npy,           [N, 32] uint16,     before this one with the largest decayed share
<split>/history_recency.npy,          [N, 32] uint16,     of those baskets, their line counts, baskets
<split>/history_decayed.npy           [N, 32] float16     since each was last bought, and that share
                                                          (:mod:`~.history`: the point-in-time memory)
<split>/store_index.npy               [N] int32           row of store_context
<split>/temporal.npy                  [N, 64] float16     :func:`~.features.temporal_features`
<split>/trip.npy                      [N, 48] float16     :func:`~.features.trip_features`
<split>/labels.npy                    [N, 4] int8         class index of the four labels (schema order)
<split>/basket_id.npy, week.npy,      [N]                 ids for joining back, full line count
n_lines.npy
====================================  ==================  =============================================

Vocabulary: PAD = 0, MASK = 1, UNK = 2, then every product seen in the train split by descending
train frequency (ties by code). Price features [lines, 64] are computed on the fly from the line's
log price ratio and the product's log price by :func:`~.features.price_features` (storing them would cost
128 bytes a line).

Leakage rules (DESIGN §3, issue 11): everything *fitted* — vocabulary, product embeddings, median
prices, customer profile and store tables, the standardisation of their statistics — uses train
baskets only; a basket's *history* features (the memory, its history vector, the trip context's past
trips, days since the last one, past missions) use every basket of the same customer strictly before
it, in any split, and nothing at or after it. :func:`~.cache_checks.check_leakage` verifies both on a
built cache.
"""

import json
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retailsim_pipeline.prep.files import file_sha256

if TYPE_CHECKING:
    import polars as pl

#: Bump when the cache's layout or any feature definition changes: it is part of the content address,
#: and :meth:`TensorCache.open` refuses a folder of another format.
CACHE_FORMAT = 5  # 2: customer history items; 3: the vectors' widths; 4: point-in-time history, neighbours;
#: 5: the memory's recency and decayed share
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
VOCABULARY_FILE = "vocabulary.parquet"
CUSTOMERS_FILE = "customers.parquet"
STORES_FILE = "stores.parquet"
#: The arrays fitted on the train split (the leakage check refits each and compares).
FITTED_ARRAYS: tuple[str, ...] = ("product_embeddings", "product_log_price", "customer_context", "store_context",
                                  "product_neighbours", "product_neighbour_weights")
#: The per-sample arrays of the point-in-time history (the leakage check recomputes each).
HISTORY_ARRAYS: tuple[str, ...] = ("customer_key", "past_baskets", "history_tokens", "history_counts",
                                   "history_recency", "history_decayed")


@dataclass(frozen=True)
class SplitArrays:
    """Memory-mapped arrays of one split (see the module docstring for shapes)."""

    offsets: np.ndarray
    tokens: np.ndarray
    line_log_price_ratio: np.ndarray
    line_quantity: np.ndarray
    customer_index: np.ndarray
    customer_key: np.ndarray
    past_baskets: np.ndarray
    history_tokens: np.ndarray
    history_counts: np.ndarray
    history_recency: np.ndarray
    history_decayed: np.ndarray
    store_index: np.ndarray
    temporal: np.ndarray
    trip: np.ndarray
    labels: np.ndarray
    basket_id: np.ndarray
    week: np.ndarray
    n_lines: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


def advise_random(arr: np.ndarray) -> bool:
    """Tell the kernel that ``arr`` — a memory-mapped array or a view of one — is read at random places:
    a page fault then reads the page asked for instead of the ~128 KiB around it (``MADV_RANDOM``).
    On a cache larger than the page cache (the full-scale one is 21 GB) a shuffled batch touches a few
    bytes in thousands of places, and the read-around made every batch read ~30x the bytes it needs.
    Affects every view of the same mapping; a cache opened again gets a fresh one. Returns whether the
    advice was given (False: not memory-mapped, or no ``madvise`` here)."""
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        own = getattr(base, "_mmap", None)
        base = own if own is not None else getattr(base, "base", None)
    if base is None or not hasattr(mmap, "MADV_RANDOM"):
        return False
    base.madvise(mmap.MADV_RANDOM)
    return True


class TensorCache:
    """A built tensor cache, opened read-only with every array memory-mapped."""

    def __init__(self, path: Path, manifest: dict, arrays: dict[str, np.ndarray]):
        self.path = path
        self.manifest = manifest
        self._arrays = arrays

    @classmethod
    def open(cls, path: Path, *, verify_hashes: bool = False) -> "TensorCache":
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path}: not a tensor cache (no manifest)")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"{manifest_path}: a tensor cache of format {manifest.get('format')}, this code reads "
                             f"format {CACHE_FORMAT}; rebuild it with `retailsim run --select key:tensor_cache`")
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
        if not re.fullmatch(r"[0-9a-f]{8,64}", key) or not (Path(cache_root) / key / MANIFEST_FILE).is_file():
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

    @property
    def widths(self) -> dict[str, int]:
        """Width of every vector the model reads: product, price, customer, store, temporal, trip and
        context (= customer + temporal + store + trip)."""
        return dict(self.manifest["widths"])

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> SplitArrays:
        if name not in self.manifest["splits"]:
            raise ValueError(f"unknown split {name!r}; one of {self.split_names}")
        return SplitArrays(**{f: self._arrays[f"{name}/{f}"] for f in SplitArrays.__dataclass_fields__})

    def vocabulary(self) -> "pl.DataFrame":
        """token_id, PROD_CODE, train_count and the hierarchy codes, in token order."""
        return self._table(VOCABULARY_FILE)

    def customers(self) -> "pl.DataFrame":
        """cust_code → row of ``customer_context``, with the customer's home store."""
        return self._table(CUSTOMERS_FILE)

    def stores(self) -> "pl.DataFrame":
        """store_code → row of ``store_context``, with the store's format."""
        return self._table(STORES_FILE)

    def _table(self, file: str) -> "pl.DataFrame":
        import polars as pl  # here, not at import: readers of the arrays alone never load polars

        return pl.read_parquet(self.path / file)
