"""The world model's losses (DESIGN §6; seed 001): focal loss on masked products, in-basket InfoNCE, auxiliary CEs.

Every loss is computed in fp32 whatever the autocast dtype of its inputs. :class:`WorldModelLoss` combines them
per training phase: warm-up trains the focal loss alone, main and fine-tune the weighted sum of
:class:`~retailsim_pipeline.config.LossWeights`.
"""

import torch
import torch.nn.functional as F

from retailsim_pipeline.config import AUX_HEADS, PAD, TrainingConfig
from retailsim_pipeline.model.batch import IGNORE_INDEX, Batch

__all__ = ["PHASES", "LOSS_PARTS", "WorldModelLoss", "aux_losses", "exclude_visible", "focal_loss", "info_nce"]

PHASES = ("warmup", "main", "finetune")
#: Every part :class:`WorldModelLoss` reports (besides "total"), named as the fields of ``LossWeights``.
LOSS_PARTS: tuple[str, ...] = ("focal", "contrastive", *AUX_HEADS)


def _zero_with_grad(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim fp32 zero connected to ``t``'s graph, so ``backward`` works when a loss has nothing to score."""
    return t.float().sum() * 0.0


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, reduction: str = "mean",
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) ``-(1 - p_t)^γ · log p_t`` over classes, from ``log_softmax`` in fp32.

    logits [N, V], targets [N] int64 (``ignore_index`` rows are skipped). ``reduction``: "mean" over the
    scored rows (0 with a grad path if there are none), "sum", or "none" ([N], 0 at ignored rows).
    ``gamma = 0`` is exactly ``F.cross_entropy``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"focal_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logits = logits.float()
    valid = targets != ignore_index
    if reduction == "mean" and not bool(valid.any()):
        return _zero_with_grad(logits)
    if gamma == 0:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    log_p = F.log_softmax(logits, dim=-1)
    log_p_t = log_p.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # [N]
    # (1 - p_t) via -expm1(log p_t): no cancellation when p_t is close to 1.
    loss = -(-torch.expm1(log_p_t)).pow(gamma) * log_p_t
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def info_nce(hidden: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 0.07,
             max_per_basket: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Supervised-contrastive InfoNCE: products of the same basket are positives, all others negatives.

    hidden [B, S, d] (e.g. the decoder output), attention_mask [B, S] bool. Up to ``max_per_basket`` real
    positions are drawn per basket (uniformly, by ``generator``, or the global RNG if None), giving
    ``M ≤ B·max_per_basket`` L2-normalised vectors. For each anchor i with at least one positive,
    ``-log(Σ_{p ∈ pos(i)} exp(s_ip / τ) / Σ_{a ≠ i} exp(s_ia / τ))``; the loss is the mean over those anchors
    (baskets with one product have none). Returns a 0-dim fp32 tensor, 0 with a grad path if no anchor.
    Cost is O((B·max_per_basket)²): 1024² similarities at batch 256.
    """
    B, S, d = hidden.shape  # batch, basket length, width
    attention_mask = attention_mask.bool()
    m = min(max_per_basket, S)
    # Random keys, real positions first: the m smallest keys per row are a uniform sample of real positions.
    device = generator.device if generator is not None else hidden.device
    keys = torch.rand(B, S, generator=generator, device=device).to(hidden.device)
    keys = keys.masked_fill(~attention_mask, 2.0)
    picked = keys.topk(m, dim=1, largest=False).indices  # [B, m]
    valid = attention_mask.gather(1, picked).reshape(-1)  # [B·m]
    z = hidden.float().gather(1, picked.unsqueeze(-1).expand(B, m, d)).reshape(B * m, d)
    z = F.normalize(z, dim=-1)
    sim = z @ z.t() / temperature  # [B·m, B·m]

    basket = torch.arange(B, device=hidden.device).repeat_interleave(m)  # [B·m]
    not_self = ~torch.eye(B * m, dtype=torch.bool, device=hidden.device)
    others = not_self & valid.unsqueeze(0)  # columns: every other real sample
    positives = others & (basket.unsqueeze(0) == basket.unsqueeze(1))
    anchors = valid & positives.any(dim=1)
    if not bool(anchors.any()):
        return _zero_with_grad(hidden)
    neg_inf = torch.finfo(sim.dtype).min
    log_all = torch.logsumexp(sim.masked_fill(~others, neg_inf), dim=1)
    log_pos = torch.logsumexp(sim.masked_fill(~positives, neg_inf), dim=1)
    return (log_all - log_pos)[anchors].mean()


def aux_losses(aux_logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy of each auxiliary head: {head: loss}; ``labels`` [B, 4] columns in ``AUX_HEADS`` order."""
    return {name: F.cross_entropy(aux_logits[name].float(), labels[:, i]) for i, name in enumerate(AUX_HEADS)}


def exclude_visible(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``logits`` [N_pred, V] (rows: ``batch.predict_mask`` in row-major order) with each basket's visible
    products — its real positions that are not predicted — set to -inf: the question trained is the one
    evaluated, "which product is missing?", whose answer is never a product already in view
    (the evaluation and the served ranking exclude them too).
    A product both visible and the answer (the same product on two lines) is never excluded."""
    predict_mask = batch.predict_mask
    rows = predict_mask.nonzero()[:, 0]  # [N_pred] basket of each predicted position
    visible = batch.tokens.masked_fill(predict_mask | ~batch.attention_mask.bool(), PAD)  # [B, S]
    visible = visible[rows]  # [N_pred, S]
    visible = visible.masked_fill(visible == batch.targets[predict_mask].unsqueeze(1), PAD)
    return logits.scatter(1, visible, float("-inf"))  # PAD (never an answer) is excluded with them


class WorldModelLoss:
    """The training objective per phase (DESIGN §6).

    ``warmup``: focal loss only (weight 1.0). ``main`` / ``finetune``: ``LossWeights``-weighted sum of focal,
    contrastive and the four auxiliary CEs. ``parts`` always holds every part (detached 0-dim fp32 tensors;
    parts a phase does not train are computed under ``no_grad``, for logging) and "total".
    """

    def __init__(self, config: TrainingConfig, max_per_basket: int = 4):
        self.gamma = config.gamma
        self.exclude_visible = config.exclude_visible
        self.temperature = config.temperature
        self.weights = config.loss_weights
        self.max_per_basket = max_per_basket

    def __call__(self, outputs: dict, batch: Batch, phase: str,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """outputs: the model's dict (``product_logits`` [N_pred, V] for ``batch.predict_mask``, or [B, S, V]);
        generator: draws the contrastive loss's positions (pass a seeded one for reproducible validation)."""
        if phase not in PHASES:
            raise ValueError(f"WorldModelLoss: phase must be one of {PHASES}, got {phase!r}")
        predict_mask = batch.predict_mask
        logits = outputs["product_logits"]
        if logits.dim() == 3:  # full [B, S, V] logits
            logits = logits[predict_mask]
        if self.exclude_visible:
            logits = exclude_visible(logits, batch)
        focal = focal_loss(logits, batch.targets[predict_mask], gamma=self.gamma)

        def rest() -> dict[str, torch.Tensor]:
            parts = {"contrastive": info_nce(outputs["hidden"], batch.attention_mask, self.temperature,
                                             self.max_per_basket, generator)}
            parts.update(aux_losses(outputs["aux"], batch.labels))
            return parts

        if phase == "warmup":
            with torch.no_grad():
                others = rest()
            total = focal
        else:
            others = rest()
            total = self.weights.focal * focal
            for name, value in others.items():
                total = total + getattr(self.weights, name) * value
        parts = {"focal": focal.detach(), **{k: v.detach() for k, v in others.items()}, "total": total.detach()}
        return total, parts
