"""The training loop (DESIGN §6; seeds 001–004): one readable class.

Per optimizer step: a bucketed batch from the tensor cache (masking seeded by seed/epoch/batch) →
forward under bf16 autocast on CUDA → phase-weighted loss → backward (gradient accumulation over
``grad_accum_steps`` micro-batches) → NaN/Inf guard (any non-finite micro-batch loss skips the step)
→ grad-norm clip 1.0 → AdamW (no decay on norms, biases, ``A_log``, ``D``) → LR from
the phase table → EMA update. Every ``log_every`` steps the injected logger gets each loss part, LR,
grad norm and samples/s; every ``val_every`` steps the EMA weights are scored on a fixed validation
subset (same masked positions every time), the best is checkpointed, and ``patience`` validations
without improvement stop training. ``checkpoint_every`` steps (and on SIGINT/SIGTERM, and at the end)
``last.pt`` is written atomically with everything needed to resume exactly: N steps, a stop, a
resume and N more steps give the weights of 2N steps straight.

Batches and steps (one process or several):

* An epoch's order of batches is a pure function of (seed, epoch) and a batch's masking of (seed,
  epoch, batch number), so a batch is the same whichever rank assembles it and whenever.
* Each rank assembles only its own share of the epoch
  (:func:`~retailsim_pipeline.training.schedule.rank_batches`: every WORLD_SIZE-th batch of the
  order, from its rank on). All shares are equally long and a whole number of optimizer steps, so
  every rank takes the same steps, and ``steps_per_epoch`` — behind the phase boundaries and the
  LR — is the number of steps actually taken (the last few batches of an epoch's order that do not
  fill a step on every rank are left out; the order is reshuffled every epoch).
* Gradients are zeroed whenever the batches are (re)opened (a new epoch, or a phase change inside
  one), so nothing of an unfinished step carries over.
* Every micro-batch's loss is checked; a non-finite one skips the optimizer step, on every rank
  (the flag is all-reduced), and ``max_bad_steps`` skipped steps in a row abort the run.

Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel; only rank 0 logs,
validates and writes files, and a stop of any rank (``max_steps``, a signal, early stopping) stops
all of them at the same step. Checkpoints are taken between optimizer steps by all ranks together:
rank 0 gathers every rank's position in its share and its RNG states (``ranks`` in the checkpoint)
and writes the one file, atomically; on resume each rank restores its own. Resuming under another
world size continues from the same point of the epoch, but not exactly (a warning says so).
"""

import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from retailsim_pipeline.config import ModelConfig, TrainingConfig
from retailsim_pipeline.model.losses import WorldModelLoss
from retailsim_pipeline.model.world_model import WorldModel, count_parameters, no_decay_parameter_names
from retailsim_pipeline.config import N_SPECIAL
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.training.batches import BatchAssembler
from retailsim_pipeline.training.checkpoint import (
    BEST,
    EMA,
    LAST,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from retailsim_pipeline.training.schedule import learning_rate, mask_prob, phase_plan, rank_batches, steps_per_epoch

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN/Inf for too many steps)."""


class NullMetrics:
    """Logger used when none is injected (tests, dry runs)."""

    def log_metrics(self, metrics: dict, step: int) -> None:  # noqa: D102
        pass


@dataclass
class TrainResult:
    out_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    best_val_loss: float
    steps: int
    epochs_completed: int
    samples_per_s: float
    wall_seconds: float
    stopped: str  # "completed", "early_stopping", "max_steps", "signal"
    parameters: int
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "out_dir": str(self.out_dir), "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "last_checkpoint": str(self.last_checkpoint), "best_val_loss": self.best_val_loss, "steps": self.steps,
            "epochs_completed": self.epochs_completed, "samples_per_s": self.samples_per_s,
            "wall_seconds": self.wall_seconds, "stopped": self.stopped, "parameters": self.parameters,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_config_for_cache(model: ModelConfig, cache: TensorCache) -> ModelConfig:
    """``model`` with the sizes the cache dictates: ``n_products`` (vocabulary), ``product_dim``,
    ``price_dim`` and ``context_dim`` (the manifest's ``widths``), ``cooccurrence_neighbours``.

    A field left at its default is set from the cache; a field set to another value that disagrees
    with the cache is an error (defaults cannot be told from explicit values after a config's JSON
    round trip through the training process, so "supplied" means "not the default").
    """
    dictated = {"n_products": int(cache.manifest["sizes"]["vocab"]), "product_dim": cache.widths["product"],
                "price_dim": cache.widths["price"], "context_dim": cache.widths["context"],
                "cooccurrence_neighbours": int(cache["product_neighbours"].shape[1])}
    clashes = [f"{name} = {getattr(model, name)} but the cache has {value}" for name, value in dictated.items()
               if getattr(model, name) != ModelConfig.model_fields[name].default and getattr(model, name) != value]
    if clashes:
        raise ValueError(f"the model config disagrees with the tensor cache {cache.path}: {'; '.join(clashes)}. "
                         "Leave these fields unset (they are read from the cache) or rebuild the cache "
                         "with a CacheConfig of those widths")
    return model.model_copy(update=dictated)


def build_model(config: TrainingConfig, cache: TensorCache) -> WorldModel:
    """The world model sized to the cache (:func:`model_config_for_cache`), with its frozen product table and
    product neighbours (writable copies of the cache's arrays)."""
    model_cfg = model_config_for_cache(config.model, cache)
    return WorldModel(model_cfg, product_embeddings=np.array(cache.product_embeddings),
                      product_neighbours=(np.array(cache["product_neighbours"]),
                                          np.array(cache["product_neighbour_weights"])))


def _optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    no_decay = no_decay_parameter_names(model)
    decay_params, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if name in no_decay else decay_params).append(p)
    groups = [{"params": decay_params, "weight_decay": config.weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    # lr=1.0: the LambdaLR multiplier *is* the learning rate (schedule.learning_rate).
    return torch.optim.AdamW(groups, lr=1.0, betas=tuple(config.adam_betas), eps=config.adam_eps)


class Trainer:
    """Trains a :class:`WorldModel` on a tensor cache; see the module docstring for the recipe."""

    def __init__(
        self,
        config: TrainingConfig,
        cache: TensorCache,
        out_dir: Path,
        *,
        metrics=None,
        resume: str | Path | None = "auto",
        progress: bool = False,
        on_log: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.cache = cache
        self.out_dir = Path(out_dir)
        self.metrics = metrics or NullMetrics()
        self.progress = progress
        self.on_log = on_log
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.device = resolve_device(config.device)
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(config, cache).to(self.device)
        self.n_parameters = count_parameters(self.model)
        self.ema = EMA(self.model, config.ema_decay)
        self.eval_model = build_model(config, cache).to(self.device).eval()
        self.optimizer = _optimizer(self.model, config)
        self.loss_fn = WorldModelLoss(config)
        self.train_data = BatchAssembler(cache, "train", batch_size=config.batch_size, seed=config.seed,
                                         shuffle_lines=config.shuffle_lines)
        self.val_data = BatchAssembler(cache, "validation", batch_size=config.batch_size, seed=config.seed,
                                       shuffle=False, max_samples=config.val_samples,
                                       shuffle_lines=config.shuffle_lines)
        # One number for the schedule and the loop: the steps each rank takes per epoch.
        self.steps_per_epoch = steps_per_epoch(len(self.train_data), self.world_size, config.grad_accum_steps)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{cache.path}: the train split has {len(self.train_data)} batches of {config.batch_size} per epoch, "
                f"fewer than one optimizer step on each of {self.world_size} rank(s) with grad_accum_steps = "
                f"{config.grad_accum_steps}; lower batch_size or grad_accum_steps, or use fewer ranks")
        # This rank's batches of every epoch (positions in the epoch's order); ``batch_in_epoch`` counts
        # how many of them it has trained on in the current epoch.
        self.rank_batches = rank_batches(len(self.train_data), self.rank, self.world_size, config.grad_accum_steps)
        self.plan = phase_plan(config, self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate(step, config, self.plan))
        self.forward_model: torch.nn.Module = self.model
        if config.compile:
            self.forward_model = torch.compile(self.model)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: the warm-up phase trains the product head alone (focal loss), so the
            # auxiliary heads get no gradient there.
            self.forward_model = DistributedDataParallel(
                self.forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_val_loss = math.inf
        self.bad_validations = 0
        self.history: list[dict] = []
        self._stop_signal: int | None = None
        self.amp = config.amp and self.device.type == "cuda"
        # A background assembler overlaps GPU steps; on a CPU it only competes with torch's threads.
        self.prefetch = config.prefetch if self.device.type == "cuda" else 0
        if resume is not None:
            path = self.out_dir / LAST if resume == "auto" else Path(resume)
            if resume != "auto" or path.exists():
                self.load(path)

    # ---------------------------------------------------------------- state

    def _rank_state(self) -> dict:
        """What this rank alone knows and needs to resume exactly: its position in its share of the
        epoch and its RNG states."""
        return {"rank": self.rank, "batch": self.batch_in_epoch, "rng": rng_state()}

    def rank_states(self) -> list[dict]:
        """Every rank's :meth:`_rank_state`, in rank order, on rank 0 (``[]`` on the others).

        A collective under DDP: every rank must call it at the same step.
        """
        if self.world_size == 1:
            return [self._rank_state()]
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(self._rank_state(), gathered, dst=0)
        return gathered or []

    def state(self, ranks: list[dict] | None = None) -> dict:
        """The checkpoint of rank 0; ``ranks`` from :meth:`rank_states` (needed under DDP)."""
        if ranks is None:
            if self.world_size > 1:
                raise RuntimeError("under DDP a checkpoint needs every rank's state: pass Trainer.rank_states(), "
                                   "called by all ranks at the same step")
            ranks = [self._rank_state()]
        return {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": ranks[0]["rng"], "step": self.step, "epoch": self.epoch, "batch": ranks[0]["batch"],
            "world_size": self.world_size, "grad_accum_steps": self.config.grad_accum_steps, "ranks": ranks,
            "best_val_loss": self.best_val_loss, "bad_validations": self.bad_validations,
            "history": self.history, "config": self.config.model_dump(mode="json"),
            "cache_key": self.cache.manifest["key"],
        }

    def load(self, path: Path) -> None:
        """Resume from the checkpoint ``path`` (every rank reads it and restores its own position and RNG)."""
        state = load_checkpoint(path, map_location=self.device)
        if state.get("cache_key") != self.cache.manifest["key"]:
            log.warning("resuming from %s trained on cache %s, now %s", path, state.get("cache_key"),
                        self.cache.manifest["key"])
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.best_val_loss, self.bad_validations = state["best_val_loss"], state["bad_validations"]
        self.history = list(state["history"])
        # Checkpoints from before per-rank states: one process, or rank 0's view of a DDP run.
        accum = self.config.grad_accum_steps
        saved_world, saved_accum = state.get("world_size", 1), state.get("grad_accum_steps", accum)
        ranks = state.get("ranks") or [{"batch": state["batch"], "rng": state["rng"]}]
        if (saved_world, saved_accum) == (self.world_size, accum) and len(ranks) == saved_world:
            mine = ranks[self.rank]
            set_rng_state(mine["rng"])
            self.batch_in_epoch = mine["batch"]
        else:
            # Another split of the epoch: continue after the batches the saved run had used (the same
            # point of the epoch), rounded down to a whole step; the RNG stream is rank 0's.
            used = ranks[0]["batch"] * saved_world
            self.batch_in_epoch = min(used // (self.world_size * accum), self.steps_per_epoch) * accum
            set_rng_state(ranks[0]["rng"])
            log.warning("%s was written by %d rank(s) with grad_accum_steps = %d, this run has %d and %d: resuming "
                        "at batch %d of this rank's share of epoch %d, not exactly", path, saved_world, saved_accum,
                        self.world_size, accum, self.batch_in_epoch, self.epoch + 1)
        self._say(f"resumed from {path} at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})")

    def save(self, name: str = LAST, ranks: list[dict] | None = None) -> Path:
        """Rank 0 writes the checkpoint ``name`` (atomically); the other ranks only return its path.
        ``ranks``: :meth:`rank_states` of the same step (needed under DDP)."""
        path = self.out_dir / name
        if self.is_main:
            save_checkpoint(path, self.state(ranks))
        return path

    # ---------------------------------------------------------------- loop

    def _say(self, message: str) -> None:
        if self.is_main:
            log.info(message)
            if self.on_log:
                self.on_log(message)

    def _install_signal_handlers(self) -> dict:
        def handler(signum, _frame):
            self._stop_signal = signum
            log.warning("received signal %d: checkpointing at the end of this step", signum)

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. run from a worker thread): no handlers
                pass
        return old

    def total_steps(self) -> int:
        total = self.plan.total_steps
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def fit(self) -> TrainResult:
        cfg = self.config
        t0 = time.perf_counter()
        old_handlers = self._install_signal_handlers()
        stopped = "completed"
        samples_seen, window_samples, window_t = 0, 0, time.perf_counter()
        bad_steps = 0
        bar = tqdm(total=self.total_steps(), initial=self.step, unit="step", disable=not (self.progress and self.is_main),
                   desc="train")
        running: dict[str, list[float]] = {}
        try:
            while self.epoch < cfg.epochs and stopped == "completed":
                # A phase can change inside an epoch: the batches are then re-opened at the same
                # position with the new phase's masking (still seeded by epoch and batch number).
                phase = self.plan.phase(self.step)
                self.model.train()
                # Batches are (re)opened at a step boundary: nothing of an unfinished step may carry over.
                self.optimizer.zero_grad(set_to_none=True)
                accum = 0
                bad_micro = torch.zeros((), dtype=torch.int32, device=self.device)  # non-finite losses in this step
                # This rank's own batches only (the shares of all ranks are equally long, a whole number of steps).
                batches = self.train_data.iterate(self.epoch, mask_prob=mask_prob(phase, cfg),
                                                  batch_numbers=self.rank_batches[self.batch_in_epoch:],
                                                  prefetch=self.prefetch, device=self.device)
                for _batch_no, batch in batches:
                    with torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext():
                        outputs = self.forward_model(**batch.model_inputs(), predict_mask=batch.predict_mask)
                        total, parts = self.loss_fn(outputs, batch, phase)
                    bad_micro += ~torch.isfinite(total.detach())
                    (total / cfg.grad_accum_steps).backward()
                    accum += 1
                    self.batch_in_epoch += 1
                    samples_seen += len(batch)
                    window_samples += len(batch)
                    for k, v in parts.items():
                        running.setdefault(k, []).append(float(v))
                    if accum < cfg.grad_accum_steps:
                        continue
                    accum = 0
                    local_bad = int(bad_micro.item())
                    bad_micro.zero_()
                    # Agreed by all ranks: under DDP a NaN on one rank has already reached every rank's gradients.
                    if self._any_rank(local_bad > 0):
                        bad_steps += 1
                        self.optimizer.zero_grad(set_to_none=True)
                        log.warning("non-finite loss at step %d (%d in a row; %d of this rank's %d micro-batches): "
                                    "step skipped", self.step, bad_steps, local_bad, cfg.grad_accum_steps)
                        self.metrics.log_metrics({"train/skipped_steps": bad_steps}, step=self.step)
                        if bad_steps >= cfg.max_bad_steps:
                            raise TrainingAborted(
                                f"loss was NaN/Inf for {bad_steps} consecutive steps (last at step {self.step}, "
                                f"epoch {self.epoch + 1}); lower the learning rate or check the tensor cache")
                        continue
                    bad_steps = 0
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.ema.update(self.model)
                    self.step += 1
                    bar.update(1)
                    if self.is_main and self.step % cfg.log_every == 0:
                        now = time.perf_counter()
                        record = {f"train/{k}": float(np.mean(v)) for k, v in running.items()}
                        record.update({"train/lr": self.scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                                       "train/samples_per_s": window_samples * self.world_size / (now - window_t),
                                       "train/epoch": self.epoch + self.batch_in_epoch / len(self.rank_batches)})
                        running.clear()
                        window_samples, window_t = 0, now
                        self._record(record, bar)
                    validate = self.step % cfg.val_every == 0
                    checkpoint = self.step % cfg.checkpoint_every == 0
                    # Every rank's position and RNG go into a checkpoint: gathered by all ranks together.
                    ranks = self.rank_states() if validate or checkpoint else None
                    if self.is_main and validate:
                        if self._validate_and_maybe_stop(ranks):
                            stopped = "early_stopping"
                    if checkpoint:
                        self.save(LAST, ranks)
                    if self._stop_signal is not None:
                        stopped = "signal"
                    if cfg.max_steps and self.step >= cfg.max_steps:
                        stopped = "max_steps"
                    if self.world_size > 1:
                        stopped = self._agree_on_stop(stopped)
                    if stopped != "completed" or self.plan.phase(self.step) != phase:
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                if hasattr(batches, "close"):
                    batches.close()
            ranks = self.rank_states()  # all ranks leave the loop at the same step
            if self.is_main and stopped in ("completed", "max_steps") and (
                    not self.history or self.history[-1].get("step") != self.step or "val/loss" not in self.history[-1]):
                self._validate_and_maybe_stop(ranks)
        finally:
            bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        last = self.save(LAST, ranks)
        wall = time.perf_counter() - t0
        best = self.out_dir / BEST
        result = TrainResult(
            out_dir=self.out_dir, best_checkpoint=best if best.exists() else None, last_checkpoint=last,
            best_val_loss=self.best_val_loss, steps=self.step, epochs_completed=self.epoch,
            samples_per_s=samples_seen * self.world_size / wall if wall > 0 else 0.0, wall_seconds=wall,
            stopped=stopped, parameters=self.n_parameters, history=self.history,
        )
        self._say(f"training {stopped} after {self.step} steps in {wall:.1f}s; best validation loss "
                  f"{self.best_val_loss:.4f}")
        return result

    _STOP_CODES = ("completed", "max_steps", "early_stopping", "signal")

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` of this rank, or (under DDP) of any rank: a decision every rank takes alike."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        agreed = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return bool(agreed.item())

    def _agree_on_stop(self, stopped: str) -> str:
        """Under DDP every rank must stop at the same step: take the strongest reason of any rank."""
        import torch.distributed as dist

        flag = torch.tensor([self._STOP_CODES.index(stopped)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return self._STOP_CODES[int(flag.item())]

    def _record(self, record: dict, bar) -> None:
        record = {"step": self.step, **record}
        self.history.append(record)
        self.metrics.log_metrics({k: v for k, v in record.items() if k != "step"}, step=self.step)
        shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in record.items() if k in ("train/total", "val/loss", "train/lr")}
        bar.set_postfix(shown)
        if not self.progress:
            self._say(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> dict:
        """Main-phase loss and masked-product accuracy on the fixed validation subset (EMA weights).

        Runs under a forked RNG, so validating never changes the random stream of training (a run
        that validates at step N and one that does not stay bit-identical).
        """
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate(model)

    def _evaluate(self, model: torch.nn.Module | None) -> dict:
        if model is None:
            self.ema.copy_to(self.eval_model)
            model = self.eval_model
        model.eval()
        totals: dict[str, float] = {}
        n_batches, n_pred, hits1, hits10 = 0, 0, 0, 0
        for _, batch in self.val_data.iterate(0, mask_prob=self.config.mask_prob, prefetch=0, device=self.device):
            with torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext():
                outputs = model(**batch.model_inputs(), predict_mask=batch.predict_mask)
                _, parts = self.loss_fn(outputs, batch, "main")
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n_batches += 1
            logits = outputs["product_logits"].float()
            logits[:, :N_SPECIAL] = -torch.inf
            target = batch.targets[batch.predict_mask]
            top = logits.topk(min(10, logits.shape[1]), dim=1).indices
            hits1 += int((top[:, 0] == target).sum())
            hits10 += int((top == target[:, None]).any(dim=1).sum())
            n_pred += int(target.numel())
        out = {f"val/{k}": v / max(n_batches, 1) for k, v in totals.items()}
        out["val/loss"] = out.pop("val/total")
        out["val/accuracy_at_1"] = hits1 / max(n_pred, 1)
        out["val/recall_at_10"] = hits10 / max(n_pred, 1)
        return out

    def _validate_and_maybe_stop(self, ranks: list[dict]) -> bool:
        """Rank 0: validate the EMA weights, checkpoint the best (with ``ranks``, :meth:`rank_states`)."""
        metrics = self.evaluate()
        improved = metrics["val/loss"] < self.best_val_loss - self.config.min_delta
        if improved:
            self.best_val_loss = metrics["val/loss"]
            self.bad_validations = 0
            self.save(BEST, ranks)
        else:
            self.bad_validations += 1
        metrics["val/best_loss"] = self.best_val_loss
        self.history.append({"step": self.step, **metrics})
        self.metrics.log_metrics(metrics, step=self.step)
        self._say(f"step {self.step}: validation loss {metrics['val/loss']:.4f} (best {self.best_val_loss:.4f}), "
                  f"recall@10 {metrics['val/recall_at_10']:.3f}")
        return self.bad_validations >= self.config.patience
