#!/usr/bin/env python
"""Benchmark of the data preparation: raw weekly CSVs → basket_samples → tensor_cache.

Usage::

    python benchmarks/bench_prep.py [--rows N] [--json PATH] [--workdir DIR] [--pandas-rows M]
                                    [--keep] [--no-scaling] [--per-file]
    python benchmarks/bench_prep.py --real DIR [--repeat N] [--json PATH] [--workdir DIR] [--keep] [--per-file]
    python benchmarks/bench_prep.py --preset full --weeks N [M ...] [--seed S] [--json PATH] [--workdir DIR]
                                    [--keep] [--per-file]

What it does (the issue's spec):

1. Generates ~N rows (default 10M) once with the generator (``demo`` preset scaled to N rows),
   cached in ``--workdir`` keyed by the config, so a rerun skips generation.
2. Times, each in a *fresh* Python process, raw → basket_samples (ingest every weekly CSV, then
   ``build_basket_samples``) and basket_samples → tensor_cache (``build_tensor_cache(force=True)``):
   rows/s and peak RSS.
3. Repeats 2 at N/4 rows (own, smaller data set) to show how peak memory grows with rows
   (skip with ``--no-scaling``).
4. Runs a pandas reference that does what the seed's ``WorldModelDataset`` did — ``pd.read_csv``
   of the transactions, a Python loop over rows building each basket's product list, then one
   ``.iloc`` per sample to assemble its row — on whole weekly files making up the first ~M rows
   (default 1M), and our raw → basket_samples on exactly the same files: speed ratio.

It prints a table, the target checks (ok / MISS), and a final line::

    RESULT raw_to_samples_rows_per_s=… prep_rows_per_s=… peak_rss_mb=… speedup_vs_pandas=… [extra keys]

and writes the same keys (plus the machine) as JSON with ``--json PATH``.

Real data: ``--real DIR``
-------------------------
``--real DIR`` (e.g. ``--real ../shared/lgsr_real/weekly``, the published LGSR weeks as
``transactions_YYYYWW.csv.gz``) skips the generated data entirely and races our raw → basket_samples
against two bare-minimum peers on the real files:

- The ``.csv.gz`` files are unpacked once into ``<workdir>/real-csv-<hash of names and sizes>/``
  (reused when present; plain ``.csv`` inputs are used where they are). All contenders read these
  same plain CSVs, from a warm page cache: the parent reads every file once (counting its lines)
  before the first timing.
- **ours**: exactly the ``raw_to_samples`` child above: ``ingest_weekly_files`` over the files, as
  ``raw_transactions`` runs it over a range of weeks (weeks validated together in batches of up to
  64 MB of CSV, ~16 published weeks; outputs per file), with header aliases ``seg_1``/``seg_2``,
  coded segment values, quoted empty strings, every contract check, quarantine and typed parquet;
  then ``build_basket_samples`` (one row per basket, time split into train / validation / test,
  product dimension table). Ingest and samples are timed apart. ``--per-file`` ingests with
  ``ingest_weekly_file`` on each file instead (the path before batching), to compare the two.
- **polars**: ``pl.scan_csv(files, schema=…)`` with the header's own names (ints for
  SHOP_WEEK/SHOP_DATE/SHOP_WEEKDAY/SHOP_HOUR/QUANTITY/BASKET_ID, Float64 SPEND, String for every
  other column), ``with_row_index`` (the line), ``group_by("BASKET_ID")`` with ``.first()`` of each
  basket-level field, ``pl.len()`` and the first 50 PROD_CODE/SPEND/QUANTITY as lists (polars keeps
  the rows' order inside a group), ``sink_parquet``.
- **DuckDB** (the ``bench`` extra; skipped with a note when ``duckdb`` is not installed):
  ``read_csv([files], header=true, columns={same types})``, ``row_number() OVER ()`` as the line
  (its CSV reader has no per-file row number; insertion order is preserved), ``GROUP BY BASKET_ID``
  with ``list(x ORDER BY line)[1:50]`` for PROD_CODE/SPEND/QUANTITY, ``any_value`` for the
  basket-level fields, ``count(*)``, ``COPY … TO '….parquet' (FORMAT parquet)``, default threads
  (all cores).

The peers are the *least* work that yields the same rows (one per basket, the first 50 lines in
line order, the basket's context and labels): no validation of any value, no quarantine, no
segment-code mapping, no typed enums or categoricals, no empty-string-to-null, no train /
validation / test split, no product table. The gap is what our contract costs. Each contender
runs in a fresh child (timed inside the child around the work only), ``--repeat N`` times (default
3), interleaved (ours, polars, duckdb, ours, …) so that a slow spell of the shared machine hits all
of them; the figures are the min and the median per contender, and the ratios use the medians. A
cheap cross-check compares the baskets (and lines) each contender produced.
The checks: ours within 2x of bare polars, and ours ahead of DuckDB. The final line is::

    RESULT real_lines=… real_baskets=… ours_seconds=… polars_seconds=… duckdb_seconds=… ours_lines_per_s=… ratio_vs_polars=… ratio_vs_duckdb=… [extra keys]

Scaling on a preset: ``--preset full --weeks N [M ...]``
-------------------------------------------------------
``--preset full --weeks 12 40 117`` measures how the prep scales up to the real dataset's size, one
table row per N (the ``full`` preset writes ~2.6M lines a week at first, +8 %/year: by this script's
estimate ~31M, ~110M and ~330M lines for 12, 40 and 117 weeks):

- The data is the preset (any of ``GENERATOR_PRESETS``; ``full``: 5,000 products, 760 stores, 500k
  customers, 250k baskets a week) with ``n_weeks`` = the largest N, generated ONCE, in a child
  process (the generator's progress bar and log show), into
  ``<workdir>/data-<preset>-<weeks>w-seed<S>[-b<K>]-<hash of the whole config>/`` and reused when
  present (the generator's manifest vouches for the files, hashes included). ``--seed S`` (default:
  the preset's) changes the data and the folder.
- The row for N reads the *first N weekly files* of that data. The generator's weeks are not
  independent of ``n_weeks``: the world (customers' arrival and leaving weeks spread over the whole
  span, the promotions table, every draw after them) is drawn for ``n_weeks``, so the first 12 weeks
  of a 117-week generation are not byte-identical to a 12-week generation. A row is therefore
  labelled "weeks 1-N of an M-week world": the opening of the full period (as if the data ended
  there), with the same traffic a week (baskets a week are set by the config, not by the active
  customers), which is what a throughput/memory row needs. A different largest N is a different
  world and another folder.
- Each row: raw → basket_samples in a fresh child (``ingest_weekly_files`` over the N files, then
  ``build_basket_samples``, exactly the ``raw_to_samples`` child above), then basket_samples →
  tensor_cache in another (``build_tensor_cache(force=True)``), each with its seconds, lines/s and
  peak RSS (``VmHWM``). Each row writes under its own folder ``<workdir>/run-<pid>/weeks-<N>/``,
  deleted once the row is measured (its size is recorded first) unless ``--keep``.
- Disk: the ``full`` preset's CSVs are ~145 B a line with the per-week ground truth (~380-410 MB a
  week, ~48 GB for all 117 weeks) plus ~0.55 GB of world (~1.1 KB a customer); a row's outputs
  (transactions parquet, basket_samples, tensor_cache) ~100 B a line (~33 GB for the 117-week row),
  one row at a time (all rows with ``--keep``): ~82 GB for ``--weeks 12 40 117``. The script prints
  the free space of ``--workdir`` and the estimated need (generated files already present count as
  written) and refuses to start when the need exceeds it, listing the other ``data-*`` folders there
  that could be deleted.
- At full scale the CSVs (tens of GB) exceed the 24 GB dev machine's RAM, so the ingest reads most
  of them from disk, not from a warm page cache: part of what the row measures.
- ``--baskets-per-week K`` (debug, hidden from ``--help``) replaces the preset's baskets a week and
  scales its customers in proportion (at least 100), keeping its baskets per customer: e.g.
  ``--preset full --weeks 3 4 --baskets-per-week 20000`` (~0.8M lines) to try the mode in a minute.
- N is at least 3: basket_samples needs a week each for train, validation and test.

It prints a table (weeks, lines, baskets, ingest / samples / cache seconds, raw → tensor_cache and
raw → basket_samples lines/s, peak RSS of each stage, other processes' CPU share), the target checks
(raw → tensor_cache >= 400k lines/s at the largest row; peak RSS < 12 GB on every stage of every
row) and a final line::

    RESULT preset=… weeks=… lines=… baskets=… prep_lines_per_s=… raw_to_samples_lines_per_s=… peak_rss_mb=… [extra keys]

(the figures of the largest row; ``peak_rss_mb`` over all rows), and with ``--json PATH`` every row
(under ``scaling``), the generator's run and config, and the machine. ``--rows``, ``--pandas-rows``
and ``--no-scaling`` do not apply to this mode.

How peak memory is measured
---------------------------
Each stage runs in a fresh child interpreter (``python bench_prep.py --_child …``). At the end of
its work the child reads ``VmHWM`` (the high-water mark of its resident set) from
``/proc/self/status`` and writes it, with its timings, to a JSON file the parent reads back.
``VmHWM`` belongs to the child's own address space, created by ``exec``, so it counts exactly what
the stage (plus interpreter and imports) held, nothing else.

We do *not* rely on ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: it is the maximum over *all* waited
children (so it cannot be reset between stages), and on Linux a child's ``ru_maxrss`` also absorbs
the RSS high-water mark of the address space it had before ``exec`` — with ``vfork``/``fork`` that
is the parent's, so a parent that had generated data would inflate every stage. The per-child
``os.wait4`` figure is still recorded as ``rusage_maxrss_mb`` in the JSON as a cross-check (the
parent keeps its own footprint small: it never imports polars before the stage children ran, and
generation runs in its own child too).

Timing: ``time.perf_counter`` inside the child around the work only (imports excluded); the parent
also reports wall time per child, interpreter start and imports included. Input CSVs are read from
a warm page cache (they were just generated or hashed by the generator's reuse check).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench_prep")

#: Rows the generator writes per (baskets_per_week x week), measured on the demo preset
#: (1,456,352 rows for 40 weeks x 3,700 baskets: ~9.84 lines per basket incl. trend and season).
ROWS_PER_BASKET_UNIT = 9.84
DEFAULT_ROWS = 10_000_000
DEFAULT_PANDAS_ROWS = 1_000_000

TARGET_RAW_TO_SAMPLES = 1_000_000  # rows/s
TARGET_PREP = 500_000  # rows/s, raw → tensor_cache
TARGET_PEAK_MB = 4096  # at 10M rows
TARGET_SPEEDUP = 10.0

#: ``--real``: ours may take at most this many times bare polars, and must beat DuckDB.
TARGET_RATIO_VS_POLARS = 2.0
DEFAULT_REPEAT = 3
MAX_BASKET_LEN = 50

#: Column types of the bare-minimum peers (upper-cased header name → polars dtype, DuckDB type);
#: every other column is text. The ints are as narrow as ours.
REAL_COLUMN_TYPES: dict[str, tuple[str, str]] = {
    "SHOP_WEEK": ("Int32", "INTEGER"),
    "SHOP_DATE": ("Int32", "INTEGER"),
    "SHOP_WEEKDAY": ("Int8", "TINYINT"),
    "SHOP_HOUR": ("Int8", "TINYINT"),
    "QUANTITY": ("Int32", "INTEGER"),
    "SPEND": ("Float64", "DOUBLE"),
    "BASKET_ID": ("Int64", "BIGINT"),
}
TEXT_COLUMN_TYPE = ("String", "VARCHAR")
#: Line-level columns, kept as lists of the basket's first lines.
LINE_COLUMNS: tuple[str, ...] = ("PROD_CODE", "SPEND", "QUANTITY")
#: Columns that are neither the key nor basket-level: the line lists and the product hierarchy.
NOT_BASKET_LEVEL = frozenset({"BASKET_ID", *LINE_COLUMNS, "PROD_CODE_10", "PROD_CODE_20", "PROD_CODE_30",
                              "PROD_CODE_40"})


# ============================================================================================
# Configuration of the generated data
# ============================================================================================


def generator_config_dict(rows: int) -> dict:
    """The ``demo`` preset scaled so that the generator writes about ``rows`` rows.

    Weeks grow with the square root of the rows (52 weeks at 10M rows, 26 at 2.5M, 16 at 1M,
    between 12 and 117 = the real dataset's span), baskets per week take the rest; customers grow
    with the number of baskets (the demo's ~15 baskets per customer). Products and stores stay at
    the demo's 1,000 and 40, so a larger data set is "more traffic over more weeks", not a
    different assortment.
    """
    from retailsim_pipeline.config import generator_preset

    demo = generator_preset("demo")
    n_weeks = int(min(117, max(12, round(52 * math.sqrt(rows / 10_000_000)))))
    baskets_per_week = max(1, round(rows / (n_weeks * ROWS_PER_BASKET_UNIT)))
    demo_baskets = demo.baskets_per_week * demo.n_weeks
    n_customers = max(100, round(demo.n_customers * baskets_per_week * n_weeks / demo_baskets))
    cfg = demo.model_copy(update={
        "preset": f"bench-{rows}",
        "n_weeks": n_weeks,
        "baskets_per_week": baskets_per_week,
        "n_customers": n_customers,
    })
    return cfg.model_dump(mode="json")


def config_key(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


# ============================================================================================
# Children: each stage runs in a fresh interpreter
# ============================================================================================


def _vm_hwm_mb() -> float:
    """Peak resident set of this process (``VmHWM``) in MiB; ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def child_generate(spec: dict) -> dict:
    from retailsim_pipeline.config import GeneratorConfig
    from retailsim_pipeline.prep.generator import generate

    cfg = GeneratorConfig(**spec["config"])
    t0 = time.perf_counter()
    summary = generate(cfg, Path(spec["out_dir"]), progress=True, compress=spec.get("compress", False))
    return {
        "seconds": time.perf_counter() - t0,
        "rows": summary.rows,
        "baskets": summary.baskets,
        "weeks": summary.weeks,
        "reused": summary.reused,
        "files": [str(f) for f in summary.files],
    }


def child_raw_to_samples(spec: dict) -> dict:
    """Ingest every weekly CSV, then build the basket samples (the two timed halves of stage 1).

    The ingest is ``ingest_weekly_files`` (what ``raw_transactions`` runs over a range of weeks:
    files validated in batches, outputs per file); ``"per_file": true`` in the spec runs
    ``ingest_weekly_file`` on each file instead.
    """
    from retailsim_pipeline.prep.ingest import ingest_weekly_file
    from retailsim_pipeline.prep.ingest_batch import ingest_weekly_files
    from retailsim_pipeline.prep.samples import build_basket_samples

    work = Path(spec["work_dir"])
    files = [Path(f) for f in spec["files"]]
    rss_after_imports = _vm_rss_mb()
    t0 = time.perf_counter()
    if spec.get("per_file"):
        results = [ingest_weekly_file(f, work / "transactions", work / "quarantine") for f in files]
    else:
        outcomes = list(ingest_weekly_files(files, work / "transactions", work / "quarantine"))
        failed = [o for o in outcomes if o.error is not None]
        if failed:
            raise failed[0].error
        results = [o.result for o in outcomes]
    accepted = sum(r.rows for r in results)
    quarantined = sum(r.quarantined for r in results)
    t1 = time.perf_counter()
    result = build_basket_samples(work / "transactions", work / "samples")
    t2 = time.perf_counter()
    return {
        "rows": accepted + quarantined,
        "accepted": accepted,
        "quarantined": quarantined,
        "baskets": sum(result.counts.values()),
        "counts": result.counts,
        "lines": result.lines,
        "ingest_seconds": t1 - t0,
        "samples_seconds": t2 - t1,
        "seconds": t2 - t0,
        "rss_after_imports_mb": rss_after_imports,
    }


def child_samples_to_cache(spec: dict) -> dict:
    from retailsim_pipeline.prep.cache_build import build_tensor_cache

    work = Path(spec["work_dir"])
    rss_after_imports = _vm_rss_mb()
    t0 = time.perf_counter()
    res = build_tensor_cache(work / "samples", work / "cache", force=True)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "key": res.key,
        "n_samples": {s: v["n_samples"] for s, v in res.manifest["splits"].items()},
        "n_tokens": {s: v["n_tokens"] for s, v in res.manifest["splits"].items()},
        "rss_after_imports_mb": rss_after_imports,
    }


def child_pandas_reference(spec: dict) -> dict:
    """What the seed's ``WorldModelDataset`` did, on the same weekly files.

    ``pd.read_csv`` of the transactions; a Python loop over the rows (``itertuples``) building each
    basket's product and price lists; a per-basket sample frame (basket-level fields of the
    basket's first row), then one ``.iloc`` per sample to assemble its row, as its ``__getitem__``
    did for every sample of an epoch. Its output is comparable to ours (one row per basket, the
    first 50 products and spends in line order, context and labels), minus validation, typing and
    the split files, which only our side does.
    """
    import pandas as pd

    files = spec["files"]
    max_len = spec.get("max_basket_len", 50)
    rss_after_imports = _vm_rss_mb()
    t0 = time.perf_counter()
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    t1 = time.perf_counter()
    products: dict[int, list] = {}
    prices: dict[int, list] = {}
    for row in df.itertuples(index=False):
        bid = row.BASKET_ID
        if bid not in products:
            products[bid] = []
            prices[bid] = []
        products[bid].append(row.PROD_CODE)
        prices[bid].append(row.SPEND)
    t2 = time.perf_counter()
    basket_cols = [
        "BASKET_ID", "SHOP_WEEK", "SHOP_DATE", "SHOP_WEEKDAY", "SHOP_HOUR", "STORE_CODE", "STORE_FORMAT",
        "STORE_REGION", "CUST_CODE", "CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE", "BASKET_SIZE",
        "BASKET_PRICE_SENSITIVITY", "BASKET_TYPE", "BASKET_DOMINANT_MISSION",
    ]
    sample_frame = df.drop_duplicates("BASKET_ID")[basket_cols].reset_index(drop=True)
    samples = []
    for i in range(len(sample_frame)):
        r = sample_frame.iloc[i]
        bid = r["BASKET_ID"]
        item = r.to_dict()
        item["n_lines"] = len(products[bid])
        item["products"] = products[bid][:max_len]
        item["spend"] = prices[bid][:max_len]
        samples.append(item)
    t3 = time.perf_counter()
    return {
        "rows": len(df),
        "baskets": len(samples),
        "read_seconds": t1 - t0,
        "loop_seconds": t2 - t1,
        "iloc_seconds": t3 - t2,
        "seconds": t3 - t0,
        "rss_after_imports_mb": rss_after_imports,
    }


def real_column_types(header: list[str]) -> list[tuple[str, str, str]]:
    """``(name, polars dtype, DuckDB type)`` of each header column, in header order (``--real`` peers)."""
    return [(name, *REAL_COLUMN_TYPES.get(name.upper(), TEXT_COLUMN_TYPE)) for name in header]


def basket_level_columns(header: list[str]) -> list[str]:
    """The header's basket-level columns (context and labels), under the header's own names."""
    return [name for name in header if name.upper() not in NOT_BASKET_LEVEL]


def _header_name(header: list[str], canonical: str) -> str:
    return next(name for name in header if name.upper() == canonical)


def child_real_polars(spec: dict) -> dict:
    """Bare-minimum polars: typed lazy CSV scan, line index, one group-by, parquet (see ``--real``)."""
    import polars as pl

    header, out = spec["header"], Path(spec["out"])
    schema = {name: getattr(pl, dtype)() for name, dtype, _ in real_column_types(header)}
    max_len = spec["max_basket_len"]
    rss_after_imports = _vm_rss_mb()
    t0 = time.perf_counter()
    (
        pl.scan_csv(spec["files"], schema=schema)
        .with_row_index("line")
        .group_by(_header_name(header, "BASKET_ID"))
        .agg(
            pl.col("line").first().alias("first_line"),
            pl.len().alias("n_lines"),
            *[pl.col(c).first() for c in basket_level_columns(header)],
            *[pl.col(_header_name(header, c)).head(max_len) for c in LINE_COLUMNS],
        )
        .sink_parquet(out)
    )
    seconds = time.perf_counter() - t0
    baskets, lines = pl.scan_parquet(out).select(pl.len(), pl.col("n_lines").sum()).collect().row(0)
    return {"seconds": seconds, "rows": int(lines), "baskets": int(baskets), "version": pl.__version__,
            "rss_after_imports_mb": rss_after_imports}


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def child_real_duckdb(spec: dict) -> dict:
    """Bare-minimum DuckDB: typed ``read_csv``, ``row_number()`` line, one GROUP BY, COPY to parquet."""
    import duckdb

    header, out = spec["header"], Path(spec["out"])
    max_len = spec["max_basket_len"]
    files = "[" + ", ".join(_sql_str(f) for f in spec["files"]) + "]"
    columns = "{" + ", ".join(f"{_sql_str(name)}: {_sql_str(sql_type)}"
                              for name, _, sql_type in real_column_types(header)) + "}"
    aggregates = [
        "min(line) AS first_line",
        "count(*) AS n_lines",
        *[f"any_value({_sql_ident(c)}) AS {_sql_ident(c)}" for c in basket_level_columns(header)],
        *[f"list({_sql_ident(c)} ORDER BY line)[1:{max_len}] AS {_sql_ident(c)}"
          for c in (_header_name(header, c) for c in LINE_COLUMNS)],
    ]
    basket_id = _sql_ident(_header_name(header, "BASKET_ID"))
    query = (
        f"COPY (SELECT {basket_id}, {', '.join(aggregates)} "
        f"FROM (SELECT *, row_number() OVER () AS line FROM read_csv({files}, header = true, columns = {columns})) "
        f"GROUP BY {basket_id}) TO {_sql_str(str(out))} (FORMAT parquet)"
    )
    con = duckdb.connect()
    rss_after_imports = _vm_rss_mb()
    t0 = time.perf_counter()
    con.execute(query)
    seconds = time.perf_counter() - t0
    baskets, lines = con.execute(f"SELECT count(*), sum(n_lines) FROM read_parquet({_sql_str(str(out))})").fetchone()
    return {"seconds": seconds, "rows": int(lines), "baskets": int(baskets), "version": duckdb.__version__,
            "threads": con.execute("SELECT current_setting('threads')").fetchone()[0],
            "rss_after_imports_mb": rss_after_imports}


CHILDREN = {
    "generate": child_generate,
    "raw_to_samples": child_raw_to_samples,
    "samples_to_cache": child_samples_to_cache,
    "pandas_reference": child_pandas_reference,
    "real_polars": child_real_polars,
    "real_duckdb": child_real_duckdb,
}


def child_main(name: str, spec_path: str, out_path: str) -> None:
    # The generator's own log (what it generates or reuses, and where) is worth seeing; the stages' is not.
    logging.basicConfig(level=logging.INFO if name == "generate" else logging.WARNING,
                        format="  [%(name)s] %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = CHILDREN[name](spec)
    except Exception as exc:
        # The parent reports this line; the traceback goes to stderr, and the exit is non-zero.
        Path(out_path).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    result["peak_rss_mb"] = _vm_hwm_mb()
    Path(out_path).write_text(json.dumps(result))


def run_child(name: str, spec: dict, tmp_dir: Path) -> dict:
    """Run one stage in a fresh interpreter; return its result plus wall time and rusage."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = tmp_dir / f"{name}.spec.json", tmp_dir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, str(spec_path), str(out_path)]
    import psutil

    ncpu = os.cpu_count() or 1
    # CPU other processes use right now (ours: nothing runs between stages); the machine is shared.
    others_before = psutil.cpu_percent(interval=0.5) / 100
    if others_before > 0.25:
        log(f"  note: other processes use {100 * others_before:.0f}% of the {ncpu} CPUs before stage {name}")
    cpu0 = psutil.cpu_times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    # wait4: this child's own rusage (cross-check only; see the module docstring)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out_path.exists():
        error = json.loads(out_path.read_text()).get("error") if out_path.exists() else None
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}){f': {error}' if error else ''}; "
                         f"command: {' '.join(cmd)}")
    result = json.loads(out_path.read_text())
    result["wall_seconds"] = wall
    result["rusage_maxrss_mb"] = rusage.ru_maxrss / 1024
    # Contention during the stage: busy CPU time of the whole machine minus this child's own.
    cpu1 = psutil.cpu_times()
    busy = sum(getattr(cpu1, f) - getattr(cpu0, f) for f in cpu1._fields if f not in ("idle", "iowait", "guest", "guest_nice"))
    own = rusage.ru_utime + rusage.ru_stime
    result["child_cpu_seconds"] = round(own, 3)
    result["child_cpu_utilisation"] = round(own / wall, 3)  # cores busy on average (max = cpu count)
    result["others_cpu_share"] = round(max(0.0, busy - own) / (wall * ncpu), 3)
    result["others_cpu_share_before"] = round(others_before, 3)
    if result["others_cpu_share"] > 0.1:
        log(f"  note: other processes used {100 * result['others_cpu_share']:.0f}% of the CPUs during {name}: "
            "its timing is pessimistic")
    return result


# ============================================================================================
# Parent
# ============================================================================================


def setup_logging() -> None:
    """The parent's progress lines on stdout, between the report's own lines, as ``[bench HH:MM:SS] …``."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[bench %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def log(msg: str) -> None:
    """A progress line of the parent (the report itself - tables, checks, RESULT - is printed)."""
    logger.info(msg)


def ensure_data(rows: int, workdir: Path) -> tuple[dict, Path, dict]:
    cfg = generator_config_dict(rows)
    data_dir = workdir / f"data-{rows}-{config_key(cfg)}"
    log(f"data for {rows:,} rows: {cfg['n_weeks']} weeks x {cfg['baskets_per_week']:,} baskets/week, "
        f"{cfg['n_customers']:,} customers -> {data_dir}")
    gen = run_child("generate", {"config": cfg, "out_dir": str(data_dir)}, workdir / "tmp")
    log(f"  {'reused' if gen['reused'] else 'generated'} {gen['rows']:,} rows, {gen['baskets']:,} baskets, "
        f"{gen['weeks']} weekly files in {gen['wall_seconds']:.1f}s")
    return cfg, data_dir, gen


def run_prep(label: str, files: list[str], run_dir: Path, workdir: Path, with_cache: bool = True,
             per_file: bool = False) -> dict:
    """Stage 1 (and 2) on ``files`` in fresh children, outputs under ``run_dir`` (emptied first);
    ``per_file``: ingest with ``ingest_weekly_file`` on each file instead of ``ingest_weekly_files``."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log(f"{label}: raw -> basket_samples on {len(files)} weekly files{' (per-file ingest)' if per_file else ''} ...")
    s1 = run_child("raw_to_samples", {"work_dir": str(run_dir), "files": files, "per_file": per_file},
                   workdir / "tmp")
    log(f"  {s1['rows']:,} rows -> {s1['baskets']:,} baskets in {s1['seconds']:.2f}s "
        f"(ingest {s1['ingest_seconds']:.2f}s, samples {s1['samples_seconds']:.2f}s), "
        f"peak RSS {s1['peak_rss_mb']:.0f} MB")
    out = {"raw_to_samples": s1}
    if with_cache:
        log(f"{label}: basket_samples -> tensor_cache ...")
        s2 = run_child("samples_to_cache", {"work_dir": str(run_dir)}, workdir / "tmp")
        log(f"  {s2['seconds']:.2f}s, peak RSS {s2['peak_rss_mb']:.0f} MB")
        out["samples_to_cache"] = s2
    return out


def subset_files(files: list[str], min_rows: int, manifest: dict) -> tuple[list[str], int]:
    """Whole weekly files, in week order, until they hold at least ``min_rows`` rows."""
    per_file = manifest["files"]
    chosen, rows = [], 0
    for f in files:
        rel = str(Path(f).relative_to(Path(f).parent.parent))
        chosen.append(f)
        rows += per_file[rel]["rows"]
        if rows >= min_rows:
            break
    return chosen, rows


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def print_checks(checks: list[tuple[str, bool | None, str]]) -> bool:
    """Print each check as ok / MISS (``None``: skip); True when none missed."""
    for name, ok, detail in checks:
        mark = "skip" if ok is None else "ok  " if ok else "MISS"
        print(f"  [{mark}] {name:<48} {detail}")
    return all(ok is not False for _, ok, _ in checks)


def print_result(summary: dict, keys: list[str]) -> None:
    print("RESULT " + " ".join(f"{k}={'na' if summary[k] is None else summary[k]}" for k in keys if k in summary))


def write_json(path: Path, summary: dict, args: dict, total: float, stages: dict) -> None:
    """``summary`` plus the machine, the arguments and every stage's raw result, as JSON at ``path``."""
    import psutil

    payload = {
        **summary,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_count_physical": psutil.cpu_count(logical=False),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "args": args,
        "benchmark_wall_seconds": round(total, 1),
        "stages": stages,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    log(f"wrote {path}")


# ============================================================================================
# --real: ours against bare-minimum polars and DuckDB on the real weekly files
# ============================================================================================


def real_csv_files(src: Path, workdir: Path) -> list[str]:
    """Plain CSVs of every ``transactions_*.csv[.gz]`` in ``src``, in week order.

    ``.csv.gz`` files are unpacked once into ``workdir/real-csv-<hash of their names and sizes>/``
    (each file written to a temporary name and renamed, so a present file is whole and is reused);
    plain ``.csv`` files are used where they are.
    """
    gz = sorted(src.glob("transactions_*.csv.gz"))
    by_name = {p.name: p for p in sorted(src.glob("transactions_*.csv"))}
    if not gz and not by_name:
        raise SystemExit(f"--real {src}: no transactions_*.csv or transactions_*.csv.gz files")
    both = sorted(set(by_name) & {p.name.removesuffix(".gz") for p in gz})
    if both:
        raise SystemExit(f"--real {src}: weeks present both as .csv and .csv.gz: {', '.join(both[:5])}")
    if gz:
        key = hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in gz).encode()).hexdigest()[:10]
        cache = workdir / f"real-csv-{key}"
        cache.mkdir(parents=True, exist_ok=True)
        unpacked = 0
        t0 = time.perf_counter()
        for p in gz:
            dest = cache / p.name.removesuffix(".gz")
            if not dest.exists():
                tmp = cache / f".{dest.name}.tmp-{os.getpid()}"
                with gzip.open(p, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 22)
                os.replace(tmp, dest)
                unpacked += 1
            by_name[dest.name] = dest
        log(f"{len(gz)} .csv.gz files -> {cache}: {unpacked} unpacked ({time.perf_counter() - t0:.1f}s), "
            f"{len(gz) - unpacked} reused")
    return [str(by_name[name]) for name in sorted(by_name)]


def warm_and_count(files: list[str]) -> tuple[int, list[str]]:
    """Read every file once (so all contenders start from a warm page cache); return the data lines
    (header excluded) and the header, which every file must share (the peers scan them as one)."""
    lines, headers = 0, {}
    for f in files:
        with open(f, "rb") as fh:
            first = fh.readline()
            headers.setdefault(first, f)
            last = first
            while chunk := fh.read(1 << 22):
                lines += chunk.count(b"\n")
                last = chunk
        lines += not last.endswith(b"\n")  # a last line without its newline
    if len(headers) > 1:
        raise SystemExit("--real: the files do not share one header: "
                         + "; ".join(f"{Path(f).name}: {h[:60]!r}" for h, f in list(headers.items())[:3]))
    header = next(iter(headers)).decode("utf-8-sig").strip()
    return lines, [name.strip().strip('"') for name in header.split(",")]


def run_contender(name: str, files: list[str], header: list[str], real_dir: Path, workdir: Path,
                  per_file: bool = False) -> dict:
    """One timed run of contender ``name`` in a fresh child, its outputs under ``real_dir``."""
    if name == "ours":
        return run_prep("ours", files, real_dir / "ours", workdir, with_cache=False,
                        per_file=per_file)["raw_to_samples"]
    out = real_dir / f"{name}.parquet"
    out.unlink(missing_ok=True)
    log(f"{name} (bare minimum) on {len(files)} files ...")
    res = run_child(f"real_{name}", {"files": files, "header": header, "out": str(out),
                                     "max_basket_len": MAX_BASKET_LEN}, workdir / "tmp")
    log(f"  {res['rows']:,} lines -> {res['baskets']:,} baskets in {res['seconds']:.2f}s, "
        f"peak RSS {res['peak_rss_mb']:.0f} MB")
    return res


def contender_stats(runs: list[dict], key: str = "seconds") -> dict:
    values = [r[key] for r in runs]
    return {"min": min(values), "median": statistics.median(values), "all": values}


def run_real(args: argparse.Namespace, t_start: float) -> int:
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    src = args.real.resolve()
    files = real_csv_files(src, workdir)
    t0 = time.perf_counter()
    real_lines, header = warm_and_count(files)
    log(f"{len(files)} weekly files, {real_lines:,} lines, read once into the page cache "
        f"({time.perf_counter() - t0:.1f}s)")

    contenders = ["ours", "polars", "duckdb"]
    if importlib.util.find_spec("duckdb") is None:
        log("  note: duckdb is not installed: the DuckDB contender is skipped "
            "(pip install -e '.[bench]', or make bench)")
        contenders.remove("duckdb")
    real_dir = workdir / f"run-{os.getpid()}" / "real"
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    try:
        for i in range(args.repeat):
            log(f"round {i + 1}/{args.repeat}")
            for name in contenders:
                runs[name].append(run_contender(name, files, header, real_dir, workdir, args.per_file))
    finally:
        if not args.keep:
            shutil.rmtree(real_dir.parent, ignore_errors=True)
        elif real_dir.exists():
            log(f"outputs kept in {real_dir}")

    stats = {name: contender_stats(rs) for name, rs in runs.items()}
    stats["ours_ingest"] = contender_stats(runs["ours"], "ingest_seconds")
    stats["ours_samples"] = contender_stats(runs["ours"], "samples_seconds")

    # ---- cross-check: same lines and baskets everywhere ------------------------------------------
    produced = {(name, r["rows"], r["baskets"]) for name, rs in runs.items() for r in rs}
    baskets = {b for _, _, b in produced}
    lines_seen = {n for _, n, _ in produced}
    warnings = []
    if len(baskets) > 1 or lines_seen != {real_lines}:
        warnings.append("MISMATCH: the contenders disagree: " + "; ".join(
            f"{name} {n:,} lines -> {b:,} baskets" for name, n, b in sorted(produced))
            + f" (the files hold {real_lines:,} lines)")
    quarantined = max(r["quarantined"] for r in runs["ours"])
    if quarantined:
        warnings.append(f"note: ours quarantined {quarantined:,} of {real_lines:,} lines")
    real_baskets = runs["ours"][0]["baskets"]

    # ---- figures --------------------------------------------------------------------------------------
    def median(name: str) -> float | None:
        return stats[name]["median"] if name in stats else None

    def ratio(name: str) -> float | None:
        return round(median("ours") / median(name), 3) if name in stats else None

    summary: dict = {
        "real_lines": real_lines,
        "real_baskets": real_baskets,
        "real_files": len(files),
        "repeat": args.repeat,
        **{f"{name}_seconds": None if median(name) is None else round(median(name), 3)
           for name in ("ours", "ours_ingest", "ours_samples", "polars", "duckdb")},
        **{f"{name}_seconds_min": round(stats[name]["min"], 3) for name in stats},
        **{f"{name}_lines_per_s": None if median(name) is None else round(real_lines / median(name))
           for name in ("ours", "polars", "duckdb")},
        "ratio_vs_polars": ratio("polars"),
        "ratio_vs_duckdb": ratio("duckdb"),
        "peak_rss_mb_ours": round(max(r["peak_rss_mb"] for r in runs["ours"]), 1),
        "quarantined": quarantined,
        "polars_version": runs["polars"][0]["version"],
        "duckdb_version": runs["duckdb"][0]["version"] if "duckdb" in runs else None,
    }

    # ---- print ------------------------------------------------------------------------------------------
    rows = [("ours raw -> basket_samples", "ours", runs["ours"]),
            ("  ingest (validate, quarantine, parquet)", "ours_ingest", None),
            ("  samples (baskets, split, products)", "ours_samples", None),
            (f"polars {summary['polars_version']} (bare minimum)", "polars", runs["polars"])]
    if "duckdb" in runs:
        rows.append((f"DuckDB {summary['duckdb_version']} (bare minimum)", "duckdb", runs["duckdb"]))
    print()
    print(f"{'contender (' + str(args.repeat) + ' runs)':<42} {'lines':>10} {'baskets':>9} {'min s':>7} "
          f"{'median s':>8} {'lines/s':>11} {'peak RSS MB':>11} {'cores':>6} {'others':>7}")
    print("-" * 119)
    for label, key, rs in rows:
        st = stats[key]
        extra = "" if rs is None else (
            f"{max(r['peak_rss_mb'] for r in rs):>11.0f} {statistics.median(r['child_cpu_utilisation'] for r in rs):>6.2f} "
            f"{100 * max(r['others_cpu_share'] for r in rs):>6.0f}%")
        n_baskets = "" if rs is None else f"{rs[0]['baskets']:,}"
        print(f"{label:<42} {real_lines:>10,} {n_baskets:>9} {st['min']:>7.2f} {st['median']:>8.2f} "
              f"{fmt_rate(real_lines / st['median']):>11} {extra}".rstrip())
    print("(seconds: the work alone, in a fresh process, min and median over the runs; lines/s at the median;\n"
          " peak RSS: the largest run; cores: CPU seconds / wall seconds, median; others: the largest share of\n"
          " the machine's CPU other processes used during a run - a high share makes that timing pessimistic)")
    for name in ("polars", "duckdb"):
        if name in stats:
            print(f"ours / {name}: x{ratio(name):.2f} (median seconds {median('ours'):.2f} / {median(name):.2f})")
    ours_share = 100 * median("ours_ingest") / (median("ours_ingest") + median("ours_samples"))
    print(f"ours: ingest {ours_share:.0f}% of the time, samples {100 - ours_share:.0f}%")
    for w in warnings:
        print(w)
    print()
    checks = [(f"ours within {TARGET_RATIO_VS_POLARS:g}x of bare polars",
               median("ours") <= TARGET_RATIO_VS_POLARS * median("polars"),
               f"x{ratio('polars'):.2f} ({median('ours'):.2f}s vs {median('polars'):.2f}s, medians)")]
    if "duckdb" in stats:
        checks.append(("ours ahead of DuckDB", median("ours") < median("duckdb"),
                       f"x{ratio('duckdb'):.2f} ({median('ours'):.2f}s vs {median('duckdb'):.2f}s, medians)"))
    else:
        checks.append(("ours ahead of DuckDB", None, "duckdb not installed"))
    summary["targets_met"] = print_checks(checks)
    summary["baskets_match"] = not any(w.startswith("MISMATCH") for w in warnings)
    total = time.perf_counter() - t_start
    print(f"\nbenchmark wall time {total:.1f}s")
    print_result(summary, ["real_lines", "real_baskets", "ours_seconds", "ours_ingest_seconds",
                           "ours_samples_seconds", "polars_seconds", "duckdb_seconds", "ours_lines_per_s",
                           "polars_lines_per_s", "duckdb_lines_per_s", "ratio_vs_polars", "ratio_vs_duckdb",
                           "duckdb_version"])
    if args.json is not None:
        write_json(args.json, summary, {"real": str(src), "repeat": args.repeat, "files": len(files)}, total,
                   {"runs": runs, "seconds": stats})
    return 0


# ============================================================================================
# --preset NAME --weeks N [M ...]: scaling on a preset's data, one row per N
# ============================================================================================

TARGET_SCALING_PREP = 400_000  # lines/s, raw → tensor_cache at the largest row (full preset, 117 weeks)
TARGET_SCALING_PEAK_MB = 12 * 1024  # every stage of every row
#: Lines per basket of the full preset (830,393 lines in 80,079 baskets, its first 4 weeks at 20k baskets a
#: week; the README's 7.8M lines in 3 weeks at 250k agree); the generator's traffic trend (+8 %/year) comes on top.
PRESET_LINES_PER_BASKET = 10.4
TRAFFIC_TREND_PER_YEAR = 0.08
#: Disk per generated line: the CSV (~143 B measured on the full preset) plus the weekly basket truth.
GENERATED_BYTES_PER_LINE = 145
#: ``--gzip``: the share of its CSV a gzip-1 week takes (the full preset's 117 weeks: 5.5 GB for ~48 GB, 0.115).
GZIP_SHARE = 0.13
#: Disk of the world sidecar (world.npz, customers.parquet) per customer: ~0.55 GB for 500k customers.
GROUND_TRUTH_BYTES_PER_CUSTOMER = 1_100
#: Disk of one row's outputs per line: transactions parquet + quarantine + basket_samples + tensor_cache
#: (measured 100-104 B on the full preset at 0.6-0.8M lines, four fifths of it the cache).
OUTPUT_BYTES_PER_LINE = 100
#: basket_samples needs a week each for train, validation and test (``split_weeks``, default split).
MIN_WEEKS = 3


def preset_config_dict(name: str, n_weeks: int, seed: int | None = None,
                       baskets_per_week: int | None = None) -> dict:
    """Preset ``name`` with ``n_weeks`` weeks (and ``seed``, default the preset's).

    ``baskets_per_week`` (the debug ``--baskets-per-week``) replaces the preset's and scales its
    customers in proportion (at least 100), so a small run keeps the preset's baskets per customer.
    """
    from retailsim_pipeline.config import generator_preset

    base = generator_preset(name, seed)
    update: dict = {"n_weeks": n_weeks}
    if baskets_per_week is not None:
        update["baskets_per_week"] = baskets_per_week
        update["n_customers"] = max(100, round(base.n_customers * baskets_per_week / base.baskets_per_week))
    # model_validate, not model_copy: the config's bounds (weeks, baskets a week) are checked
    return type(base).model_validate({**base.model_dump(), **update}).model_dump(mode="json")


def preset_data_dir(workdir: Path, cfg: dict, baskets_override: bool, compressed: bool = False) -> Path:
    """``data-<preset>-<weeks>w-seed<S>[-b<K>][-gz]-<hash>``: readable, and keyed by the whole config."""
    extra = (f"-b{cfg['baskets_per_week']}" if baskets_override else "") + ("-gz" if compressed else "")
    return workdir / f"data-{cfg['preset']}-{cfg['n_weeks']}w-seed{cfg['seed']}{extra}-{config_key(cfg)}"


def tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0


def estimated_lines(baskets_per_week: int, n_weeks: int) -> float:
    """Lines in the first ``n_weeks`` weeks: baskets a week x lines per basket x the mean of the traffic
    trend over those weeks (Christmas weeks, +-20 % for three weeks a year, left out)."""
    return baskets_per_week * n_weeks * PRESET_LINES_PER_BASKET * (1 + TRAFFIC_TREND_PER_YEAR * n_weeks / 52 / 2)


def disk_plan(cfg: dict, weeks: list[int], data_dir: Path, keep: bool, compressed: bool = False) -> dict:
    """Estimated disk this run still needs: generated files not yet present, plus the rows' outputs
    (the largest row's; every row's with ``keep``)."""
    bpw = cfg["baskets_per_week"]
    per_line = GENERATED_BYTES_PER_LINE * (GZIP_SHARE if compressed else 1.0)
    generated = (estimated_lines(bpw, cfg["n_weeks"]) * per_line
                 + cfg["n_customers"] * GROUND_TRUTH_BYTES_PER_CUSTOMER)
    present = tree_bytes(data_dir)
    outputs = OUTPUT_BYTES_PER_LINE * (sum(estimated_lines(bpw, n) for n in weeks) if keep
                                       else estimated_lines(bpw, max(weeks)))
    return {
        "estimated_lines": round(estimated_lines(bpw, cfg["n_weeks"])),
        "generated_bytes": round(generated),
        "present_bytes": present,
        "to_generate_bytes": max(0, round(generated) - present),
        "outputs_bytes": round(outputs),
        "need_bytes": max(0, round(generated) - present) + round(outputs),
    }


def check_disk(workdir: Path, plan: dict, data_dir: Path) -> int:
    """Print the free space and the estimated need; refuse (SystemExit) when the need exceeds it."""
    free = shutil.disk_usage(workdir).free
    gb = 1e9
    log(f"disk: {free / gb:,.1f} GB free in {workdir}; this run needs ~{plan['need_bytes'] / gb:,.1f} GB "
        f"(~{plan['estimated_lines']:,} lines: generated files ~{plan['generated_bytes'] / gb:,.1f} GB, "
        f"{plan['present_bytes'] / gb:,.1f} GB of them present; outputs ~{plan['outputs_bytes'] / gb:,.1f} GB)")
    if plan["need_bytes"] > free:
        others = sorted((p for p in workdir.glob("data-*") if p.is_dir() and p != data_dir), key=lambda p: p.name)
        hint = "".join(f"\n  {p} ({tree_bytes(p) / gb:,.1f} GB)" for p in others)
        raise SystemExit(
            f"not enough disk in {workdir}: ~{plan['need_bytes'] / gb:,.1f} GB needed, {free / gb:,.1f} GB free. "
            "Point --workdir at a larger disk, measure fewer weeks, drop --keep, or delete data folders "
            "of earlier runs" + (f":{hint}" if hint else "."))
    return free


def scaling_row(n_weeks: int, prep: dict, output_bytes: int) -> dict:
    """One table row's figures from the two stage results of ``run_prep``."""
    s1, s2 = prep["raw_to_samples"], prep["samples_to_cache"]
    lines = s1["rows"]
    return {
        "weeks": n_weeks,
        "lines": lines,
        "baskets": s1["baskets"],
        "quarantined": s1["quarantined"],
        "ingest_seconds": round(s1["ingest_seconds"], 3),
        "samples_seconds": round(s1["samples_seconds"], 3),
        "raw_to_samples_seconds": round(s1["seconds"], 3),
        "cache_seconds": round(s2["seconds"], 3),
        "prep_seconds": round(s1["seconds"] + s2["seconds"], 3),
        "ingest_lines_per_s": round(lines / s1["ingest_seconds"]),
        "raw_to_samples_lines_per_s": round(lines / s1["seconds"]),
        "prep_lines_per_s": round(lines / (s1["seconds"] + s2["seconds"])),
        "peak_rss_mb_raw_to_samples": round(s1["peak_rss_mb"], 1),
        "peak_rss_mb_cache": round(s2["peak_rss_mb"], 1),
        "wall_seconds": round(s1["wall_seconds"] + s2["wall_seconds"], 2),
        "others_cpu_share": max(s1["others_cpu_share"], s2["others_cpu_share"]),
        "output_bytes": output_bytes,
        "output_bytes_per_line": round(output_bytes / lines, 1),
    }


def run_scaling(args: argparse.Namespace, t_start: float) -> int:
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    weeks = sorted(set(args.weeks))
    override = args.baskets_per_week is not None
    cfg = preset_config_dict(args.preset, weeks[-1], args.seed, args.baskets_per_week)
    data_dir = preset_data_dir(workdir, cfg, override, args.gzip)
    plan = disk_plan(cfg, weeks, data_dir, args.keep, args.gzip)
    free = check_disk(workdir, plan, data_dir)

    log(f"data: preset {cfg['preset']}{' (--baskets-per-week: customers scaled)' if override else ''}, "
        f"{cfg['n_weeks']} weeks x {cfg['baskets_per_week']:,} baskets/week, {cfg['n_products']:,} products, "
        f"{cfg['n_stores']:,} stores, {cfg['n_customers']:,} customers, seed {cfg['seed']} -> {data_dir}")
    gen = run_child("generate", {"config": cfg, "out_dir": str(data_dir), "compress": args.gzip}, workdir / "tmp")
    gen["lines_per_s"] = None if gen["reused"] else round(gen["rows"] / gen["seconds"])
    log(f"  {'reused' if gen['reused'] else 'generated'} {gen['rows']:,} lines, {gen['baskets']:,} baskets, "
        f"{gen['weeks']} weekly files in {gen['wall_seconds']:.1f}s"
        + ("" if gen["reused"] else f" ({gen['lines_per_s']:,} lines/s, peak RSS {gen['peak_rss_mb']:,.0f} MB)"))

    run_root = workdir / f"run-{os.getpid()}"
    rows: list[dict] = []
    stages: dict = {}
    try:
        for n in weeks:
            run_dir = run_root / f"weeks-{n}"
            prep = run_prep(f"weeks 1-{n} of a {cfg['n_weeks']}-week world", gen["files"][:n], run_dir, workdir,
                            per_file=args.per_file)
            rows.append(scaling_row(n, prep, tree_bytes(run_dir)))
            stages[f"weeks_{n}"] = prep
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)  # disk: one row's outputs at a time
    finally:
        if not args.keep:
            shutil.rmtree(run_root, ignore_errors=True)
        elif run_root.exists():
            log(f"stage outputs kept in {run_root}")

    # ---- print ------------------------------------------------------------------------------------
    print()
    print(f"{'weeks':>5} {'lines':>13} {'baskets':>11} {'ingest s':>9} {'samples s':>9} {'cache s':>9} "
          f"{'raw->cache l/s':>14} {'raw->samples l/s':>16} {'RSS samples MB':>14} {'RSS cache MB':>12} "
          f"{'others':>6}")
    print("-" * 125)
    for r in rows:
        print(f"{r['weeks']:>5} {r['lines']:>13,} {r['baskets']:>11,} {r['ingest_seconds']:>9.2f} "
              f"{r['samples_seconds']:>9.2f} {r['cache_seconds']:>9.2f} {fmt_rate(r['prep_lines_per_s']):>14} "
              f"{fmt_rate(r['raw_to_samples_lines_per_s']):>16} {r['peak_rss_mb_raw_to_samples']:>14,.0f} "
              f"{r['peak_rss_mb_cache']:>12,.0f} {100 * r['others_cpu_share']:>5.0f}%")
    print(f"(rows: the first N weekly files of one {cfg['n_weeks']}-week {cfg['preset']} generation; seconds: the work\n"
          " alone, each stage in a fresh process; l/s: lines per second of raw -> tensor_cache (ingest + samples +\n"
          " cache) and of raw -> basket_samples (ingest + samples); RSS: each stage's peak (VmHWM); others: the\n"
          " largest share of the machine's CPU other processes used during the row - high = pessimistic timing)")
    print()
    last = rows[-1]
    peak = max(max(r["peak_rss_mb_raw_to_samples"], r["peak_rss_mb_cache"]) for r in rows)
    peak_row = next(r for r in rows if peak in (r["peak_rss_mb_raw_to_samples"], r["peak_rss_mb_cache"]))
    checks = [
        (f"raw -> tensor_cache >= {TARGET_SCALING_PREP:,} lines/s", last["prep_lines_per_s"] >= TARGET_SCALING_PREP,
         f"{last['prep_lines_per_s']:,} lines/s at the largest row ({last['lines']:,} lines, {last['weeks']} weeks)"),
        (f"peak RSS < {TARGET_SCALING_PEAK_MB // 1024} GB, every stage of every row", peak < TARGET_SCALING_PEAK_MB,
         f"{peak:,.0f} MB at most ({peak_row['weeks']} weeks)"),
    ]
    targets_met = print_checks(checks)
    total = time.perf_counter() - t_start
    print(f"\nbenchmark wall time {total:.1f}s")

    summary: dict = {
        "preset": cfg["preset"],
        "weeks": ",".join(str(n) for n in weeks),
        "lines": last["lines"],
        "baskets": last["baskets"],
        "prep_lines_per_s": last["prep_lines_per_s"],
        "raw_to_samples_lines_per_s": last["raw_to_samples_lines_per_s"],
        "peak_rss_mb": peak,
        "generate_lines_per_s": gen["lines_per_s"],
        "targets_met": targets_met,
        "scaling": rows,
        "generator": {k: v for k, v in gen.items() if k != "files"},
        "config": cfg,
        "disk": {**plan, "free_bytes_before": free},
    }
    print_result(summary, ["preset", "weeks", "lines", "baskets", "prep_lines_per_s", "raw_to_samples_lines_per_s",
                           "peak_rss_mb", "generate_lines_per_s", "targets_met"])
    if args.json is not None:
        write_json(args.json, summary, {"preset": args.preset, "weeks": weeks, "seed": args.seed,
                                        "baskets_per_week": args.baskets_per_week, "keep": args.keep,
                                        "per_file": args.per_file}, total, stages)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        child_main(*argv[1:4])
        return 0

    from retailsim_pipeline.config import GENERATOR_PRESETS, generator_preset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows to generate (default 10M)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/retailsim_bench"),
                   help="generated data (cached, keyed by config) and stage outputs")
    p.add_argument("--pandas-rows", type=int, default=DEFAULT_PANDAS_ROWS,
                   help="rows of the pandas reference subset (whole weekly files; 0 = skip)")
    p.add_argument("--keep", action="store_true", help="keep the stage outputs (transactions, samples, cache)")
    p.add_argument("--no-scaling", action="store_true", help="skip the N/4 run that shows memory growth")
    p.add_argument("--real", type=Path, default=None, metavar="DIR",
                   help="real weekly files transactions_YYYYWW.csv[.gz]: race ours against bare-minimum polars "
                        "and DuckDB on them instead of the generated-data stages")
    p.add_argument("--per-file", action="store_true",
                   help="ours ingests with ingest_weekly_file on each file (the path before batching) instead of "
                        "ingest_weekly_files, to compare the two")
    p.add_argument("--repeat", type=int, default=DEFAULT_REPEAT,
                   help=f"--real: runs per contender, interleaved (default {DEFAULT_REPEAT})")
    p.add_argument("--preset", choices=sorted(GENERATOR_PRESETS), default=None,
                   help="scaling on this generator preset's data (one generation, reused), one table row per "
                        "--weeks N instead of the --rows stages")
    p.add_argument("--weeks", type=int, nargs="+", default=None, metavar="N",
                   help="--preset: rows on the first N weekly files (several N: one row each; the data has the "
                        "largest N weeks; default: the preset's weeks)")
    p.add_argument("--seed", type=int, default=None, help="--preset: generator seed (default: the preset's)")
    p.add_argument("--gzip", action="store_true", help="--preset: generate transactions_YYYYWW.csv.gz (a quarter of "
                   "the disk; the ingest then decompresses, as for the published LGSR weeks)")
    # Debug: a quick, small run of the --preset mode (customers scale with it); not a benchmark figure.
    p.add_argument("--baskets-per-week", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.preset is None and (args.weeks is not None or args.seed is not None
                                or args.baskets_per_week is not None or args.gzip):
        p.error("--weeks, --seed, --gzip and --baskets-per-week need --preset")
    if args.preset is not None:
        if args.real is not None:
            p.error("--preset and --real are two different modes: give one")
        if args.weeks is None:
            args.weeks = [generator_preset(args.preset).n_weeks]
        if min(args.weeks) < MIN_WEEKS:
            p.error(f"--weeks: each N must be at least {MIN_WEEKS} (basket_samples splits the weeks into train, "
                    f"validation and test), got {min(args.weeks)}")
        try:  # the config's own bounds (weeks, baskets a week) are the ones that count
            preset_config_dict(args.preset, max(args.weeks), args.seed, args.baskets_per_week)
        except ValueError as exc:
            p.error(f"--preset {args.preset} --weeks {max(args.weeks)}: {exc}")

    setup_logging()
    t_start = time.perf_counter()
    if args.real is not None:
        return run_real(args, t_start)
    if args.preset is not None:
        return run_scaling(args, t_start)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_root = workdir / f"run-{os.getpid()}"
    results: dict = {}
    try:
        # ---- full size -----------------------------------------------------------------------
        cfg, data_dir, gen = ensure_data(args.rows, workdir)
        manifest = json.loads((data_dir / "ground_truth" / "generator.json").read_text())
        full = run_prep(f"{gen['rows']:,} rows", gen["files"], run_root / "full", workdir, per_file=args.per_file)
        results["full"] = {"generator": gen, "config": cfg, **full}

        # ---- N/4: memory growth ---------------------------------------------------------------
        if not args.no_scaling:
            q_rows = args.rows // 4
            qcfg, qdir, qgen = ensure_data(q_rows, workdir)
            if not args.keep:
                shutil.rmtree(run_root / "full", ignore_errors=True)  # disk: one run's outputs at a time
            quarter = run_prep(f"{qgen['rows']:,} rows (N/4)", qgen["files"], run_root / "quarter", workdir,
                               per_file=args.per_file)
            results["quarter"] = {"generator": qgen, "config": qcfg, **quarter}

        # ---- pandas reference vs ours on the same files ----------------------------------------
        if args.pandas_rows > 0:
            files, sub_rows = subset_files(gen["files"], args.pandas_rows, manifest)
            log(f"pandas reference on {len(files)} weekly files ({sub_rows:,} rows) ...")
            pd_res = run_child("pandas_reference", {"files": files}, workdir / "tmp")
            log(f"  {pd_res['seconds']:.2f}s (read_csv {pd_res['read_seconds']:.2f}s, row loop "
                f"{pd_res['loop_seconds']:.2f}s, .iloc per sample {pd_res['iloc_seconds']:.2f}s)")
            ours = run_prep(f"{sub_rows:,} rows (pandas subset)", files, run_root / "subset", workdir,
                            with_cache=False, per_file=args.per_file)
            results["pandas"] = {"reference": pd_res, "ours": ours["raw_to_samples"], "files": len(files)}
    finally:
        if not args.keep:
            shutil.rmtree(run_root, ignore_errors=True)
        elif run_root.exists():
            log(f"stage outputs kept in {run_root}")

    # ---- figures ---------------------------------------------------------------------------------
    s1, s2 = results["full"]["raw_to_samples"], results["full"]["samples_to_cache"]
    rows = s1["rows"]
    raw_to_samples = rows / s1["seconds"]
    prep = rows / (s1["seconds"] + s2["seconds"])
    peak = max(s1["peak_rss_mb"], s2["peak_rss_mb"])
    summary: dict = {
        "raw_to_samples_rows_per_s": round(raw_to_samples),
        "prep_rows_per_s": round(prep),
        "peak_rss_mb": round(peak, 1),
        "speedup_vs_pandas": None,
        "rows": rows,
        "baskets": s1["baskets"],
        "ingest_rows_per_s": round(rows / s1["ingest_seconds"]),
        "samples_rows_per_s": round(rows / s1["samples_seconds"]),
        "cache_rows_per_s": round(rows / s2["seconds"]),
        "raw_to_samples_seconds": round(s1["seconds"], 3),
        "ingest_seconds": round(s1["ingest_seconds"], 3),
        "samples_seconds": round(s1["samples_seconds"], 3),
        "cache_seconds": round(s2["seconds"], 3),
        "peak_rss_mb_raw_to_samples": round(s1["peak_rss_mb"], 1),
        "peak_rss_mb_cache": round(s2["peak_rss_mb"], 1),
    }
    table = [
        ("raw -> transactions (ingest)", rows, s1["ingest_seconds"], None, None, None),
        ("transactions -> basket_samples", rows, s1["samples_seconds"], None, None, None),
        ("raw -> basket_samples", rows, s1["seconds"], s1["wall_seconds"], s1["peak_rss_mb"], s1),
        ("basket_samples -> tensor_cache", rows, s2["seconds"], s2["wall_seconds"], s2["peak_rss_mb"], s2),
        ("raw -> tensor_cache (total)", rows, s1["seconds"] + s2["seconds"],
         s1["wall_seconds"] + s2["wall_seconds"], peak, None),
    ]
    if "quarter" in results:
        q1, q2 = results["quarter"]["raw_to_samples"], results["quarter"]["samples_to_cache"]
        qrows = q1["rows"]
        qpeak = max(q1["peak_rss_mb"], q2["peak_rss_mb"])
        base = max(s1["rss_after_imports_mb"], s2["rss_after_imports_mb"])
        qbase = max(q1["rss_after_imports_mb"], q2["rss_after_imports_mb"])
        rows_ratio = rows / qrows
        mem_ratio = peak / qpeak
        work_ratio = (peak - base) / max(qpeak - qbase, 1e-9)
        summary.update({
            "rows_quarter": qrows,
            "peak_rss_mb_quarter": round(qpeak, 1),
            "rows_growth": round(rows_ratio, 3),
            "peak_rss_growth": round(mem_ratio, 3),
            "peak_rss_growth_exponent": round(math.log(mem_ratio) / math.log(rows_ratio), 3),
            "working_set_growth": round(work_ratio, 3),
            "peak_rss_growth_raw_to_samples": round(s1["peak_rss_mb"] / q1["peak_rss_mb"], 3),
            "peak_rss_growth_cache": round(s2["peak_rss_mb"] / q2["peak_rss_mb"], 3),
            "raw_to_samples_rows_per_s_quarter": round(qrows / q1["seconds"]),
            "prep_rows_per_s_quarter": round(qrows / (q1["seconds"] + q2["seconds"])),
            "peak_rss_mb_raw_to_samples_quarter": round(q1["peak_rss_mb"], 1),
            "peak_rss_mb_cache_quarter": round(q2["peak_rss_mb"], 1),
        })
        table += [
            ("raw -> basket_samples (N/4)", qrows, q1["seconds"], q1["wall_seconds"], q1["peak_rss_mb"], q1),
            ("basket_samples -> tensor_cache (N/4)", qrows, q2["seconds"], q2["wall_seconds"], q2["peak_rss_mb"],
             q2),
        ]
    if "pandas" in results:
        pr, ou = results["pandas"]["reference"], results["pandas"]["ours"]
        speedup = pr["seconds"] / ou["seconds"]
        summary["speedup_vs_pandas"] = round(speedup, 2)
        summary.update({
            "pandas_rows": pr["rows"],
            "pandas_seconds": round(pr["seconds"], 3),
            "pandas_read_csv_seconds": round(pr["read_seconds"], 3),
            "pandas_row_loop_seconds": round(pr["loop_seconds"], 3),
            "pandas_iloc_seconds": round(pr["iloc_seconds"], 3),
            "ours_on_pandas_rows_seconds": round(ou["seconds"], 3),
        })
        table += [
            ("pandas reference (seed)", pr["rows"], pr["seconds"], pr["wall_seconds"], pr["peak_rss_mb"], pr),
            ("  read_csv", pr["rows"], pr["read_seconds"], None, None, None),
            ("  row loop (itertuples)", pr["rows"], pr["loop_seconds"], None, None, None),
            ("  .iloc per sample", pr["rows"], pr["iloc_seconds"], None, None, None),
            ("ours raw -> basket_samples (same rows)", ou["rows"], ou["seconds"], ou["wall_seconds"],
             ou["peak_rss_mb"], ou),
        ]

    # ---- print -----------------------------------------------------------------------------------
    print()
    print(f"{'stage':<40} {'rows':>12} {'seconds':>9} {'rows/s':>12} {'wall s':>8} {'peak RSS MB':>12} "
          f"{'cores':>6} {'others':>7}")
    print("-" * 113)
    for name, n, sec, wall, rss, res in table:
        wall_s = "" if wall is None else f"{wall:.2f}"
        rss_s = "" if rss is None else f"{rss:.0f}"
        cores_s = "" if res is None else f"{res['child_cpu_utilisation']:.2f}"
        others_s = "" if res is None else f"{100 * res['others_cpu_share']:.0f}%"
        print(f"{name:<40} {n:>12,} {sec:>9.2f} {fmt_rate(n / sec):>12} {wall_s:>8} {rss_s:>12} "
              f"{cores_s:>6} {others_s:>7}")
    print("(seconds: the work alone, in a fresh process; wall s: that process including interpreter start and\n"
          " imports; cores: CPU seconds / wall seconds of that process; others: share of the machine's CPU used\n"
          " by other processes meanwhile - the machine is shared, a high share makes the timing pessimistic)")
    print()
    checks = [
        (f"raw -> basket_samples >= {TARGET_RAW_TO_SAMPLES:,} rows/s", raw_to_samples >= TARGET_RAW_TO_SAMPLES,
         f"{raw_to_samples:,.0f} rows/s"),
        (f"raw -> tensor_cache >= {TARGET_PREP:,} rows/s", prep >= TARGET_PREP, f"{prep:,.0f} rows/s"),
        (f"peak RSS < {TARGET_PEAK_MB:,} MB (target at 10M rows)", peak < TARGET_PEAK_MB,
         f"{peak:,.0f} MB at {rows:,} rows"),
    ]
    if "quarter" in results:
        checks.append((
            "peak RSS grows sub-linearly with rows", summary["peak_rss_growth"] < summary["rows_growth"],
            f"x{summary['peak_rss_growth']:.2f} RSS for x{summary['rows_growth']:.2f} rows "
            f"(exponent {summary['peak_rss_growth_exponent']:.2f}; above the post-import baseline "
            f"x{summary['working_set_growth']:.2f}; raw -> samples x{summary['peak_rss_growth_raw_to_samples']:.2f}, "
            f"cache x{summary['peak_rss_growth_cache']:.2f})",
        ))
    if summary["speedup_vs_pandas"] is not None:
        checks.append((f">= {TARGET_SPEEDUP:.0f}x the pandas reference", summary["speedup_vs_pandas"] >= TARGET_SPEEDUP,
                       f"x{summary['speedup_vs_pandas']:.1f} on {summary['pandas_rows']:,} rows"))
    targets_met = print_checks(checks)
    total = time.perf_counter() - t_start
    print(f"\nbenchmark wall time {total:.1f}s")
    summary["targets_met"] = targets_met

    print_result(summary, ["raw_to_samples_rows_per_s", "prep_rows_per_s", "peak_rss_mb", "speedup_vs_pandas",
                           "ingest_rows_per_s", "samples_rows_per_s", "cache_rows_per_s", "rows",
                           "peak_rss_mb_quarter", "rows_quarter"])
    if args.json is not None:
        write_json(args.json, summary, {"rows": args.rows, "pandas_rows": args.pandas_rows,
                                        "no_scaling": args.no_scaling}, total, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
