"""The training schedule as small pure functions (DESIGN §6, seed 001): phases, learning rate, masking.

| phase     | epochs (of 20) | LR    | mask prob | loss      |
|-----------|----------------|-------|-----------|-----------|
| warm-up   | 1–3            | 1e-5  | 15 %      | focal     |
| main      | 4–15           | 5e-5  | 15 %      | all parts |
| fine-tune | 16–20          | 1e-5  | 20 %      | all parts |

Boundaries scale with the number of epochs (``warmup_fraction``, ``finetune_fraction``), rounded to
whole epochs; the very first ``lr_ramp_steps`` optimizer steps ramp the LR linearly from ~0 (seed 002).
"""

from dataclasses import dataclass

from retailsim_pipeline.config import TrainingConfig

PHASES = ("warmup", "main", "finetune")


@dataclass(frozen=True)
class PhasePlan:
    """Epochs [0, warmup_end) are warm-up, [warmup_end, finetune_start) main, the rest fine-tune (0-based)."""

    epochs: int
    warmup_end: int
    finetune_start: int

    def phase(self, epoch: int) -> str:
        if epoch < self.warmup_end:
            return "warmup"
        return "main" if epoch < self.finetune_start else "finetune"


def phase_plan(config: TrainingConfig) -> PhasePlan:
    e = config.epochs
    warmup = min(e, round(e * config.warmup_fraction))
    finetune = min(e - warmup, round(e * config.finetune_fraction))
    return PhasePlan(epochs=e, warmup_end=warmup, finetune_start=e - finetune)


def phase_lr(phase: str, config: TrainingConfig) -> float:
    return {"warmup": config.lr_warmup, "main": config.lr_main, "finetune": config.lr_finetune}[phase]


def learning_rate(step: int, epoch: int, config: TrainingConfig, plan: PhasePlan) -> float:
    """LR of optimizer step ``step`` (0-based) taken in ``epoch``."""
    ramp = 1.0 if config.lr_ramp_steps == 0 else min(1.0, (step + 1) / config.lr_ramp_steps)
    return phase_lr(plan.phase(epoch), config) * ramp


def mask_prob(phase: str, config: TrainingConfig) -> float:
    return config.mask_prob_finetune if phase == "finetune" else config.mask_prob


def phase_table(config: TrainingConfig) -> list[dict]:
    """One row per phase: 1-based epoch range, LR, mask probability, loss (for logs and the README)."""
    plan = phase_plan(config)
    bounds = {"warmup": (0, plan.warmup_end), "main": (plan.warmup_end, plan.finetune_start),
              "finetune": (plan.finetune_start, plan.epochs)}
    rows = []
    for phase in PHASES:
        lo, hi = bounds[phase]
        if hi > lo:
            rows.append({"phase": phase, "epochs": f"{lo + 1}–{hi}", "lr": phase_lr(phase, config),
                         "mask_prob": mask_prob(phase, config),
                         "loss": "focal" if phase == "warmup" else "focal + contrastive + aux"})
    return rows
