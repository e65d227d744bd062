"""How many memory slots and product neighbours does the model need? Measured, not assumed (issue 11 §4).

The model reads two bounded tables per basket: the point-in-time memory (the customer's ``K`` most
bought products before the basket, ``CacheConfig.history_items``) and each visible product's ``n`` most
co-occurring products (``CacheConfig.cooccurrence_neighbours``). Truncation only matters where it changes
a ranking, so this measures, on the **validation** split's evaluation positions (never test):

* Recall@10 of personal frequency read from the top-``K`` memory, for several ``K``, beside personal
  frequency over the complete as-of history (``K`` = ∞), and the share of carded lines whose product is
  in the memory (the copy path's reach) beside the share bought before at all;
* Recall@10 of co-occurrence summed over the visible products' top-``n`` neighbours, for several ``n``,
  beside co-occurrence over every neighbour (``n`` = ∞);
* Recall@10 of the memory's decayed share (``CacheConfig.memory_decay``: each earlier basket holding the
  product weighs ``decay ** age``) read from the ``K`` = ``history_items`` memory, for several decays,
  beside the same share over the complete history (TIFU-KNN's personal vector, no neighbours).

Run it on the real data to choose ``K`` and ``n`` (the generator plants at most 30 staples per
customer, so the demo data cannot justify these sizes on its own)::

    python benchmarks/memory_coverage.py --cache data/cache/<key> [--ks 16 32 64 128] [--ns 25 50 100 200] \
        [--decays 1.0 0.97 0.9]
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retailsim_pipeline.config import N_SPECIAL  # noqa: E402
from retailsim_pipeline.evaluation.baselines import (  # noqa: E402
    CooccurrenceScorer,
    PersonalFrequencyScorer,
    as_of_history,
    train_counts,
)
from retailsim_pipeline.evaluation.evaluate import prepare, rank_baseline  # noqa: E402
from retailsim_pipeline.evaluation.metrics import ranking_metrics  # noqa: E402
from retailsim_pipeline.prep.cache import TensorCache  # noqa: E402
from retailsim_pipeline.prep.fitting import build_product_neighbours, product_sets  # noqa: E402
from retailsim_pipeline.evaluation.strong_baselines import TifuKnnScorer  # noqa: E402
from retailsim_pipeline.prep.history import point_in_time_memory  # noqa: E402

log = logging.getLogger("memory_coverage")
SPLIT = "validation"


class MemoryFrequency:
    """Personal frequency from the first ``k`` slots of a memory [N, K_max] (tokens, counts), popularity ties."""

    def __init__(self, tokens: np.ndarray, counts: np.ndarray, k: int, popularity: np.ndarray):
        self.tokens, self.counts, self.k = tokens[:, :k].astype(np.int64), counts[:, :k].astype(np.float64), k
        self.popularity = popularity / (popularity.max(initial=0.0) + 1.0)  # [V] in [0, 1)

    def score(self, sample, visible_offsets, visible_tokens) -> torch.Tensor:
        n = len(sample)
        out = np.tile(self.popularity, (n, 1))
        rows = np.repeat(np.arange(n), self.k)
        np.add.at(out, (rows, self.tokens[sample].ravel()), self.counts[sample].ravel())
        out[:, :N_SPECIAL] = 0.0
        return torch.from_numpy(out.astype(np.float32))


class NeighbourCooccurrence:
    """Co-occurrence summed over the visible products' top-``n`` neighbours only."""

    def __init__(self, full: CooccurrenceScorer, n: int):
        similarity = full.similarity  # [V, V] dense
        neighbours, weights = build_product_neighbours(sp.csr_matrix(similarity), n)
        truncated = np.zeros_like(similarity)
        np.put_along_axis(truncated, neighbours.astype(np.int64), weights.astype(np.float64), axis=1)
        truncated[:, 0] = 0.0  # PAD fill
        self.similarity, self.vocab_size, self._tie = truncated, full.vocab_size, full._tie_breaker

    def score(self, sample, visible_offsets, visible_tokens) -> torch.Tensor:
        visible = product_sets(visible_offsets, visible_tokens, self.vocab_size)
        return torch.from_numpy((np.asarray(visible @ self.similarity) + self._tie).astype(np.float32))


def measure(cache: TensorCache, ks: list[int], ns: list[int], decays: list[float]) -> dict:
    setup = prepare(cache, cache.samples_dir, split=SPLIT)
    names = cache.split_names[: cache.split_names.index(SPLIT) + 1]
    splits = [cache.split(s) for s in names]
    key = np.concatenate([np.asarray(s.customer_key) for s in splits])
    past = np.concatenate([np.asarray(s.past_baskets) for s in splits])
    lengths = np.concatenate([np.diff(np.asarray(s.offsets)) for s in splits])
    tokens = np.concatenate([np.asarray(s.tokens) for s in splits])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    memory, counts, _, _ = point_in_time_memory(key, past, offsets, tokens, max(ks))
    first = sum(len(s) for s in splits[:-1])
    memory, counts = memory[first:], counts[first:]  # the validation baskets' memories
    train, scored = cache.split("train"), cache.split(SPLIT)
    vocab = cache.product_embeddings.shape[0]
    popularity = train_counts(train, vocab)
    recall = lambda scorer: float(ranking_metrics(rank_baseline(setup, scorer))["recall@10"])  # noqa: E731
    out = {"n_positions": int(len(setup.positions.target))}
    out["memory"] = {k: recall(MemoryFrequency(memory, counts, k, popularity)) for k in ks}
    out["memory"]["all"] = recall(PersonalFrequencyScorer(train, scored, vocab, history=as_of_history(cache, SPLIT)))
    # reach: share of carded positions whose target is in the memory, and bought before at all
    p = setup.positions
    carded = np.asarray(scored.customer_key)[p.sample] > 0
    out["reach"] = {k: float((memory[p.sample, :k] == p.target[:, None]).any(axis=1)[carded].mean()) for k in ks}
    out["reach"]["all"] = float((setup.groups["repeat_vs_explore"][carded] == "repeat").mean())
    full = CooccurrenceScorer(train, vocab)
    out["neighbours"] = {n: recall(NeighbourCooccurrence(full, n)) for n in ns}
    out["neighbours"]["all"] = recall(full)
    k_memory = int(cache.manifest["config"]["history_items"])
    history = as_of_history(cache, SPLIT)
    out["decayed"] = {}
    for decay in decays:
        slots = point_in_time_memory(key, past, offsets, tokens, k_memory, decay=decay)
        out["decayed"][decay] = {
            # shares ≥ 6e-5 (float16's smallest normal): × 1e6 keeps popularity (< 1) a tie-breaker below them
            "memory": recall(MemoryFrequency(slots.tokens[first:], slots.decayed[first:].astype(np.float64) * 1e6,
                                             k_memory, popularity)),
            "all": recall(TifuKnnScorer(train, scored, vocab, history=history, decay=decay, k=1, alpha=1.0)),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--ns", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--decays", type=float, nargs="+", default=[1.0, 0.97, 0.9])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    result = measure(TensorCache.open(args.cache), sorted(args.ks), sorted(args.ns), args.decays)
    log.info("%s, %s split, %d positions (%.0f s)", args.cache, SPLIT, result["n_positions"], time.perf_counter() - t0)
    log.info("| memory slots K | personal frequency Recall@10 | carded targets in the memory |")
    log.info("|---:|---:|---:|")
    for k in [*sorted(args.ks), "all"]:
        log.info("| %s | %.4f | %.1f %% |", k, result["memory"][k], 100 * result["reach"][k])
    log.info("| neighbours n | co-occurrence Recall@10 |")
    log.info("|---:|---:|")
    for n in [*sorted(args.ns), "all"]:
        log.info("| %s | %.4f |", n, result["neighbours"][n])
    log.info("| decay | decayed share from the memory, Recall@10 | over the complete history |")
    log.info("|---:|---:|---:|")
    for decay, r in result["decayed"].items():
        log.info("| %s | %.4f | %.4f |", decay, r["memory"], r["all"])


if __name__ == "__main__":
    main()
