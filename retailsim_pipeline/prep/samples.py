"""Basket samples: one row per basket, split in time into train / validation / test (DESIGN §3).

Contract of ``samples/<split>.parquet`` (one file per split, rows ordered by week, then file order):

=========================  ==============================  ==========================================
column                     dtype                           meaning
=========================  ==============================  ==========================================
basket_id                  Int64                           BASKET_ID
week                       Int32                           SHOP_WEEK (YYYYWW)
date                       Date                            SHOP_DATE
weekday                    Int8                            1 = Sunday … 7 = Saturday
hour                       Int8                            0–23
store_code                 Categorical                     STORE_CODE
store_format               Enum LS/MS/SS/XLS               STORE_FORMAT
store_region               Categorical                     STORE_REGION
cust_code                  Categorical, null = anonymous   CUST_CODE
cust_price_sensitivity     Enum, nullable                  the card holder's segment (known up front)
cust_lifestage             Enum, nullable                  the card holder's segment (known up front)
n_lines                    UInt32                          lines in the basket before truncation
products                   List[Categorical] (≤ max len)   PROD_CODE in line order, first 50 lines
spend                      List[Float64]                   SPEND of those lines
quantity                   List[Int32]                     QUANTITY of those lines
basket_size …              Enum                            the four labels, never input features
=========================  ==============================  ==========================================

The split is by SHOP_WEEK: with the default fractions the last ~10 % of weeks are test and the
~10 % before them validation, so every validation basket comes after every train basket and every
test basket after every validation basket. Work is streamed a few weeks at a time (bounded
memory), and each split file is written to a temporary name and renamed.
"""

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from retailsim_pipeline.config import BASKET_LENGTH_EDGES, SplitConfig, length_bucket_labels
from retailsim_pipeline.prep.files import file_sha256, write_parquet_atomic
from retailsim_pipeline.prep.schema import LABEL_COLUMNS, week_of_file

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Product → hierarchy dimension table written beside the splits (product embeddings need it).
PRODUCTS_FILE = "products.parquet"
PRODUCT_DIMENSION_KEYS = ["PROD_CODE", "PROD_CODE_10", "PROD_CODE_20", "PROD_CODE_30", "PROD_CODE_40"]
LABELS: tuple[str, ...] = tuple(c.lower() for c in LABEL_COLUMNS)
MANIFEST_NAME = "_samples.json"

#: Rows (transaction lines) gathered before one group-by: large enough to amortise per-call
#: overhead, small enough to bound memory (~1 GB at the widest).
_ROWS_PER_CHUNK = 4_000_000


@dataclass(frozen=True)
class SplitWeeks:
    """First and last week of each split (inclusive), in YYYYWW codes."""

    train: tuple[int, int]
    validation: tuple[int, int]
    test: tuple[int, int]

    def of(self, week: int) -> str:
        for name in SPLITS:
            lo, hi = getattr(self, name)
            if lo <= week <= hi:
                return name
        raise ValueError(f"week {week} is outside every split")


class EmptySplitError(ValueError):
    """The ingested data cannot fill a split: the message names the split, the weeks available and
    the weeks the configuration asks for."""


def _span(weeks: list[int]) -> str:
    return "none" if not weeks else f"{weeks[0]}" if len(weeks) == 1 else f"{weeks[0]}…{weeks[-1]}"


def split_weeks(weeks: list[int], config: SplitConfig) -> SplitWeeks:
    """Assign sorted distinct ``weeks`` to train < validation < test per ``config``.

    Raises :class:`EmptySplitError` naming the first empty split, the weeks available and what
    the configuration asks for.
    """
    weeks = sorted(set(weeks))
    if config.test_start_week is not None and config.validation_start_week is not None:
        v, t = config.validation_start_week, config.test_start_week
        train = [w for w in weeks if w < v]
        val = [w for w in weeks if v <= w < t]
        test = [w for w in weeks if w >= t]
        asked = {"train": f"weeks before {v}", "validation": f"weeks {v} to before {t} (validation_start_week, "
                 "test_start_week)", "test": f"weeks from {t} on (test_start_week)"}
    else:
        n = len(weeks)
        n_test = max(1, math.ceil(n * config.test_fraction - 1e-9))
        n_val = max(1, math.ceil(n * config.validation_fraction - 1e-9))
        test, val, train = weeks[n - n_test:], weeks[n - n_test - n_val:n - n_test], weeks[:n - n_test - n_val]
        asked = {"train": f"the weeks before the last {n_test + n_val} (validation and test take those)",
                 "validation": f"{n_val} week(s) (validation_fraction {config.validation_fraction})",
                 "test": f"the last {n_test} week(s) (test_fraction {config.test_fraction})"}
    for name, part in (("train", train), ("validation", val), ("test", test)):
        if not part:
            raise EmptySplitError(
                f"split {name!r} would be empty: {len(weeks)} week(s) with valid rows available "
                f"({_span(weeks)}), and the {name} split asks for {asked[name]}. Add weeks of data or change "
                "the split (SplitConfig / the basket_samples config)."
            )
    return SplitWeeks((train[0], train[-1]), (val[0], val[-1]), (test[0], test[-1]))


def baskets_from_lines(lines: pl.LazyFrame, max_basket_len: int = 50) -> pl.LazyFrame:
    """One row per basket from typed transaction lines (file order kept = line order).

    Basket-level fields are taken from the basket's first line (they are constant within a basket
    in LGSR files).
    """
    first = [
        pl.col("SHOP_WEEK").first().alias("week"),
        pl.col("SHOP_DATE").first().alias("__date"),
        pl.col("SHOP_WEEKDAY").first().alias("weekday"),
        pl.col("SHOP_HOUR").first().alias("hour"),
        pl.col("STORE_CODE").first().alias("store_code"),
        pl.col("STORE_FORMAT").first().alias("store_format"),
        pl.col("STORE_REGION").first().alias("store_region"),
        pl.col("CUST_CODE").first().alias("cust_code"),
        pl.col("CUST_PRICE_SENSITIVITY").first().alias("cust_price_sensitivity"),
        pl.col("CUST_LIFESTAGE").first().alias("cust_lifestage"),
    ]
    return (
        lines.group_by("BASKET_ID", maintain_order=True)
        .agg(
            *first,
            pl.len().alias("n_lines"),
            pl.col("PROD_CODE").head(max_basket_len).alias("products"),
            pl.col("SPEND").head(max_basket_len).alias("spend"),
            pl.col("QUANTITY").head(max_basket_len).alias("quantity"),
            *[pl.col(c).first().alias(c.lower()) for c in LABEL_COLUMNS],
        )
        .rename({"BASKET_ID": "basket_id"})
        .with_columns(
            pl.date(pl.col("__date") // 10000, (pl.col("__date") // 100) % 100, pl.col("__date") % 100).alias("date")
        )
        .select(
            "basket_id", "week", "date", "weekday", "hour", "store_code", "store_format", "store_region",
            "cust_code", "cust_price_sensitivity", "cust_lifestage", "n_lines", "products", "spend", "quantity",
            *LABELS,
        )
    )


@dataclass
class SamplesResult:
    """What :func:`build_basket_samples` wrote."""

    paths: dict[str, Path]
    sha256: dict[str, str]
    splits: SplitWeeks
    counts: dict[str, int]
    lines: int
    length_histogram: dict[str, int] = field(default_factory=dict)
    source_weeks: list[int] = field(default_factory=list)
    empty_weeks: list[int] = field(default_factory=list)

    @property
    def data_version(self) -> str:
        """Content hash of the three split files (changes iff the samples change)."""
        return hashlib.sha256("".join(self.sha256[s] for s in SPLITS).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "paths": {k: str(v) for k, v in self.paths.items()},
            "sha256": self.sha256,
            "splits": {s: list(getattr(self.splits, s)) for s in SPLITS},
            "counts": self.counts,
            "lines": self.lines,
            "length_histogram": self.length_histogram,
            "source_weeks": self.source_weeks,
            "empty_weeks": self.empty_weeks,
            "data_version": self.data_version,
        }


def weekly_transaction_files(transactions_dir: Path) -> dict[int, Path]:
    """Typed weekly parquet files written by ingestion, by week code."""
    files = {}
    for path in sorted(Path(transactions_dir).glob("transactions_*.parquet")):
        week = week_of_file(path.stem + ".csv")
        if week is not None:
            files[week] = path
    return files


def _chunks(files: list[tuple[int, Path]], rows_by_week: dict[int, int] | None = None
            ) -> list[list[tuple[int, Path]]]:
    """Consecutive weeks grouped so that each group holds about ``_ROWS_PER_CHUNK`` lines
    (row counts from ``rows_by_week`` when the caller has them, else from each file's footer)."""
    chunks, current, rows = [], [], 0
    for week, path in files:
        n = rows_by_week[week] if rows_by_week is not None else pq.ParquetFile(path).metadata.num_rows
        if current and rows + n > _ROWS_PER_CHUNK:
            chunks.append(current)
            current, rows = [], 0
        current.append((week, path))
        rows += n
    if current:
        chunks.append(current)
    return chunks


def _product_dimension(lines: pl.LazyFrame) -> pl.LazyFrame:
    return lines.group_by(PRODUCT_DIMENSION_KEYS).agg(
        pl.col("SHOP_WEEK").min().alias("first_week"), pl.col("SHOP_WEEK").max().alias("last_week")
    )


def read_manifest(samples_dir: Path) -> dict:
    path = Path(samples_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no basket samples here; materialize basket_samples first")
    return json.loads(path.read_text())


_LENGTH_LABELS = length_bucket_labels(BASKET_LENGTH_EDGES)


def _length_bin(n: pl.Expr) -> pl.Expr:
    """The :data:`~retailsim_pipeline.config.BASKET_LENGTH_EDGES` bucket label of each basket length."""
    expr = pl.lit(_LENGTH_LABELS[0])
    for edge, label in zip(BASKET_LENGTH_EDGES[1:], _LENGTH_LABELS[1:]):
        expr = pl.when(n >= edge).then(pl.lit(label)).otherwise(expr)
    return expr


def build_basket_samples(
    transactions_dir: Path, out_dir: Path, config: SplitConfig | None = None
) -> SamplesResult:
    """Stream typed weekly transactions into ``out_dir/{train,validation,test}.parquet``."""
    config = config or SplitConfig()
    found = weekly_transaction_files(transactions_dir)
    if not found:
        raise FileNotFoundError(f"{transactions_dir}: no transactions_*.parquet; ingest raw files first")
    # A week without a valid row (header only, everything quarantined) must not shift the split.
    rows = {w: pq.ParquetFile(p).metadata.num_rows for w, p in found.items()}
    by_week = {w: p for w, p in found.items() if rows[w] > 0}
    empty = sorted(set(found) - set(by_week))
    if not by_week:
        raise EmptySplitError(
            f"{transactions_dir}: no valid rows: {len(found)} ingested week(s) ({_span(sorted(found))}) and every "
            "one is empty (all rows quarantined, or header only); see the quarantine folder for the reasons"
        )
    if empty:
        log.warning("basket samples: %d week(s) without a valid row left out of the split: %s", len(empty),
                    ", ".join(map(str, empty)))
    splits = split_weeks(list(by_week), config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = {s: out_dir / f"{s}.parquet" for s in SPLITS}
    tmp = {s: out_dir / f".{s}.parquet.tmp-{os.getpid()}" for s in SPLITS}
    # Each chunk's share of a split is written as a part (polars' own writer: ~3x pyarrow's on list
    # columns); a split made of several parts is then streamed into one file.
    parts: dict[str, list[Path]] = {s: [] for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    histogram: dict[str, int] = {}
    lines = 0
    products: list[pl.DataFrame] = []
    try:
        for i, chunk in enumerate(_chunks(sorted(by_week.items()), rows)):
            chunk_lines = pl.scan_parquet([p for _, p in chunk])
            frame, dimension_part = pl.collect_all(
                [baskets_from_lines(chunk_lines, config.max_basket_len), _product_dimension(chunk_lines)]
            )
            products.append(dimension_part)
            lines += int(frame.get_column("n_lines").sum())
            for label, n in frame.group_by(_length_bin(pl.col("n_lines")).alias("bin")).len().iter_rows():
                histogram[label] = histogram.get(label, 0) + n
            for name in SPLITS:
                lo, hi = getattr(splits, name)
                part = frame.filter(pl.col("week").is_between(lo, hi))
                if part.is_empty():
                    continue
                path = out_dir / f".{name}.part{i:04d}.tmp-{os.getpid()}"
                parts[name].append(path)
                part.write_parquet(path, compression="lz4", statistics=True)
                counts[name] += len(part)
        missing = [name for name in SPLITS if counts[name] == 0]
        if missing:  # unreachable while every split week has rows; never rename a split that was not written
            raise EmptySplitError(f"split(s) {', '.join(missing)} received no basket from weeks "
                                  f"{', '.join(f'{n} {getattr(splits, n)}' for n in missing)}")
        for name in SPLITS:
            if len(parts[name]) == 1:
                os.replace(parts[name][0], tmp[name])
            else:
                pl.scan_parquet(parts[name]).sink_parquet(tmp[name], compression="lz4", statistics=True)
        dimension = (
            pl.concat(products).group_by(PRODUCT_DIMENSION_KEYS)
            .agg(pl.col("first_week").min(), pl.col("last_week").max())
            .sort("first_week", "PROD_CODE")
        )
        write_parquet_atomic(dimension, out_dir / PRODUCTS_FILE)
        for name in SPLITS:
            os.replace(tmp[name], final[name])
    finally:
        for p in [*tmp.values(), *(q for ps in parts.values() for q in ps)]:
            p.unlink(missing_ok=True)
    order = _LENGTH_LABELS
    result = SamplesResult(
        paths=final,
        sha256={name: file_sha256(path) for name, path in final.items()},
        splits=splits,
        counts=counts,
        lines=lines,
        length_histogram={k: histogram[k] for k in order if k in histogram},
        source_weeks=sorted(by_week),
        empty_weeks=empty,
    )
    manifest = out_dir / MANIFEST_NAME
    tmp_manifest = out_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(result.to_json(), indent=2))
    os.replace(tmp_manifest, manifest)
    log.info("basket samples: %s", ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return result


def read_samples(samples_dir: Path, split: str) -> pl.DataFrame:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    return pl.read_parquet(Path(samples_dir) / f"{split}.parquet")


def scan_samples(samples_dir: Path, split: str) -> pl.LazyFrame:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    return pl.scan_parquet(Path(samples_dir) / f"{split}.parquet")
