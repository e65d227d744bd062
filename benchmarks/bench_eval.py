"""Evaluation at scale: the shared setup (positions, as-of history, buckets) and the simple baselines'
ranks on a tensor cache, with seconds, positions/s and memory per stage (issue 13 §2).

    python benchmarks/bench_eval.py --cache DIR --samples DIR [--split test]
        [--scorers popularity,cooccurrence,personal_frequency] [--json PATH]

The stages are what :func:`~retailsim_pipeline.evaluation.evaluate.evaluate` runs for every model and
baseline: ``prepare`` (the scored positions, the visible items, the customers' as-of history over every
split up to the scored one, the cold-start and repeat buckets), then per baseline its fit on train and
its ranks on every position. The model's own ranks are left out (``bench_train.py`` measures the model;
on a CPU its ranks over a full-scale test split take hours).

Memory: the cache stays memory-mapped, so the process's resident set counts the pages of the cache it
has read (``RssFile``: the kernel's page cache, dropped under pressure) beside its own allocations
(``RssAnon``). The table shows both at the end of each stage and the process's peak (``VmHWM``, file
pages included): a stage that loaded a split into RAM would show it in ``RssAnon``.

Prints a table and a final ``RESULT`` line; ``--json`` writes the same figures.
"""

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

from retailsim_pipeline.evaluation.baselines import CooccurrenceScorer, PersonalFrequencyScorer, PopularityScorer
from retailsim_pipeline.evaluation.evaluate import prepare, rank_baseline
from retailsim_pipeline.evaluation.metrics import ranking_metrics
from retailsim_pipeline.prep.cache import TensorCache

log = logging.getLogger("bench_eval")

SCORERS = {
    "popularity": lambda cache, split, history: PopularityScorer(cache.split("train"), _vocab(cache)),
    "cooccurrence": lambda cache, split, history: CooccurrenceScorer(cache.split("train"), _vocab(cache)),
    "personal_frequency": lambda cache, split, history: PersonalFrequencyScorer(
        cache.split("train"), cache.split(split), _vocab(cache), history=history),
}


def _vocab(cache: TensorCache) -> int:
    return int(cache.product_embeddings.shape[0])


def memory_mb() -> dict[str, float]:
    """The process's VmHWM (peak), RssAnon and RssFile, in MB (Linux ``/proc/self/status``)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "RssAnon", "RssFile"):
                out[name] = int(value.split()[0]) / 1024
    return out


def stage(rows: list[dict], name: str, fn, positions: int | None = None):
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    row = {"stage": name, "seconds": round(seconds, 2), **{k: round(v) for k, v in memory_mb().items()}}
    if positions:
        row["positions_per_s"] = round(positions / seconds)
    rows.append(row)
    log.info("%s: %.1fs, peak %s MB, anon %s MB, file %s MB", name, seconds, row.get("VmHWM"), row.get("RssAnon"),
             row.get("RssFile"))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="a built tensor cache (its key folder)")
    p.add_argument("--samples", type=Path, required=True, help="the basket_samples folder it was built from")
    p.add_argument("--split", default="test")
    p.add_argument("--scorers", default=",".join(SCORERS), help=f"comma-separated, of {', '.join(SCORERS)}")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench %(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    names = [s for s in args.scorers.split(",") if s]
    unknown = [s for s in names if s not in SCORERS]
    if unknown:
        p.error(f"unknown scorer(s) {', '.join(unknown)}; known: {', '.join(SCORERS)}")

    rows: list[dict] = []
    t_start = time.perf_counter()
    cache = stage(rows, "open cache", lambda: TensorCache.open(args.cache))
    arrays = cache.split(args.split)
    setup = stage(rows, "prepare (positions, as-of history, buckets)",
                  lambda: prepare(cache, args.samples, split=args.split))
    n_positions = int(len(setup.positions.target))
    lines = int(np.asarray(cache.split("train").offsets)[-1])
    recall = {}
    for name in names:
        fitted = stage(rows, f"{name}: fit on train", lambda: SCORERS[name](cache, args.split, setup.history))
        ranks = stage(rows, f"{name}: rank every position", lambda: rank_baseline(setup, fitted), n_positions)
        recall[name] = round(float(ranking_metrics(ranks)["recall@10"]), 4)
    total = time.perf_counter() - t_start

    print(f"\ncache {args.cache}: {len(arrays):,} {args.split} baskets, {n_positions:,} scored positions, "
          f"{lines:,} train lines; as-of index {setup.history.order.nbytes / 2**20:,.0f} MB "
          f"({setup.history.n_baskets:,} baskets)")
    print(f"{'stage':<46} {'seconds':>8} {'positions/s':>12} {'peak MB':>8} {'anon MB':>8} {'file MB':>8}")
    print("-" * 95)
    for r in rows:
        rate = f"{r['positions_per_s']:,}" if "positions_per_s" in r else ""
        print(f"{r['stage']:<46} {r['seconds']:>8.1f} {rate:>12} {r.get('VmHWM', 0):>8,} {r.get('RssAnon', 0):>8,} "
              f"{r.get('RssFile', 0):>8,}")
    print("(peak: VmHWM of the process so far, file pages of the memory-mapped cache included; anon: its own "
          "allocations at the end of the stage; file: cache pages resident then)")
    print(f"recall@10: {', '.join(f'{k} {v}' for k, v in recall.items())}")
    print(f"benchmark wall time {total:.1f}s")
    peak = max(r.get("VmHWM", 0) for r in rows)
    anon = max(r.get("RssAnon", 0) for r in rows)
    result = {"baskets": len(arrays), "positions": n_positions, "train_lines": lines,
              "prepare_seconds": rows[1]["seconds"], "peak_rss_mb": peak, "max_anon_mb": anon,
              **{f"{k}_recall10": v for k, v in recall.items()},
              **{f"{r['stage'].split(':')[0]}_positions_per_s": r["positions_per_s"] for r in rows
                 if "positions_per_s" in r}}
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    if args.json:
        args.json.write_text(json.dumps({"result": result, "stages": rows, "machine": platform.node(),
                                         "cache": str(args.cache)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
