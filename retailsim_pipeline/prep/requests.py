"""The model's inputs for baskets a client asks about, computed by the functions that build the tensor cache.

A served model (:mod:`retailsim_pipeline.tracking.serving`) and ``retailsim predict`` take what a store
system knows while a basket is being filled, one row per basket (:data:`REQUEST_COLUMNS`):

==============  =================  ==================================================================
column          type               meaning
==============  =================  ==================================================================
customer_code   str or null        the loyalty card (null or absent: an anonymous shopper)
store_code      str                the store
timestamp       datetime / str     date and hour of the trip (ISO text accepted; minutes ignored)
products        list[str]          the basket so far, product codes in line order
quantities      list[int], opt.    per line (absent or null: 1)
spend           list[float], opt.  per line; with the quantity it gives the line's price features
                                   (absent or null: the product's median train price)
basket_id       int, optional      the till's basket id: it orders a customer's baskets within the same
                                   hour as the tensor cache does (absent: the request comes before every
                                   logged basket of its hour), and a logged basket with that id is the
                                   request itself, left out of its history
==============  =================  ==================================================================

:class:`ServingFeatures` holds everything that turns such rows into the model's inputs, in plain files
(JSON, parquet, safetensors; nothing pickled) that travel with a logged model: the cache's fitted tables
(vocabulary, product embeddings and median prices, customer profiles, store table) and the **basket log**,
every basket of every split that the customer memory and the trip context are computed from.
:meth:`ServingFeatures.request_cache` turns requests into an in-memory
:class:`~retailsim_pipeline.prep.cache.TensorCache` with one split, ``request``, by calling the very
functions :func:`~retailsim_pipeline.prep.cache_build.build_tensor_cache` calls
(:func:`~.features.trip_features_all`, :func:`~.cache_build.build_split_features`,
:func:`~.cache_build.build_history`, :func:`~.fitting.basket_csr`) on the requests and their customers'
logged baskets; the model then reads it through the same
:class:`~retailsim_pipeline.training.batches.BatchAssembler` and
:func:`~retailsim_pipeline.evaluation.positions.completion_batch` as the evaluation. So a request
made of a logged basket's visible products, customer, store and time gets exactly the inputs, hence the
ranking, the evaluation computed for it.

Point in time: a request's history is its customer's logged baskets strictly before it (date, hour,
then basket id), as in the cache; logged baskets at or after it, and other requests, never count.
Requests of the same customer are computed in separate rounds (a customer at most once per round), so
one request is never another's history. Unknown customers get the anonymous profile row and an empty
memory (as a customer never seen in train does in the cache), unknown stores row 0, unknown products
UNK (:meth:`ServingFeatures.count_unknown` says how many per request).

Size: the log is the samples' basket rows (products, spend and quantity lists included): 6.4 MB of
parquet for the demo data's 153,514 baskets (9.4 MB for the whole folder), growing linearly with
baskets, ~60 bytes each (the full LGSR data, ~47M baskets of ~500k customers, would be ~2.9 GB; a
per-customer snapshot of the memory and trip state is the way to serve at that scale, and is not
built here).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retailsim_pipeline.config import N_SPECIAL, CacheConfig
from retailsim_pipeline.prep.cache import FITTED_ARRAYS, SplitArrays, TensorCache
from retailsim_pipeline.prep.cache_build import build_history, build_split_features, line_log_price_ratio
from retailsim_pipeline.prep.features import trip_features_all
from retailsim_pipeline.prep.fitting import basket_csr, home_stores
from retailsim_pipeline.prep.samples import LABELS, SPLITS, scan_samples
from retailsim_pipeline.prep.schema import FIRST_WEEK, FIRST_WEEK_MONDAY, WEEKS_PER_YEAR

log = logging.getLogger(__name__)

REQUEST_COLUMNS: tuple[str, ...] = ("customer_code", "store_code", "timestamp", "products", "quantities", "spend",
                                    "basket_id")
REQUIRED_COLUMNS: tuple[str, ...] = ("store_code", "timestamp", "products")
#: The basket log's columns: what the trip context, the split features and the memory read.
LOG_COLUMNS: tuple[str, ...] = ("basket_id", "week", "date", "weekday", "hour", "store_code", "store_format",
                                "cust_code", "cust_price_sensitivity", "cust_lifestage", "n_lines", "products",
                                "spend", "quantity", *LABELS)
REQUEST_SPLIT = "request"

_MANIFEST = "manifest.json"
_TABLES = "tables.safetensors"
_LOG = "baskets.parquet"
_VOCABULARY = "vocabulary.parquet"
_CUSTOMERS = "customers.parquet"
_STORES = "stores.parquet"
FILES: tuple[str, ...] = (_MANIFEST, _TABLES, _LOG, _VOCABULARY, _CUSTOMERS, _STORES)


def shop_week_expr(date: pl.Expr) -> pl.Expr:
    """LGSR shop week ``YYYYWW`` of a date (weeks start on Monday; :func:`~.schema.week_code` of its index)."""
    index = (date - pl.lit(FIRST_WEEK_MONDAY)).dt.total_days() // 7
    n = index + (FIRST_WEEK % 100 - 1)
    return ((FIRST_WEEK // 100 + n // WEEKS_PER_YEAR) * 100 + n % WEEKS_PER_YEAR + 1).cast(pl.Int32)


def lgsr_weekday_expr(date: pl.Expr) -> pl.Expr:
    """LGSR weekday (1 = Sunday … 7 = Saturday) of a date: :func:`~.schema.lgsr_weekday`, vectorized."""
    return (date.dt.weekday() % 7 + 1).cast(pl.Int8)


@dataclass
class ServingFeatures:
    """The fitted tables and the basket log a served model computes its inputs from (module docstring)."""

    manifest: dict
    arrays: dict[str, np.ndarray]
    vocabulary: pl.DataFrame
    customers: pl.DataFrame
    stores: pl.DataFrame
    baskets: pl.DataFrame

    # ------------------------------------------------------------------ build, save, load

    @classmethod
    def from_cache(cls, cache: TensorCache, samples_dir: Path | None = None) -> "ServingFeatures":
        """The tables of ``cache`` and the log of its samples (every split), checked row by row against it."""
        samples_dir = Path(samples_dir) if samples_dir is not None else cache.samples_dir
        frames = []
        for split in SPLITS:
            frame = scan_samples(samples_dir, split).select(*LOG_COLUMNS).collect()
            if not np.array_equal(frame.get_column("basket_id").to_numpy(), np.asarray(cache.split(split).basket_id)):
                raise ValueError(f"{samples_dir}/{split}: the samples do not match the tensor cache {cache.path}")
            frames.append(frame.with_columns(pl.lit(split).alias("split")))
        baskets = pl.concat(frames)
        config = CacheConfig.model_validate(cache.manifest["config"])
        train_weeks = baskets.filter(pl.col("split") == "train").get_column("week").n_unique()
        manifest = {"cache_key": cache.manifest["key"], "config": config.model_dump(mode="json"),
                    "widths": cache.widths, "trend_scale": float(train_weeks),
                    "fit": cache.manifest["fit"], "splits": cache.manifest["splits"],
                    "sizes": cache.manifest["sizes"], "label_codes": cache.manifest["label_codes"]}
        return cls(manifest, {name: np.asarray(cache[name]) for name in FITTED_ARRAYS}, cache.vocabulary(),
                   cache.customers(), cache.stores(), baskets)

    def save(self, folder: Path) -> dict[str, Path]:
        """Write the files (:data:`FILES`) into ``folder``; returns name → path."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _MANIFEST).write_text(json.dumps(self.manifest, indent=2))
        save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(folder / _TABLES))
        self.baskets.write_parquet(folder / _LOG, compression="zstd")
        self.vocabulary.write_parquet(folder / _VOCABULARY)
        self.customers.write_parquet(folder / _CUSTOMERS)
        self.stores.write_parquet(folder / _STORES)
        return {name: folder / name for name in FILES}

    @classmethod
    def load(cls, folder: Path) -> "ServingFeatures":
        from safetensors.numpy import load_file

        folder = Path(folder)
        return cls(json.loads((folder / _MANIFEST).read_text()), load_file(str(folder / _TABLES)),
                   pl.read_parquet(folder / _VOCABULARY), pl.read_parquet(folder / _CUSTOMERS),
                   pl.read_parquet(folder / _STORES), pl.read_parquet(folder / _LOG))

    # ------------------------------------------------------------------ requests

    @property
    def product_codes(self) -> list[str]:
        """The product code of every token id (specials first)."""
        return self.vocabulary.get_column("PROD_CODE").cast(pl.String).to_list()

    def normalize(self, requests) -> pl.DataFrame:
        """Requests (a polars or pandas DataFrame, or a list of dicts) → the :data:`LOG_COLUMNS` frame of
        their baskets with the log's dtypes, in request order; raises ``ValueError`` naming the row and
        column of a bad value."""
        frame = requests if isinstance(requests, pl.DataFrame) else _frame_of(requests)
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"requests: missing column(s) {missing}; expected {list(REQUEST_COLUMNS)}")
        n = frame.height
        products = frame.get_column("products")
        for i, row in enumerate(products.to_list()):
            if row is None or isinstance(row, str):
                raise ValueError(f"requests row {i}, column 'products': expected a list of product codes, got {row!r}")
        lengths = products.list.len()

        def per_line(name: str, default: float, dtype) -> pl.Series:
            if name not in frame.columns:
                return pl.Series(name, [[default] * int(k) for k in lengths], dtype=pl.List(dtype))
            values = frame.get_column(name).to_list()
            out = []
            for i, (row, k) in enumerate(zip(values, lengths)):
                if row is None:
                    out.append([default] * int(k))
                    continue
                if isinstance(row, str) or not hasattr(row, "__len__"):
                    raise ValueError(f"requests row {i}, column {name!r}: expected a list (one value per product), "
                                     f"got {row!r}")
                if len(row) != k:
                    raise ValueError(f"requests row {i}, column {name!r}: {len(row)} values for {k} products")
                out.append([default if v is None else v for v in row])
            return pl.Series(name, out, dtype=pl.List(dtype))

        timestamp = frame.get_column("timestamp")
        if timestamp.dtype == pl.String:
            # The store's local time as written: a trailing UTC offset is dropped, not applied.
            try:
                parsed = timestamp.str.replace(r"(Z|[+-]\d{2}:?\d{2})$", "").str.to_datetime(strict=False)
            except pl.exceptions.ComputeError:
                # polars infers the format from the first non-null value and raises when that one is not a
                # date-time (say, a one-row request with a bad timestamp): that value is the bad one.
                i = int(timestamp.is_not_null().arg_max())
                raise ValueError(f"requests row {i}, column 'timestamp': {timestamp[i]!r} is not an ISO date-time") \
                    from None
            bad = parsed.is_null() & timestamp.is_not_null()
            if bad.any() or timestamp.is_null().any():
                i = int((bad | timestamp.is_null()).arg_max())
                raise ValueError(f"requests row {i}, column 'timestamp': {timestamp[i]!r} is not an ISO date-time")
            timestamp = parsed
        elif isinstance(timestamp.dtype, pl.Datetime) and timestamp.dtype.time_zone is not None:
            timestamp = timestamp.dt.replace_time_zone(None)  # the wall-clock time in its own zone
        elif timestamp.dtype == pl.Date:
            timestamp = timestamp.cast(pl.Datetime)
        elif not isinstance(timestamp.dtype, pl.Datetime):
            raise ValueError(f"requests column 'timestamp': {timestamp.dtype} is not a date-time")
        if timestamp.is_null().any():
            raise ValueError(f"requests row {int(timestamp.is_null().arg_max())}, column 'timestamp': missing")
        if frame.get_column("store_code").is_null().any():
            raise ValueError(f"requests row {int(frame.get_column('store_code').is_null().arg_max())}, "
                             f"column 'store_code': missing")
        customer = (frame.get_column("customer_code").cast(pl.String) if "customer_code" in frame.columns
                    else pl.Series("customer_code", [None] * n, dtype=pl.String))
        # Ordering within the hour: the till's basket id, else before every logged basket (ids are ≥ 0).
        given = (frame.get_column("basket_id").cast(pl.Int64) if "basket_id" in frame.columns
                 else pl.Series("basket_id", [None] * n, dtype=pl.Int64))
        synthetic = pl.Series("basket_id", -np.arange(1, n + 1, dtype=np.int64))
        spend = per_line("spend", float("nan"), pl.Float64)
        quantity = per_line("quantities", 1, pl.Int64)

        cards = (self.baskets.filter(pl.col("cust_code").is_not_null())
                 .sort("date", "hour", "basket_id").group_by(pl.col("cust_code").cast(pl.String)).last()
                 .select(pl.col("cust_code").cast(pl.String), "cust_price_sensitivity", "cust_lifestage"))
        stores = (self.baskets.group_by(pl.col("store_code").cast(pl.String)).last()
                  .select(pl.col("store_code").cast(pl.String), "store_format"))
        first_label = {label: self.baskets.schema[label].categories[0] if hasattr(self.baskets.schema[label], "categories")
                       else None for label in LABELS}
        out = pl.DataFrame({
            "basket_id": given.fill_null(synthetic),
            "date": timestamp.dt.date(),
            "hour": timestamp.dt.hour().cast(pl.Int8),
            "store_code": frame.get_column("store_code").cast(pl.String),
            "cust_code": customer,
            "products": products.cast(pl.List(pl.String)),
            "spend": spend,
            "quantity": quantity,
        }).with_columns(
            shop_week_expr(pl.col("date")).alias("week"),
            lgsr_weekday_expr(pl.col("date")).alias("weekday"),
            pl.col("products").list.len().cast(pl.Int32).alias("n_lines"),
            *[pl.lit(first_label[label]).alias(label) for label in LABELS],
        ).join(cards, on="cust_code", how="left", maintain_order="left").join(
            stores, on="store_code", how="left", maintain_order="left")
        duplicated = out.get_column("basket_id").is_duplicated()
        if duplicated.any():
            i = int(duplicated.arg_max())
            raise ValueError(f"requests row {i}, column 'basket_id': {out['basket_id'][i]} appears more than once")
        schema = self.baskets.schema
        return out.select(pl.col(c).cast(schema[c]) for c in LOG_COLUMNS)

    def count_unknown(self, requests) -> np.ndarray:
        """[n] int64: products of each request not in the model's vocabulary (they enter as UNK)."""
        frame = self.normalize(requests)
        known = set(self.product_codes[N_SPECIAL:])
        return np.array([sum(code not in known for code in row) for row in frame.get_column("products").to_list()],
                        dtype=np.int64)

    def request_cache(self, requests) -> TensorCache:
        """The requests as a :class:`TensorCache` with one split, :data:`REQUEST_SPLIT`, in request order:
        the fitted tables of the cache, and per request the arrays the cache builds for a basket."""
        frame = self.normalize(requests)
        config = CacheConfig.model_validate(self.manifest["config"])
        vocab = self.vocabulary
        train = self.baskets.filter(pl.col("split") == "train")
        home = home_stores(train)
        # Rounds: a customer's i-th request goes to round i (anonymous requests all to round 0).
        rounds = frame.select(
            pl.when(pl.col("cust_code").is_null()).then(0).otherwise(pl.int_range(pl.len()).over("cust_code"))
        ).to_series().to_numpy()
        parts: list[tuple[np.ndarray, dict[str, np.ndarray], tuple]] = []
        for r in range(int(rounds.max(initial=-1)) + 1):
            rows = np.flatnonzero(rounds == r)
            request = frame[rows]
            customers = request.get_column("cust_code").drop_nulls().cast(pl.String)
            logged = (self.baskets.filter(pl.col("cust_code").cast(pl.String).is_in(customers.implode())
                                          & ~pl.col("basket_id").is_in(request.get_column("basket_id").implode()))
                      .select(*LOG_COLUMNS))
            frames = {"log": logged, REQUEST_SPLIT: request}
            trip = trip_features_all(frames, home)
            features = build_split_features({REQUEST_SPLIT: request}, self.customers, self.stores, trip,
                                            trend_scale=float(self.manifest["trend_scale"]))[REQUEST_SPLIT]
            csr = {name: basket_csr(f, vocab) for name, f in frames.items()}
            features.update(build_history(frames, csr, config.history_items, config.memory_decay)[REQUEST_SPLIT])
            parts.append((rows, features, csr[REQUEST_SPLIT]))
        return self._assemble(frame.height, parts)

    def _assemble(self, n: int, parts: list) -> TensorCache:
        """Scatter the rounds' arrays back into request order; the CSR lines follow their baskets."""
        if not parts:
            raise ValueError("requests: no rows")
        order = np.concatenate([rows for rows, _, _ in parts])  # request row of each stacked basket
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n)
        stacked = {name: np.concatenate([f[name] for _, f, _ in parts]) for name in parts[0][1]}
        lengths = np.concatenate([np.diff(csr[0]) for _, _, csr in parts])
        line_starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
        tok = np.concatenate([csr[1] for _, _, csr in parts])
        unit = np.concatenate([csr[2] for _, _, csr in parts])
        qty = np.concatenate([csr[3] for _, _, csr in parts])
        # Baskets in request order: stacked index of request i is position[i].
        src = position
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths[src], out=offsets[1:])
        line = np.repeat(line_starts[src], lengths[src]) + (np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths[src]))
        arrays = {f"{REQUEST_SPLIT}/{name}": value[src] for name, value in stacked.items()}
        tokens = tok[line]
        arrays[f"{REQUEST_SPLIT}/offsets"] = offsets
        arrays[f"{REQUEST_SPLIT}/tokens"] = tokens
        arrays[f"{REQUEST_SPLIT}/line_log_price_ratio"] = line_log_price_ratio(unit[line], tokens,
                                                                              self.arrays["product_log_price"])
        arrays[f"{REQUEST_SPLIT}/line_quantity"] = qty[line]
        arrays.update(self.arrays)
        missing = set(SplitArrays.__dataclass_fields__) - {k.split("/", 1)[1] for k in arrays if "/" in k}
        assert not missing, missing
        manifest = {"key": f"request-{self.manifest['cache_key']}", "widths": self.manifest["widths"],
                    "config": self.manifest["config"], "splits": {REQUEST_SPLIT: {"n_samples": n}}}
        return TensorCache(Path(f"<requests of {self.manifest['cache_key']}>"), manifest, arrays)


def _frame_of(requests) -> pl.DataFrame:
    """A polars frame of a pandas DataFrame or a list of dicts (array cells, as MLflow's schema enforcement
    leaves them, become lists; missing keys become nulls)."""
    records = requests.to_dict("records") if hasattr(requests, "to_dict") else list(requests)

    def plain(value):
        if hasattr(value, "tolist"):
            return value.tolist()
        if isinstance(value, float) and value != value:  # NaN: pandas' missing value
            return None
        return value

    columns = [c for c in REQUEST_COLUMNS if any(c in r for r in records)]
    extra = sorted({c for r in records for c in r} - set(REQUEST_COLUMNS))
    if extra:
        raise ValueError(f"requests: unknown column(s) {extra}; expected {list(REQUEST_COLUMNS)}")
    data = {c: [plain(r.get(c)) for r in records] for c in columns}
    # polars would read a text cell of a list column as a list of characters, and fail on a number
    # without naming the row: reject both here.
    for c in ("products", "quantities", "spend"):
        for i, value in enumerate(data.get(c, ())):
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f"requests row {i}, column {c!r}: expected a list, got {value!r}")
    schema = {"customer_code": pl.String, "store_code": pl.String, "products": pl.List(pl.String),
              "quantities": pl.List(pl.Int64), "spend": pl.List(pl.Float64), "basket_id": pl.Int64}
    try:
        return pl.DataFrame(data, schema={c: schema.get(c) for c in columns}, strict=False)
    except (TypeError, ValueError, pl.exceptions.PolarsError) as err:
        raise ValueError(f"requests: {err}") from err


#: The per-line columns of a CSV of requests: one cell holds the basket's values separated by spaces.
CSV_LIST_COLUMNS: dict[str, type] = {"products": str, "quantities": int, "spend": float}


def read_requests(path: Path) -> pl.DataFrame:
    """Requests from a file (``retailsim predict --input``): every column, in file order; raises
    ``ValueError`` naming the file, and the row and column of a bad value.

    - **parquet**: read as is (``products``, ``quantities``, ``spend`` are list columns).
    - **csv** (header row, comma-separated, every value read as text): the per-line columns
      (:data:`CSV_LIST_COLUMNS`) hold the basket's values **separated by spaces**, e.g.
      ``PRD0900001 PRD0900002`` and ``1 2`` and ``1.50 0.99``; an empty ``products`` cell is an empty
      basket, an empty ``quantities``/``spend`` cell means "not given". ``basket_id`` must be an integer.
      Rows are counted from 0, the header excluded (row *i* is line *i* + 2 of the file).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"{path}: expected a .csv or .parquet file")
    try:
        frame = pl.read_parquet(path) if suffix != ".csv" else pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise ValueError(f"{path}: cannot read it: {err}") from err
    if suffix != ".csv":
        return frame

    def where(i: int, column: str) -> str:
        return f"{path}: row {i} (line {i + 2}), column {column!r}"

    columns = []
    for name, kind in CSV_LIST_COLUMNS.items():
        if name not in frame.columns:
            continue
        values = []
        for i, cell in enumerate(frame.get_column(name).to_list()):
            text = (cell or "").strip()
            if text.startswith("["):
                raise ValueError(f"{where(i, name)}: {cell!r}: write the values separated by spaces, not as a list")
            if not text:
                values.append([] if name == "products" else None)
                continue
            try:
                values.append([kind(v) for v in text.split()])
            except ValueError:
                raise ValueError(f"{where(i, name)}: {cell!r} is not a list of {kind.__name__} separated by "
                                 f"spaces") from None
        dtype = {str: pl.String, int: pl.Int64, float: pl.Float64}[kind]
        columns.append(pl.Series(name, values, dtype=pl.List(dtype)))
    if "basket_id" in frame.columns:
        raw = frame.get_column("basket_id")
        ids = raw.str.strip_chars().cast(pl.Int64, strict=False)
        bad = ids.is_null() & raw.is_not_null() & (raw.str.strip_chars() != "")
        if bad.any():
            i = int(bad.arg_max())
            raise ValueError(f"{where(i, 'basket_id')}: {raw[i]!r} is not an integer")
        columns.append(ids)
    return frame.with_columns(columns)
