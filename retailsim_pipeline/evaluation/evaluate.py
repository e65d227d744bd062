"""Score a world model, the baselines and the oracle on exactly the same masked positions of a split.

1. :func:`eval_positions` hides lines of the split with a fixed seed (independent of batching and of
   the model), so every model and every baseline answers the same questions.
2. Each scorer ranks the whole vocabulary for each hidden line, excluding the basket's visible
   products and the special tokens; ranks become Recall/Precision@K, MRR, NDCG@10.
3. Every metric is also reported per cold-start bucket (the customer's baskets before this one, in
   any split: ``evaluation/buckets.py``), per basket-length bucket, and for repeat items (the customer
   bought the product before this basket) vs explore items — the as-of history of
   :class:`~retailsim_pipeline.prep.history.AsOfHistory`, the same the model and the baselines read.
4. The model's auxiliary heads are scored too (accuracy, macro-F1, confusion matrices).

Returns the ``model``/``baselines``/``oracle``/``buckets`` parts of ``metrics.json`` (the contract:
``evaluation/schema.py``); :func:`~retailsim_pipeline.evaluation.promotion.metrics_document` adds the
promotion and the metadata.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from retailsim_pipeline.config import AUX_CLASSES, AUX_HEADS, N_SPECIAL, EvaluationConfig
from retailsim_pipeline.evaluation.baselines import as_of_history
from retailsim_pipeline.evaluation.buckets import BUCKET_GROUPS, bucket_cold_start, bucket_length, bucket_repeat
from retailsim_pipeline.evaluation.metrics import (
    Ranks,
    classification_metrics,
    grouped_ranking_metrics,
    ranking_metrics,
    target_ranks,
)
from retailsim_pipeline.evaluation.positions import (
    EvalPositions,
    completion_batch,
    eval_positions,
    request_logits,
    visible_tokens,
)
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.history import AsOfHistory
from retailsim_pipeline.prep.schema import LABEL_CODES, LABEL_COLUMNS
from retailsim_pipeline.training.batches import BatchAssembler

log = logging.getLogger(__name__)

AUX_LABELS = {
    "basket_size": [*LABEL_CODES["BASKET_SIZE"], "unknown"],
    "price_sensitivity": list(LABEL_CODES["BASKET_PRICE_SENSITIVITY"]),
    "mission_type": list(LABEL_CODES["BASKET_TYPE"]),
    "mission_focus": list(LABEL_CODES["BASKET_DOMINANT_MISSION"]),
}
assert [len(AUX_LABELS[h]) for h in AUX_HEADS] == [AUX_CLASSES[h] for h in AUX_HEADS]
assert len(LABEL_COLUMNS) == len(AUX_HEADS)


@dataclass
class EvalSetup:
    """Everything shared by the scorers: positions, visible items, each position's groups, and the
    customers' as-of history over the splits up to the scored one (the baselines read it too)."""

    cache: TensorCache
    split: str
    positions: EvalPositions
    visible_offsets: np.ndarray
    visible_tokens: np.ndarray
    groups: dict[str, np.ndarray]
    history: AsOfHistory
    samples_dir: Path


def prepare(cache: TensorCache, samples_dir: Path, *, split: str = "test", seed: int = EvaluationConfig().seed,
            mask_rate: float = EvaluationConfig().mask_rate) -> EvalSetup:
    arrays = cache.split(split)
    positions = eval_positions(arrays, seed=seed, mask_prob=mask_rate, split=split)
    v_off, v_tok = visible_tokens(arrays, positions)
    samples = pl.read_parquet(Path(samples_dir) / f"{split}.parquet", columns=["basket_id"])
    if not np.array_equal(samples.get_column("basket_id").to_numpy(), np.asarray(arrays.basket_id)):
        raise ValueError(f"{samples_dir}/{split}.parquet does not match the tensor cache {cache.path} row by row")
    # As of each basket: the customer's baskets before it (any split), and whether they held the target.
    key = np.asarray(arrays.customer_key, dtype=np.int64)[positions.sample]
    past = np.asarray(arrays.past_baskets, dtype=np.int64)[positions.sample]
    history = as_of_history(cache, through=split)
    lengths = np.diff(np.asarray(arrays.offsets))
    bought = np.zeros(len(key), dtype=bool)
    for lo, hi in _chunks(len(key), 1 << 14):
        counts = history.counts(key[lo:hi], past[lo:hi])  # [n, V] sparse
        bought[lo:hi] = np.asarray(counts[np.arange(hi - lo), positions.target[lo:hi]]).ravel() > 0
    repeat = bucket_repeat((key > 0) & bought)
    groups = {
        "cold_start": bucket_cold_start(past, key > 0),
        "basket_length": bucket_length(lengths[positions.sample]),
        "repeat_vs_explore": repeat,
    }
    return EvalSetup(cache, split, positions, v_off, v_tok, groups, history, Path(samples_dir))


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def rank_baseline(setup: EvalSetup, scorer, chunk: int = 2048) -> Ranks:
    """Ranks of every hidden target under a baseline scorer (``score(sample, v_off, v_tok) -> [n, V]``)."""
    p = setup.positions
    parts = []
    for lo, hi in _chunks(len(p.target), chunk):
        off = setup.visible_offsets[lo: hi + 1]
        tok = setup.visible_tokens[off[0]: off[-1]]
        off = off - off[0]
        scores = scorer.score(p.sample[lo:hi], off, tok)
        parts.append(target_ranks(scores, p.target[lo:hi], off, tok))
    return Ranks.concat(parts)


@torch.no_grad()
def rank_model(setup: EvalSetup, model: torch.nn.Module, *, batch_size: int = 512, device: str = "cpu"
               ) -> tuple[Ranks, dict[str, np.ndarray]]:
    """Ranks of every hidden target under the model, and its auxiliary predictions per scored basket.

    Each scored basket is asked once, as a client would ask the served model: its visible lines, then
    one slot to fill (:func:`~retailsim_pipeline.evaluation.positions.completion_batch`); every hidden
    target of the basket is ranked in that slot's scores."""
    model = model.to(device).eval()
    assembler = BatchAssembler(setup.cache, setup.split, batch_size=batch_size, shuffle=False)
    p = setup.positions
    visible = ~p.hidden
    samples = np.unique(p.sample)
    parts, aux_pred, aux_true = [], {h: [] for h in AUX_HEADS}, []
    pos_lo = 0
    for lo, hi in _chunks(len(samples), batch_size):
        idx = samples[lo:hi]
        batch = completion_batch(assembler, idx, visible).to(device)
        out = model(**batch.model_inputs(), predict_mask=batch.predict_mask)  # product_logits [B, V]
        pos_hi = pos_lo + int(np.searchsorted(p.sample[pos_lo:], idx[-1], side="right"))
        # Positions are sorted by (sample, line): each one's basket row in this batch.
        row = torch.from_numpy(np.searchsorted(idx, p.sample[pos_lo:pos_hi])).to(device)
        off = setup.visible_offsets[pos_lo: pos_hi + 1]
        tok = setup.visible_tokens[off[0]: off[-1]]
        scores = out["product_logits"].float()[row].cpu()
        parts.append(target_ranks(scores, p.target[pos_lo:pos_hi], off - off[0], tok))
        for head in AUX_HEADS:
            aux_pred[head].append(out["aux"][head].argmax(dim=1).cpu().numpy())
        aux_true.append(batch.labels.cpu().numpy())
        pos_lo = pos_hi
    assert pos_lo == len(p.target)
    labels = np.concatenate(aux_true) if aux_true else np.zeros((0, 4), np.int64)
    aux = {h: np.concatenate(aux_pred[h]) for h in AUX_HEADS}
    return Ranks.concat(parts), {"pred": aux, "true": labels}


def _grouped(setup: EvalSetup, ranks_by_scorer: dict[str, Ranks | None]) -> dict:
    orders = BUCKET_GROUPS
    buckets: dict = {}
    for group, order in orders.items():
        per_scorer = {name: (grouped_ranking_metrics(r, setup.groups[group], order) if r is not None else None)
                      for name, r in ranks_by_scorer.items()}
        buckets[group] = {}
        for label in order:
            entry = {name: (g.get(label) if g is not None else None) for name, g in per_scorer.items()}
            if entry.get("model") is not None:
                buckets[group][label] = entry
    return buckets


def evaluate(
    cache: TensorCache,
    samples_dir: Path,
    model: torch.nn.Module,
    *,
    split: str = "test",
    seed: int = EvaluationConfig().seed,
    mask_rate: float = EvaluationConfig().mask_rate,
    oracle=None,
    device: str = "cpu",
    choice: dict | None = None,
    bootstrap_resamples: int = EvaluationConfig().bootstrap_resamples,
    bootstrap_confidence: float = EvaluationConfig().bootstrap_confidence,
) -> dict:
    """``{"model", "baselines", "oracle", "buckets", "baseline_choice", "significance", "n_positions",
    "n_baskets"}`` for one model.

    ``choice`` is :func:`~retailsim_pipeline.evaluation.gate.choose_baselines`' document (the tuned baselines'
    settings and the strongest baseline, from the validation split); computed here when not given."""
    from retailsim_pipeline.evaluation.gate import baseline_scorers, choose_baselines, compare_with_baselines

    if choice is None:
        choice = choose_baselines(cache, samples_dir, seed=seed, mask_rate=mask_rate)
    setup = prepare(cache, samples_dir, split=split, seed=seed, mask_rate=mask_rate)
    model_ranks, aux = rank_model(setup, model, device=device)
    baseline_ranks = {name: rank_baseline(setup, scorer)
                      for name, scorer in baseline_scorers(cache, split, choice["params"],
                                                           history=setup.history).items()}
    oracle_ranks = rank_baseline(setup, oracle) if oracle is not None else None
    model_metrics = ranking_metrics(model_ranks)
    model_metrics["aux"] = {
        head: classification_metrics(aux["true"][:, i], aux["pred"][head], AUX_CLASSES[head], AUX_LABELS[head])
        for i, head in enumerate(AUX_HEADS)
    }
    return {
        "model": model_metrics,
        "baselines": {k: ranking_metrics(r) for k, r in baseline_ranks.items()},
        "oracle": ranking_metrics(oracle_ranks) if oracle_ranks is not None else None,
        "buckets": _grouped(setup, {"model": model_ranks, **baseline_ranks, "oracle": oracle_ranks}),
        "baseline_choice": choice,
        "significance": compare_with_baselines(model_ranks, baseline_ranks, setup.positions.sample,
                                               n_resamples=bootstrap_resamples, confidence=bootstrap_confidence,
                                               seed=seed),
        "n_positions": int(len(setup.positions.target)),
        "n_baskets": int(len(np.unique(setup.positions.sample))),
        "_ranks": {"model": model_ranks},
        "_setup": setup,
    }


def position_requests(setup: EvalSetup) -> tuple[pl.DataFrame, np.ndarray]:
    """The scored baskets as a client would send them to a served model: ``(requests, sample)``.

    One request per scored basket (``sample``: its row in the split, ascending): customer, store, time
    (date and hour), the till's basket id and the *visible* lines (product codes, quantities, spend) in
    line order, read from the samples (codes, not this cache's token ids, so any model's vocabulary can
    read them). Lines beyond the cache's ``max_basket_len`` cut are not part of the basket, as in the cache.
    """
    arrays = setup.cache.split(setup.split)
    offsets = np.asarray(arrays.offsets, dtype=np.int64)
    sample = np.unique(setup.positions.sample)
    frame = pl.read_parquet(setup.samples_dir / f"{setup.split}.parquet",
                            columns=["basket_id", "cust_code", "store_code", "date", "hour", "products", "spend",
                                     "quantity"])
    if not np.array_equal(frame.get_column("basket_id").to_numpy(), np.asarray(arrays.basket_id)):
        raise ValueError(f"{setup.samples_dir}/{setup.split}.parquet does not match the tensor cache row by row")
    visible = ~setup.positions.hidden  # [L] over the cache's lines
    baskets = frame.with_row_index("sample").filter(pl.col("sample").is_in(sample))
    cut = pl.Series("cut", (offsets[sample + 1] - offsets[sample]).astype(np.int64))
    lines = (baskets.with_columns(cut).select("sample", pl.col("products").list.head(pl.col("cut")),
                                              pl.col("spend").list.head(pl.col("cut")),
                                              pl.col("quantity").list.head(pl.col("cut")))
             .explode("products", "spend", "quantity")
             .with_columns(pl.int_range(pl.len()).over("sample").alias("line")))
    flat = offsets[lines.get_column("sample").to_numpy()] + lines.get_column("line").to_numpy()
    kept = (lines.filter(pl.Series(visible[flat]))
            .group_by("sample", maintain_order=True)
            .agg(pl.col("products").cast(pl.String), pl.col("quantity").cast(pl.Int64).alias("quantities"),
                 pl.col("spend").cast(pl.Float64)))
    requests = (baskets.select("sample", "basket_id", pl.col("cust_code").cast(pl.String).alias("customer_code"),
                               pl.col("store_code").cast(pl.String),
                               pl.col("date").cast(pl.Datetime).dt.offset_by(pl.format("{}h", pl.col("hour")))
                               .alias("timestamp"))
                .join(kept, on="sample", how="left", maintain_order="left")
                .with_columns(pl.col("products").fill_null([]), pl.col("quantities").fill_null([]),
                              pl.col("spend").fill_null([])))
    return requests.drop("sample"), requests.get_column("sample").to_numpy()


def rank_served(setup: EvalSetup, model: torch.nn.Module, features, *, batch_size: int = 512) -> Ranks:
    """Ranks of every hidden target under a *served* model: its own vocabulary and serving features
    (:class:`~retailsim_pipeline.prep.requests.ServingFeatures`), asked through
    :func:`~retailsim_pipeline.evaluation.positions.request_logits` with :func:`position_requests`.

    Targets are matched by product code: a product the model's vocabulary lacks is a miss (ranked last),
    never another product. For the model the cache was built for, this equals :func:`rank_model`.
    """
    p = setup.positions
    requests, sample = position_requests(setup)
    token_of = {code: i for i, code in enumerate(features.product_codes) if i >= N_SPECIAL}
    vocab = setup.cache.vocabulary().get_column("PROD_CODE").cast(pl.String).to_list()
    target = np.array([token_of.get(vocab[t], -1) for t in p.target], dtype=np.int64)  # [P] in the model's ids
    basket = np.searchsorted(sample, p.sample)  # [P] request row of each position
    parts = []
    for rows, logits, tokens in request_logits(model, features, requests, batch_size=batch_size):
        lo, hi = np.searchsorted(basket, [rows[0], rows[-1] + 1])
        row = torch.from_numpy(basket[lo:hi] - rows[0])
        scores = logits.cpu()[row]
        seen = tokens.cpu()[row]  # the request's own products (and PAD/MASK) are not candidates
        counts = np.full(hi - lo, seen.shape[1], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        known = target[lo:hi] >= N_SPECIAL
        ranks = target_ranks(scores, np.where(known, target[lo:hi], N_SPECIAL), offsets, seen.flatten().numpy())
        # A miss is ranked with N_SPECIAL standing in for its target, which makes that token a candidate
        # even where it is one of the request's own products: then it is one candidate too many.
        stand_in_seen = (seen == N_SPECIAL).any(dim=1).numpy()
        n_candidates = np.where(known, ranks.n_candidates, ranks.n_candidates - stand_in_seen)
        # A product the model never saw: behind every candidate, so a miss at every K.
        parts.append(Ranks(np.where(known, ranks.n_greater, n_candidates), np.where(known, ranks.n_ties, 0),
                           n_candidates))
    return Ranks.concat(parts)


def rescore_model(setup: EvalSetup, served, device: str = "cpu") -> dict:
    """Ranking metrics of another model (the champion) on the same positions, through its own vocabulary
    and serving features (``served``: :class:`~retailsim_pipeline.tracking.serving.ServedModel`)."""
    return ranking_metrics(rank_served(setup, served.model.to(device), served.features))
