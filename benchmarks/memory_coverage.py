"""How many memory slots and product neighbours does the model need? Measured, not assumed (issue 11 §4).

The model's copy path reads each basket's memory: the customer's ``K`` most bought products before the
basket (``CacheConfig.history_items``, :mod:`retailsim_pipeline.prep.history`). A repeat purchase the
memory misses can only come from the rest of the model. For the lines of a split's carded baskets this
prints, for several ``K``, the share of lines whose product is in the top-``K`` memory, beside the
share whose product the customer bought at all before (the ceiling, ``K`` = ∞), and how much of that
ceiling each ``K`` reaches. Run it on the real data to choose ``K`` (the generator plants at most 30
staples per customer, so the demo data cannot justify a memory size on its own)::

    python benchmarks/memory_coverage.py --cache data/cache/<key> [--split test] [--ks 8 16 32 64 128]

The same for the co-occurrence path (``CacheConfig.cooccurrence_neighbours``): the share of the split's
lines whose product is among the top-``n`` train co-occurrence neighbours of another product of the
same basket, beside the share that co-occurs in train with another product of the basket at all.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retailsim_pipeline.config import N_SPECIAL  # noqa: E402
from retailsim_pipeline.prep.cache import TensorCache  # noqa: E402
from retailsim_pipeline.prep.fitting import build_product_neighbours, cooccurrence_similarity  # noqa: E402
from retailsim_pipeline.prep.fitting import product_sets  # noqa: E402
from retailsim_pipeline.prep.history import AsOfHistory, point_in_time_memory  # noqa: E402

log = logging.getLogger("memory_coverage")


def coverage(cache: TensorCache, split: str, ks: list[int]) -> dict:
    """{"lines", "ever": share bought before, K: share in the top-K memory} over the split's carded lines."""
    names = cache.split_names
    splits = [cache.split(s) for s in names]
    key = np.concatenate([np.asarray(s.customer_key) for s in splits])
    past = np.concatenate([np.asarray(s.past_baskets) for s in splits])
    lengths = np.concatenate([np.diff(np.asarray(s.offsets)) for s in splits])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.concatenate([np.asarray(s.tokens) for s in splits])
    memory, _ = point_in_time_memory(key, past, offsets, tokens, max(ks))  # [N_all, K_max], best first
    first = sum(len(s) for s in splits[:names.index(split)])
    scored = cache.split(split)
    n = len(scored)
    line_basket = np.repeat(np.arange(n), np.diff(np.asarray(scored.offsets)))  # [L]
    line_token = np.asarray(scored.tokens, dtype=np.int64)
    carded = (np.asarray(scored.customer_key)[line_basket] > 0) & (line_token >= N_SPECIAL)
    line_basket, line_token = line_basket[carded], line_token[carded]
    # rank of each line's product in its basket's memory (K_max where absent)
    slots = memory[first + line_basket]  # [L', K_max]
    hit = slots == line_token[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), max(ks))
    history = AsOfHistory(splits, cache.product_embeddings.shape[0])
    ever = np.zeros(len(line_token), dtype=bool)
    for lo in range(0, n, 1 << 13):
        hi = min(n, lo + (1 << 13))
        sel = (line_basket >= lo) & (line_basket < hi)
        counts = history.counts(np.asarray(scored.customer_key)[lo:hi], np.asarray(scored.past_baskets)[lo:hi])
        ever[sel] = np.asarray(counts[line_basket[sel] - lo, line_token[sel]]).ravel() > 0
    out = {"lines": int(len(line_token)), "ever": float(ever.mean()) if len(ever) else 0.0}
    for k in ks:
        out[k] = float((rank < k).mean()) if len(rank) else 0.0
    return out


def neighbour_coverage(cache: TensorCache, split: str, ns: list[int]) -> dict:
    """{"lines", "ever": share co-occurring in train with another product of the basket, n: share among
    the top-n neighbours of another product of the basket} over the split's lines."""
    train, scored = cache.split("train"), cache.split(split)
    vocab = cache.product_embeddings.shape[0]
    similarity = cooccurrence_similarity(train.offsets, train.tokens, vocab)  # [V, V]
    neighbours, _ = build_product_neighbours(similarity, max(ns))  # [V, n_max], best first
    baskets = product_sets(scored.offsets, scored.tokens, vocab)  # [N, V] 0/1
    rows, products = baskets.nonzero()
    out = {"lines": int(len(rows))}
    reach = baskets @ (similarity > 0).astype(np.float64)  # [N, V]: co-occurs with a product of the basket
    out["ever"] = float((np.asarray(reach[rows, products]).ravel() > 0).mean()) if len(rows) else 0.0
    for n in ns:
        top = np.zeros((vocab, vocab))
        np.put_along_axis(top, neighbours[:, :n].astype(np.int64), 1.0, axis=1)
        top[:, 0] = 0.0  # PAD fill
        reach = baskets @ top  # [N, V] dense
        out[n] = float((reach[rows, products] > 0).mean()) if len(rows) else 0.0
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--ns", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    cache = TensorCache.open(args.cache)
    result = coverage(cache, args.split, sorted(args.ks))
    log.info("%s, split %s: %d carded lines; bought before (any K): %.1f %% (%.1f s)", args.cache, args.split,
             result["lines"], 100 * result["ever"], time.perf_counter() - t0)
    log.info("| K | lines in the top-K memory | share of the repeat ceiling |")
    log.info("|---:|---:|---:|")
    for k in sorted(args.ks):
        log.info("| %d | %.1f %% | %.1f %% |", k, 100 * result[k], 100 * result[k] / max(result["ever"], 1e-12))
    result = neighbour_coverage(cache, args.split, sorted(args.ns))
    log.info("%d lines; co-occurring in train with another product of the basket (any n): %.1f %%",
             result["lines"], 100 * result["ever"])
    log.info("| neighbours n | lines among another product's top-n | share of the ceiling |")
    log.info("|---:|---:|---:|")
    for n in sorted(args.ns):
        log.info("| %d | %.1f %% | %.1f %% |", n, 100 * result[n], 100 * result[n] / max(result["ever"], 1e-12))


if __name__ == "__main__":
    main()
