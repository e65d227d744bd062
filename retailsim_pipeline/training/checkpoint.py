"""Checkpoints: everything needed to resume exactly, written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors and primitives (no pickled objects, so ``torch.load(...,
weights_only=True)`` can read it safely):

- ``model``, ``ema``: state dicts (the EMA weights are the ones evaluated and exported)
- ``optimizer``, ``scheduler``: state dicts
- ``rng``: torch CPU (and CUDA) generator states; batches and masks need none: they are seeded by
  (seed, epoch, batch number)
- ``step`` (optimizer steps done), ``epoch`` and ``batch`` (how many of its share of that epoch's
  batches the rank has trained on: with one process, the next batch number to run)
- ``ranks``: one ``{"rank", "batch", "rng"}`` per rank, in rank order (``rng`` and ``batch`` above
  are rank 0's), gathered when the checkpoint is taken so each rank resumes from its own;
  ``world_size`` and ``grad_accum_steps``, which decide how an epoch is shared out (a checkpoint
  without these keys is read as one process's)
- ``best_val_loss``, ``bad_validations``, ``history`` (logged metrics), ``config`` (TrainingConfig
  as a dict), ``cache_key``, ``format``
"""

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save({**state, "format": CHECKPOINT_FORMAT}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint here")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    # .cpu(): generator states must be CPU byte tensors, and a checkpoint may be loaded onto a GPU.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class EMA:
    """Exponential moving average of a model's floating-point state (seed 002), ``decay`` per update.

    Buffers are copied (not averaged), so the frozen product table and any integer state stay exact.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._params = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        names = [k for k in self._params if k in current]
        torch._foreach_lerp_([self.shadow[k] for k in names], [current[k].detach() for k in names], 1.0 - self.decay)
        for k, v in current.items():
            if k not in self._params:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)
