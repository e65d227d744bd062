"""One rank of the DDP tests in ``test_trainer.py``, launched by ``torchrun``: trains the tiny preset
and writes what the tests compare to ``OUT/rank<RANK>.pt``.

    torchrun --standalone --nproc_per_node=2 -m retailsim_pipeline_tests.training.ddp_worker PARAMS_JSON

``PARAMS_JSON``: ``{"cache": tensor cache folder, "out": run folder, "overrides": TrainingConfig
overrides, "resume": "auto" or null, "nan_at": [rank, k] or null, "sigterm_at": [rank, k] or null}``.
``nan_at`` makes that rank's k-th training micro-batch loss NaN; ``sigterm_at`` sends SIGTERM to
that rank's own process during its k-th training micro-batch. Both are monkeypatches of this
process: the trainer has no test hook.

Collectives time out after 60 s (not gloo's 30 min), so ranks that fall out of step fail the test
instead of hanging it. ``rank<RANK>.pt`` holds the rank's weights (``model``, ``ema``), ``steps``, ``stopped``, the
``skipped_steps`` it logged, ``assembled``: the ``[epoch, batch number]`` of every training batch
it assembled, and ``node``: its node's rank (torchrun's ``GROUP_RANK``).
"""

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import retailsim_pipeline.training.trainer as trainer_mod
from retailsim_pipeline.config import training_preset
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.training.run import apply_overrides


class Recorder:
    """Metrics logger that keeps the skipped-step counts (logged by every rank)."""

    def __init__(self):
        self.skipped: list[list[int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "train/skipped_steps" in metrics:
            self.skipped.append([step, int(metrics["train/skipped_steps"])])


def patch_loss(nan_at: int | None, sigterm_at: int | None) -> None:
    """Replace the trainer's loss by one that, on this rank's ``nan_at``-th training micro-batch,
    returns NaN, and on its ``sigterm_at``-th signals this process."""
    calls = 0

    class HookedLoss(trainer_mod.WorldModelLoss):
        def __call__(self, outputs, batch, phase):
            nonlocal calls
            total, parts = super().__call__(outputs, batch, phase)
            if not torch.is_grad_enabled():  # validation
                return total, parts
            calls += 1
            if calls == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return (total * float("nan"), parts) if calls == nan_at else (total, parts)

    trainer_mod.WorldModelLoss = HookedLoss


def main(params: dict) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # the trainer uses an initialised group
    hooks = {name: params[name][1] for name in ("nan_at", "sigterm_at") if params.get(name) and params[name][0] == rank}
    if hooks:
        patch_loss(hooks.get("nan_at"), hooks.get("sigterm_at"))
    config = apply_overrides(training_preset("tiny"), {"device": "cpu", **params["overrides"]})
    recorder = Recorder()
    trainer = trainer_mod.Trainer(config, TensorCache.open(Path(params["cache"])), Path(params["out"]),
                                  metrics=recorder, resume=params.get("resume"))
    assembled: list[list[int]] = []
    assemble = trainer.train_data.assemble

    def recording(indices, *, mask_prob, mask_seed):
        assembled.append([int(mask_seed[1]), int(mask_seed[2])])  # (seed, epoch, batch_no)
        return assemble(indices, mask_prob=mask_prob, mask_seed=mask_seed)

    trainer.train_data.assemble = recording
    result = trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(), "steps": result.steps,
                "stopped": result.stopped, "skipped_steps": recorder.skipped, "assembled": assembled,
                "node": int(os.environ["GROUP_RANK"])},
               Path(params["out"]) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
