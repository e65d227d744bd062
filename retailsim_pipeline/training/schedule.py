"""The training schedule as small pure functions (DESIGN §6, seed 001): phases, learning rate, masking.

| phase     | epochs (of 20) | LR    | mask prob | loss      |
|-----------|----------------|-------|-----------|-----------|
| warm-up   | 1–3            | 1e-5  | 15 %      | focal     |
| main      | 4–15           | 5e-5  | 15 %      | all parts |
| fine-tune | 16–20          | 1e-5  | 20 %      | all parts |

Boundaries scale with the run: the first ``warmup_fraction`` (15 %) of the planned optimizer steps
(``epochs`` × steps per epoch) are warm-up and the last ``finetune_fraction`` (25 %) fine-tune, so a
2-epoch CPU demo still passes through all three phases. ``max_steps`` cuts a run short without
moving the boundaries (a resumed run sees the same schedule). The first ``lr_ramp_steps`` steps
ramp the LR linearly from ~0 (seed 002).

Steps per epoch are the steps every rank actually takes (:func:`steps_per_epoch`): under ``torchrun``
each rank trains on its own share of an epoch's batches (:func:`rank_batches`), all shares equally
long and a whole number of optimizer steps, so the phase boundaries are the same on every rank and
for every world size that splits the epoch the same way.
"""

from dataclasses import dataclass

from retailsim_pipeline.config import TrainingConfig


@dataclass(frozen=True)
class PhasePlan:
    """Steps [0, warmup_end) are warm-up, [warmup_end, finetune_start) main, the rest fine-tune."""

    total_steps: int
    warmup_end: int
    finetune_start: int

    def phase(self, step: int) -> str:
        if step < self.warmup_end:
            return "warmup"
        return "main" if step < self.finetune_start else "finetune"


def steps_per_epoch(n_batches: int, world_size: int = 1, grad_accum_steps: int = 1) -> int:
    """Optimizer steps per epoch of ``n_batches`` batches: each of ``world_size`` ranks gets
    ``n_batches // world_size`` of them, used in groups of ``grad_accum_steps``; a partial group is
    left out (never carried into the next epoch), as are the last ``n_batches % world_size`` batches
    of the epoch's order (a different few every epoch: the order is reshuffled)."""
    return n_batches // world_size // grad_accum_steps


def rank_batches(n_batches: int, rank: int = 0, world_size: int = 1, grad_accum_steps: int = 1) -> range:
    """The batch numbers (positions in the epoch's order) that rank ``rank`` trains on, in order:
    every ``world_size``-th from ``rank``, :func:`steps_per_epoch` × ``grad_accum_steps`` of them.

    Optimizer step ``k`` of the epoch therefore uses the consecutive batches
    ``[k·A·W, (k + 1)·A·W)`` of the epoch's order (A = ``grad_accum_steps``, W = ``world_size``), one
    ``A``-long share per rank; with one process it is ``range(n_batches // A * A)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    used = steps_per_epoch(n_batches, world_size, grad_accum_steps) * grad_accum_steps
    return range(rank, used * world_size, world_size)


def phase_plan(config: TrainingConfig, steps_per_epoch: int) -> PhasePlan:
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(total * config.warmup_fraction))
    finetune = min(total - warmup, round(total * config.finetune_fraction))
    return PhasePlan(total_steps=total, warmup_end=warmup, finetune_start=total - finetune)


def phase_lr(phase: str, config: TrainingConfig) -> float:
    return {"warmup": config.lr_warmup, "main": config.lr_main, "finetune": config.lr_finetune}[phase]


def learning_rate(step: int, config: TrainingConfig, plan: PhasePlan) -> float:
    """LR of optimizer step ``step`` (0-based)."""
    ramp = 1.0 if config.lr_ramp_steps == 0 else min(1.0, (step + 1) / config.lr_ramp_steps)
    return phase_lr(plan.phase(step), config) * ramp


def mask_prob(phase: str, config: TrainingConfig) -> float:
    return config.mask_prob_finetune if phase == "finetune" else config.mask_prob
