"""Deterministic evaluation masking: which lines of a split are hidden and scored (DESIGN §7).

Every model and every baseline is scored on the *same* positions, so their metrics compare directly.
The positions are a pure function of ``(split arrays, seed, mask_prob)``: one seeded uniform draw ``u``
over the split's whole flat token array decides them, so they depend neither on batching, nor on the
order in which samples are scored, nor on which model is scored.

Rules
-----
* A line is hidden when ``u < mask_prob``.
* A basket of length ≥ 2 in which no *scorable* line (see UNK below) was hidden gets its scorable line
  with the smallest ``u`` hidden, so every such basket contributes at least one position.
* Baskets of length 1 are kept out entirely (nothing hidden, no position): with their only line hidden
  nothing of the basket would remain visible, and the task — "which product completes this basket" —
  would become a pure context task that is not comparable with the rest.
* Lines whose token is UNK (a product not in the train vocabulary) are never targets: no model and no
  baseline can predict a token that stands for "some product we never saw". They may still be hidden
  by the draw (and then are hidden in the model's input, like any hidden line), but they are not
  scored and they are not used to satisfy the "≥ 1 per basket" rule. A basket whose lines are all UNK
  therefore has no position.

:func:`visible_tokens` gives, for each position, the products of its basket that remain visible (the
input of the baselines, and what ranking excludes from the candidates).

The model's question is the one a client can ask
-----------------------------------------------
:func:`completion_batch` gives the world model, for each scored basket, its *visible* lines in their
order followed by one MASK: "which product completes this basket?". That one ranking scores every
hidden target of the basket, exactly as the baselines score the visible set. It is the input a served
model builds from a request (the products the client knows, then the slot to fill: see
:mod:`~retailsim_pipeline.prep.requests`), so the evaluated ranking and the served one are the same
computation. (Hiding the lines in place instead, several MASKs among the visible lines, asks a question
no client can pose: where in the basket the missing lines were. On the demo data both inputs score
the same model within 0.001 Recall@10.) :func:`masked_batch` keeps the in-place variant for tests.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from retailsim_pipeline.config import EvaluationConfig
from retailsim_pipeline.config import MASK, PAD, UNK
from retailsim_pipeline.prep.cache import SplitArrays
from retailsim_pipeline.model.batch import IGNORE_INDEX, Batch
from retailsim_pipeline.training.batches import BatchAssembler

_EVAL = EvaluationConfig()  # the defaults: one source for the seed and the mask rate


@dataclass
class EvalPositions:
    """The scored positions of one split, sorted by (sample, position).

    split     name of the split the positions belong to
    seed      seed of the uniform draw
    sample    [P] int64  row of the basket in the split
    position  [P] int64  0-based line position inside the basket's CSR token slice
    target    [P] int64  the hidden token id (never < N_SPECIAL)
    hidden    [L] bool   over the split's flat CSR tokens: hidden in the input (⊇ the targets' lines)
    """

    split: str
    seed: int
    sample: np.ndarray
    position: np.ndarray
    target: np.ndarray
    hidden: np.ndarray

    def __len__(self) -> int:
        return len(self.sample)


def _basket_of_line(offsets: np.ndarray) -> np.ndarray:
    """[L] int64: the basket row of each flat line of a CSR split."""
    lengths = np.diff(offsets)
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def eval_positions(arrays: SplitArrays, *, seed: int = _EVAL.seed, mask_prob: float = _EVAL.mask_rate,
                   split: str = "test") -> EvalPositions:
    """The evaluation positions of a split (rules in the module docstring). Vectorized over all lines."""
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    offsets = np.asarray(arrays.offsets, dtype=np.int64)  # [N + 1]
    tokens = np.asarray(arrays.tokens)  # [L]
    lengths = np.diff(offsets)  # [N]
    n_lines = len(tokens)
    basket = _basket_of_line(offsets)  # [L]

    u = np.random.default_rng(seed).random(n_lines)  # [L] the one draw everything depends on
    eligible = lengths[basket] >= 2  # [L] baskets of length 1 are kept out
    scorable = eligible & (tokens != UNK)  # [L] lines that may be targets
    hidden = eligible & (u < mask_prob)  # [L]

    # Baskets with no scorable hidden line: force their scorable line of smallest u.
    has_target = np.bincount(basket[hidden & scorable], minlength=len(lengths)) > 0  # [N]
    need = scorable & ~has_target[basket]  # [L] scorable lines of baskets still without a target
    if need.any():
        cand = np.flatnonzero(need)  # ascending, so grouped by basket
        order = np.lexsort((u[cand], basket[cand]))  # by basket, then by u
        sorted_baskets = basket[cand][order]
        first = np.flatnonzero(np.r_[True, sorted_baskets[1:] != sorted_baskets[:-1]])
        hidden[cand[order[first]]] = True

    target_line = np.flatnonzero(hidden & scorable)  # [P] ascending: sorted by (sample, position)
    sample = basket[target_line]
    return EvalPositions(
        split=split,
        seed=seed,
        sample=sample,
        position=target_line - offsets[sample],
        target=tokens[target_line].astype(np.int64),
        hidden=hidden,
    )


def csr_gather(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of the CSR ``(offsets, values)`` as a new CSR ``(offsets [len(rows) + 1], values)``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    starts = offsets[rows]
    counts = offsets[rows + 1] - starts  # [R]
    out_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=out_offsets[1:])
    # Index of each output element in `values`: its row's start + its rank within the row.
    within = np.arange(out_offsets[-1], dtype=np.int64) - np.repeat(out_offsets[:-1], counts)
    return out_offsets, np.asarray(values)[np.repeat(starts, counts) + within]


def visible_tokens(arrays: SplitArrays, positions: EvalPositions) -> tuple[np.ndarray, np.ndarray]:
    """For each position, the visible (not hidden) tokens of its basket, in line order.

    Returns ``(offsets [P + 1] int64, tokens [sum] int64)``: a CSR with one row per position. The
    row may contain UNK (a visible line of an unknown product) and may be empty (every line hidden).
    """
    offsets = np.asarray(arrays.offsets, dtype=np.int64)
    tokens = np.asarray(arrays.tokens)
    if len(positions.hidden) != len(tokens):
        raise ValueError(f"positions of split {positions.split!r} cover {len(positions.hidden)} lines, "
                         f"the arrays have {len(tokens)}: they belong to another split or cache")
    keep = ~positions.hidden  # [L]
    basket = _basket_of_line(offsets)
    vis_offsets = np.zeros(len(offsets), dtype=np.int64)  # [N + 1] per-basket CSR of the visible lines
    np.cumsum(np.bincount(basket[keep], minlength=len(offsets) - 1), out=vis_offsets[1:])
    out_offsets, out_tokens = csr_gather(vis_offsets, tokens[keep], positions.sample)
    return out_offsets, out_tokens.astype(np.int64)


def completion_batch(assembler: BatchAssembler, indices: np.ndarray, visible: np.ndarray | None = None) -> Batch:
    """The :class:`Batch` asking "which product completes this basket?" for split rows ``indices``.

    Row i holds the ``visible`` lines of basket ``indices[i]`` in line order (``visible``: [L] bool over
    the assembler's split, e.g. ``~EvalPositions.hidden``; None = every line), with their prices, then
    one MASK (price zero) at position n_visible: the only position of ``predict_mask``. Its target is
    UNK (the basket's hidden products are ranked against that one slot by the caller). Context and
    memory are those of the basket, as the assembler builds them.
    """
    idx = np.asarray(indices, dtype=np.int64)
    offsets = assembler.offsets  # [N + 1]
    lengths = offsets[idx + 1] - offsets[idx]  # [B]
    batch = assembler.assemble(idx, mask_prob=0.0, mask_seed=(0,))  # nothing masked
    B, S = batch.tokens.shape
    real = np.arange(S)[None, :] < lengths[:, None]  # [B, S]
    if visible is None:
        keep = real
    else:
        visible = np.asarray(visible, dtype=bool)
        if len(visible) != int(offsets[-1]):
            raise ValueError(f"visible covers {len(visible)} lines; split {assembler.split!r} has {int(offsets[-1])}")
        keep = np.zeros((B, S), dtype=bool)
        rows, cols = np.nonzero(real)
        keep[rows, cols] = visible[offsets[idx][rows] + cols]
    n_visible = keep.sum(axis=1)  # [B]
    # Visible lines first, in line order (a stable sort on "not visible"), then the slot.
    order = torch.from_numpy(np.argsort(~keep, axis=1, kind="stable"))  # [B, S]
    shown = torch.from_numpy(np.arange(S + 1)[None, :] < n_visible[:, None])  # [B, S + 1]
    tokens = torch.cat([torch.gather(batch.tokens, 1, order), batch.tokens.new_zeros(B, 1)], dim=1)
    price = torch.gather(batch.price, 1, order[..., None].expand(-1, -1, batch.price.shape[2]))
    price = torch.cat([price, price.new_zeros(B, 1, price.shape[2])], dim=1)
    tokens = tokens.masked_fill(~shown, PAD)
    price = price.masked_fill(~shown[..., None], 0.0)
    rows = torch.arange(B)
    slot = torch.from_numpy(n_visible.astype(np.int64))
    tokens[rows, slot] = MASK
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[rows, slot] = UNK
    attention_mask = torch.from_numpy(np.arange(S + 1)[None, :] <= n_visible[:, None])
    return dataclasses.replace(batch, tokens=tokens, targets=targets, attention_mask=attention_mask, price=price)


def request_logits(model: torch.nn.Module, features, requests, *, batch_size: int = 512, device: str | None = None):
    """The served model's scores: yields ``(rows, logits [B, V] float32, tokens [B, S])`` per chunk of
    ``batch_size`` requests, in request order (``tokens``: the completion batch's input, the basket's
    own products and the slot). ``features``: :class:`~retailsim_pipeline.prep.requests.ServingFeatures`.

    The requests become an in-memory tensor cache (:meth:`~retailsim_pipeline.prep.requests.ServingFeatures.request_cache`)
    read by the :class:`BatchAssembler` and :func:`completion_batch`, as :func:`~retailsim_pipeline.evaluation.
    evaluate.rank_model` reads a split: one code path for serving, batch scoring and re-scoring a champion.
    """
    from retailsim_pipeline.prep.requests import REQUEST_SPLIT

    cache = features.request_cache(requests)
    assembler = BatchAssembler(cache, REQUEST_SPLIT, batch_size=batch_size, shuffle=False)
    device = device or str(next(model.parameters()).device)
    model.eval()
    n = len(cache.split(REQUEST_SPLIT))
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            rows = np.arange(lo, min(n, lo + batch_size))
            batch = completion_batch(assembler, rows).to(device)
            out = model(**batch.model_inputs(), predict_mask=batch.predict_mask)
            yield rows, out["product_logits"].float(), batch.tokens


def masked_batch(assembler: BatchAssembler, indices: np.ndarray, hidden: np.ndarray) -> Batch:
    """The :class:`Batch` of split rows ``indices`` in which exactly the ``hidden`` lines are masked.

    ``hidden`` is [L] bool over the assembler's split (``EvalPositions.hidden``). At hidden lines:
    token = MASK (always; no 80/10/10), price = 0, target = the original token — except where that
    token is UNK, whose target stays ``IGNORE_INDEX`` (it is not scored, see the module docstring).
    So ``batch.targets[batch.predict_mask]`` lists, in row-major order, exactly the
    :class:`EvalPositions` of these samples (for ``indices`` in ascending order, in the same order).
    """
    idx = np.asarray(indices, dtype=np.int64)
    hidden = np.asarray(hidden, dtype=bool)
    offsets = assembler.offsets  # [N + 1] the assembler's CSR of the split
    if len(hidden) != int(offsets[-1]):
        raise ValueError(f"hidden covers {len(hidden)} lines; split {assembler.split!r} has {int(offsets[-1])}")
    batch = assembler.assemble(idx, mask_prob=0.0, mask_seed=(0,))  # nothing masked
    lengths = offsets[idx + 1] - offsets[idx]  # [B]
    S = batch.tokens.shape[1]
    rows, cols = np.nonzero(np.arange(S)[None, :] < lengths[:, None])  # [M] real positions, row-major
    hide = hidden[offsets[idx][rows] + cols]  # [M]
    r = torch.from_numpy(rows[hide])
    c = torch.from_numpy(cols[hide])
    original = batch.tokens[r, c]
    batch.targets[r, c] = torch.where(original == UNK, torch.full_like(original, IGNORE_INDEX), original)
    batch.tokens[r, c] = MASK
    batch.price[r, c] = 0.0
    return batch
