#!/usr/bin/env python
"""Benchmark of the data preparation: raw weekly CSVs → basket_samples → tensor_cache.

Usage::

    python benchmarks/bench_prep.py [--rows N] [--json PATH] [--workdir DIR] [--pandas-rows M]
                                    [--keep] [--no-scaling]

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
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: Rows the generator writes per (baskets_per_week x week), measured on the demo preset
#: (1,456,352 rows for 40 weeks x 3,700 baskets: ~9.84 lines per basket incl. trend and season).
ROWS_PER_BASKET_UNIT = 9.84
DEFAULT_ROWS = 10_000_000
DEFAULT_PANDAS_ROWS = 1_000_000

TARGET_RAW_TO_SAMPLES = 1_000_000  # rows/s
TARGET_PREP = 500_000  # rows/s, raw → tensor_cache
TARGET_PEAK_MB = 4096  # at 10M rows
TARGET_SPEEDUP = 10.0


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
    summary = generate(cfg, Path(spec["out_dir"]), progress=True)
    return {
        "seconds": time.perf_counter() - t0,
        "rows": summary.rows,
        "baskets": summary.baskets,
        "weeks": summary.weeks,
        "reused": summary.reused,
        "files": [str(f) for f in summary.files],
    }


def child_raw_to_samples(spec: dict) -> dict:
    """Ingest every weekly CSV, then build the basket samples (the two timed halves of stage 1)."""
    from retailsim_pipeline.prep.ingest import ingest_weekly_file
    from retailsim_pipeline.prep.samples import build_basket_samples

    work = Path(spec["work_dir"])
    files = [Path(f) for f in spec["files"]]
    rss_after_imports = _vm_rss_mb()
    t0 = time.perf_counter()
    accepted = quarantined = 0
    for f in files:
        res = ingest_weekly_file(f, work / "transactions", work / "quarantine")
        accepted += res.rows
        quarantined += res.quarantined
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
    from retailsim_pipeline.prep.cache import build_tensor_cache

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


CHILDREN = {
    "generate": child_generate,
    "raw_to_samples": child_raw_to_samples,
    "samples_to_cache": child_samples_to_cache,
    "pandas_reference": child_pandas_reference,
}


def child_main(name: str, spec_path: str, out_path: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    result = CHILDREN[name](spec)
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
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); command: {' '.join(cmd)}")
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


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_data(rows: int, workdir: Path) -> tuple[dict, Path, dict]:
    cfg = generator_config_dict(rows)
    data_dir = workdir / f"data-{rows}-{config_key(cfg)}"
    log(f"data for {rows:,} rows: {cfg['n_weeks']} weeks x {cfg['baskets_per_week']:,} baskets/week, "
        f"{cfg['n_customers']:,} customers -> {data_dir}")
    gen = run_child("generate", {"config": cfg, "out_dir": str(data_dir)}, workdir / "tmp")
    log(f"  {'reused' if gen['reused'] else 'generated'} {gen['rows']:,} rows, {gen['baskets']:,} baskets, "
        f"{gen['weeks']} weekly files in {gen['wall_seconds']:.1f}s")
    return cfg, data_dir, gen


def run_prep(label: str, files: list[str], run_dir: Path, workdir: Path, with_cache: bool = True) -> dict:
    """Stage 1 (and 2) on ``files`` in fresh children, outputs under ``run_dir`` (emptied first)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log(f"{label}: raw -> basket_samples on {len(files)} weekly files ...")
    s1 = run_child("raw_to_samples", {"work_dir": str(run_dir), "files": files}, workdir / "tmp")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        child_main(*argv[1:4])
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows to generate (default 10M)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/retailsim_bench"),
                   help="generated data (cached, keyed by config) and stage outputs")
    p.add_argument("--pandas-rows", type=int, default=DEFAULT_PANDAS_ROWS,
                   help="rows of the pandas reference subset (whole weekly files; 0 = skip)")
    p.add_argument("--keep", action="store_true", help="keep the stage outputs (transactions, samples, cache)")
    p.add_argument("--no-scaling", action="store_true", help="skip the N/4 run that shows memory growth")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_root = workdir / f"run-{os.getpid()}"
    results: dict = {}
    try:
        # ---- full size -----------------------------------------------------------------------
        cfg, data_dir, gen = ensure_data(args.rows, workdir)
        manifest = json.loads((data_dir / "ground_truth" / "generator.json").read_text())
        full = run_prep(f"{gen['rows']:,} rows", gen["files"], run_root / "full", workdir)
        results["full"] = {"generator": gen, "config": cfg, **full}

        # ---- N/4: memory growth ---------------------------------------------------------------
        if not args.no_scaling:
            q_rows = args.rows // 4
            qcfg, qdir, qgen = ensure_data(q_rows, workdir)
            if not args.keep:
                shutil.rmtree(run_root / "full", ignore_errors=True)  # disk: one run's outputs at a time
            quarter = run_prep(f"{qgen['rows']:,} rows (N/4)", qgen["files"], run_root / "quarter", workdir)
            results["quarter"] = {"generator": qgen, "config": qcfg, **quarter}

        # ---- pandas reference vs ours on the same files ----------------------------------------
        if args.pandas_rows > 0:
            files, sub_rows = subset_files(gen["files"], args.pandas_rows, manifest)
            log(f"pandas reference on {len(files)} weekly files ({sub_rows:,} rows) ...")
            pd_res = run_child("pandas_reference", {"files": files}, workdir / "tmp")
            log(f"  {pd_res['seconds']:.2f}s (read_csv {pd_res['read_seconds']:.2f}s, row loop "
                f"{pd_res['loop_seconds']:.2f}s, .iloc per sample {pd_res['iloc_seconds']:.2f}s)")
            ours = run_prep(f"{sub_rows:,} rows (pandas subset)", files, run_root / "subset", workdir,
                            with_cache=False)
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
    for name, ok, detail in checks:
        print(f"  [{'ok  ' if ok else 'MISS'}] {name:<48} {detail}")
    total = time.perf_counter() - t_start
    print(f"\nbenchmark wall time {total:.1f}s")
    summary["targets_met"] = all(ok for _, ok, _ in checks)

    keys = ["raw_to_samples_rows_per_s", "prep_rows_per_s", "peak_rss_mb", "speedup_vs_pandas",
            "ingest_rows_per_s", "samples_rows_per_s", "cache_rows_per_s", "rows", "peak_rss_mb_quarter",
            "rows_quarter"]
    print("RESULT " + " ".join(f"{k}={'na' if summary[k] is None else summary[k]}" for k in keys if k in summary))

    if args.json is not None:
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
            "args": {"rows": args.rows, "pandas_rows": args.pandas_rows, "no_scaling": args.no_scaling},
            "benchmark_wall_seconds": round(total, 1),
            "stages": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
