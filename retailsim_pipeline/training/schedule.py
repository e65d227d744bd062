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
