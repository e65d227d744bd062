"""Entry point of a training process: ``python -m retailsim_pipeline.training`` (also ``retailsim train``).

Runs standalone from a tensor cache and a preset/config file/overrides, or launched by the Dagster op
``train_world_model`` through Dagster Pipes, which passes the same parameters as ``extras`` and
receives the result as a custom message: the MLflow run id and model URI, the best checkpoint, and
the headline metrics. Under ``torchrun`` every rank trains; rank 0 alone talks to Dagster and MLflow.

Examples::

    python -m retailsim_pipeline.training --preset tiny --set epochs=1 --no-tracking
    python -m retailsim_pipeline.training --preset demo --cache data/cache/<key> --resume auto
"""

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from retailsim_pipeline.config import DataPaths, TrainingConfig, data_root, training_preset
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.training.trainer import Trainer

log = logging.getLogger("retailsim.training")


def apply_overrides(config: TrainingConfig, overrides: dict | list[str] | None) -> TrainingConfig:
    """Apply ``{"model.d_model": 64, "epochs": 2}`` or ``["model.d_model=64", "epochs=2"]`` (JSON values)."""
    if not overrides:
        return config
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not KEY=VALUE")
            key, raw = item.split("=", 1)
            try:
                pairs[key] = json.loads(raw)
            except json.JSONDecodeError:
                pairs[key] = raw
        overrides = pairs
    data = config.model_dump()
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"unknown config key {key!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"unknown config key {key!r}")
        node[leaf] = value
    return TrainingConfig.model_validate(data)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_training(params: dict, *, progress: bool = False, on_log=None) -> dict:
    """Train and export; ``params`` = {config, cache_path, out_dir, resume, tracking, tracking_uri, tags}."""
    config = TrainingConfig.model_validate(params["config"])
    cache = TensorCache.open(Path(params["cache_path"]))
    out_dir = Path(params["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0
    metrics = None
    if params.get("tracking", True) and is_main:
        from retailsim_pipeline import tracking

        tags = {"retailsim.cache_key": cache.manifest["key"], "retailsim.preset": config.preset,
                "git_commit": git_commit(), tracking.PID_TAG: os.getpid(), tracking.HOST_TAG: socket.gethostname(),
                **(params.get("tags") or {})}
        metrics = tracking.MlflowLogger(tracking_uri=params.get("tracking_uri"), run_name=params.get("run_name"),
                                        tags=tags)
        metrics.log_params({**config.model_dump(mode="json"), "cache_path": str(cache.path)})
    status = "FAILED"
    try:
        trainer = Trainer(config, cache, out_dir, metrics=metrics, resume=params.get("resume", "auto"),
                          progress=progress, on_log=on_log)
        result = trainer.fit()
        summary = {**result.to_json(), "cache_key": cache.manifest["key"], "preset": config.preset}
        if metrics is not None:
            summary.update(_export(metrics, trainer, result, out_dir))
        status = "KILLED" if result.stopped == "signal" else "FINISHED"
        if is_main:
            (out_dir / "result.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        if metrics is not None:
            metrics.close(status)


def _export(metrics, trainer: Trainer, result, out_dir: Path) -> dict:
    """Log the curves, the config and the best EMA weights as a pyfunc model; returns run/model ids."""
    from retailsim_pipeline import tracking
    from retailsim_pipeline.training.checkpoint import load_checkpoint
    from retailsim_pipeline.training.curves import write_training_curves

    checkpoint = load_checkpoint(result.best_checkpoint or result.last_checkpoint)
    curve = write_training_curves(result.history, out_dir / "training_curves.png")
    if curve is not None:
        metrics.log_artifact(curve)
    metrics.log_dict(trainer.config.model_dump(mode="json"), "training_config.json")
    metrics.log_metrics({"best_val_loss": result.best_val_loss, "samples_per_s": result.samples_per_s,
                         "wall_seconds": result.wall_seconds, "parameters": result.parameters}, step=result.steps)
    from retailsim_pipeline.prep.requests import ServingFeatures

    # What the served model computes its inputs from: the cache's tables and the basket log of its samples.
    features = ServingFeatures.from_cache(trainer.cache)
    model_config = trainer.model.config.model_dump(mode="json")
    model_uri = tracking.log_world_model(metrics, model_config, checkpoint["ema"], features)
    return {"mlflow_run_id": metrics.run_id, "mlflow_run_url": metrics.run_url(), "model_uri": model_uri}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retailsim_pipeline.training", description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None, help="tensor cache folder (default: the latest under the data root)")
    p.add_argument("--preset", default="demo", choices=["tiny", "demo", "seed"])
    p.add_argument("--config", default=None, help="a TrainingConfig JSON file (replaces the preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set epochs=2 --set model.d_model=64")
    p.add_argument("--out", default=None, help="checkpoint folder (default: DATA/training/<cache key>-<preset>)")
    p.add_argument("--resume", default="auto", help="a checkpoint path, 'auto' (out/last.pt if any) or 'none'")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite under DATA/mlflow)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--params", default=None, metavar="FILE",
                   help="the parameters of a run the Dagster op launched on several nodes (OUT/params.json; it "
                        "logs this command for each other node): replaces every option above but --quiet")
    return p


#: The options ``--params`` replaces (destination → flag); one differing from the parser's default was given.
_REPLACED_BY_PARAMS = {"cache": "--cache", "preset": "--preset", "config": "--config", "overrides": "--set",
                       "out": "--out", "resume": "--resume", "no_tracking": "--no-tracking",
                       "tracking_uri": "--tracking-uri"}


def params_from_args(args: argparse.Namespace) -> dict:
    if args.params:
        parser = build_parser()
        given = [flag for name, flag in _REPLACED_BY_PARAMS.items() if getattr(args, name) != parser.get_default(name)]
        if given:
            raise SystemExit(f"--params {args.params} holds the whole run; drop {', '.join(given)}")
        return json.loads(Path(args.params).read_text())
    paths = DataPaths(data_root())
    config = (TrainingConfig.model_validate_json(Path(args.config).read_text()) if args.config
              else training_preset(args.preset))
    config = apply_overrides(config, args.overrides)
    cache = Path(args.cache) if args.cache else TensorCache.latest(paths.cache).path
    out = Path(args.out) if args.out else paths.root / "training" / f"{cache.name}-{config.preset}"
    return {"config": config.model_dump(mode="json"), "cache_path": str(cache), "out_dir": str(out),
            "resume": None if args.resume == "none" else args.resume, "tracking": not args.no_tracking,
            "tracking_uri": args.tracking_uri}


#: Set by the Dagster op to its own pid: the training process stops when that process is gone.
PARENT_PID_ENV = "RETAILSIM_PARENT_PID"


def die_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Stop this process cleanly (SIGTERM to itself: checkpoint, MLflow run ended KILLED) once
    ``parent_pid`` is gone, so a killed ``retailsim run`` or run worker never leaves an orphaned
    training behind.

    A thread polls every ``interval`` seconds and sends the signal exactly once. When the launcher is
    the direct parent, "gone" means this process was reparented (its zombie, not yet reaped, would
    still answer ``kill(pid, 0)``); otherwise (torchrun ranks, whose parent is torchrun) it means
    ``kill(pid, 0)`` fails. Not ``PR_SET_PDEATHSIG``: the kernel sends that signal each time the
    child is handed to another thread of a dying multi-threaded parent, and a second SIGTERM arriving
    after the trainer has stopped would kill the process while it exports the model and ends its
    MLflow run (seen as a run left RUNNING).
    """
    direct = os.getppid() == parent_pid

    def gone() -> bool:
        if direct:
            return os.getppid() != parent_pid
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, owned by someone else
        return False

    def watch() -> None:
        while not gone():
            time.sleep(interval)
        log.warning("the launching process %d is gone: stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if os.environ.get(PARENT_PID_ENV):
        die_with_parent(int(os.environ[PARENT_PID_ENV]))
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from retailsim_pipeline.training import pipes

    if pipes.launched_by_dagster():
        return pipes.run_under_dagster(run_training)
    args = build_parser().parse_args(argv)
    summary = run_training(params_from_args(args), progress=not args.quiet)
    json.dump({k: v for k, v in summary.items()}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
