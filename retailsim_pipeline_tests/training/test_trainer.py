"""The training loop on the tiny cache: schedule, checkpoints, exact resume, signals, the NaN guard."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import retailsim_pipeline.training.trainer as trainer_mod
from retailsim_pipeline.config import CacheConfig, LaunchConfig, TrainingConfig, training_preset
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.cache_build import build_tensor_cache
from retailsim_pipeline.training.batches import BatchAssembler
from retailsim_pipeline.training.checkpoint import LAST, load_checkpoint, save_checkpoint
from retailsim_pipeline.training.run import apply_overrides
from retailsim_pipeline.model.losses import PHASES
from retailsim_pipeline.training.schedule import (
    learning_rate,
    mask_prob,
    phase_lr,
    phase_plan,
    rank_batches,
    steps_per_epoch,
)
from retailsim_pipeline.training.trainer import Trainer, TrainingAborted, build_model


@pytest.fixture(scope="module")
def cache(tiny_prepped) -> TensorCache:
    return TensorCache.latest(tiny_prepped.cache)


def _config(**overrides) -> TrainingConfig:
    base = training_preset("tiny").model_copy(update={"val_every": 1000, "log_every": 1000,
                                                        "checkpoint_every": 1000})
    return apply_overrides(base, overrides)


def test_the_model_is_sized_from_the_cache(tiny_prepped, tmp_path):
    """n_products, product_dim, price_dim and context_dim come from the cache; a contradiction is refused."""
    narrow = TensorCache.open(build_tensor_cache(
        tiny_prepped.samples, tmp_path / "cache",
        CacheConfig(product_dim=128, hierarchy_dim_per_level=8, price_dim=32, store_dim=80,
                    customer_history_dim=96)).path)
    model = build_model(_config(), narrow)
    assert (model.config.n_products, model.config.product_dim, model.config.price_dim, model.config.context_dim) \
        == (narrow.product_embeddings.shape[0], 128, 32, 96 + 32 + 64 + 80 + 48)
    batch = BatchAssembler(narrow, "train", batch_size=8, shuffle=False).assemble(
        np.arange(8), mask_prob=0.15, mask_seed=(0,))
    assert batch.price.shape[2] == 32 and batch.context.shape[1] == 320
    assert torch.isfinite(model(**batch.model_inputs(), predict_mask=batch.predict_mask)["product_logits"]).all()
    with pytest.raises(ValueError, match="price_dim = 48 but the cache has 32.*Leave these fields unset"):
        build_model(_config(**{"model.price_dim": 48}), narrow)
    same = _config(**{"model.product_dim": 128})  # explicit and agreeing: fine
    assert build_model(same, narrow).config.product_dim == 128


def test_the_schedule_follows_the_seed():
    cfg = TrainingConfig(epochs=20)  # seed 001: warm-up epochs 1–3, main 4–15, fine-tune 16–20
    plan = phase_plan(cfg, steps_per_epoch=10)
    assert (plan.warmup_end, plan.finetune_start, plan.total_steps) == (30, 150, 200)
    assert [(p, phase_lr(p, cfg), mask_prob(p, cfg)) for p in PHASES] == [
        ("warmup", 1e-5, 0.15), ("main", 5e-5, 0.15), ("finetune", 1e-5, 0.20)]
    plan = phase_plan(TrainingConfig(epochs=40), steps_per_epoch=10)  # boundaries scale with the run
    assert (plan.total_steps, plan.warmup_end, plan.finetune_start) == (400, 60, 300)
    assert [plan.phase(s) for s in (0, 59, 60, 299, 300, 399)] == ["warmup", "warmup", "main", "main",
                                                                    "finetune", "finetune"]
    cfg = TrainingConfig(epochs=20, lr_ramp_steps=100)
    plan = phase_plan(cfg, steps_per_epoch=1000)
    assert learning_rate(0, cfg, plan) == pytest.approx(1e-5 / 100)  # warm-up LR, ramped
    assert learning_rate(5000, cfg, plan) == pytest.approx(5e-5)
    assert learning_rate(17000, cfg, plan) == pytest.approx(1e-5)
    demo = phase_plan(training_preset("demo"), steps_per_epoch=100)  # a 2-epoch run still has all three
    assert (demo.warmup_end, demo.finetune_start, demo.total_steps) == (30, 150, 200)


def test_every_rank_gets_an_equal_whole_number_of_steps():
    """45 batches, 2 ranks, 2 micro-batches a step: 11 steps per epoch on each rank, from disjoint
    shares; step k uses batches 4k..4k+3 of the epoch's order; one process keeps every batch."""
    assert steps_per_epoch(45, world_size=2, grad_accum_steps=2) == 11
    shares = [rank_batches(45, rank, world_size=2, grad_accum_steps=2) for rank in (0, 1)]
    assert [len(s) for s in shares] == [22, 22]
    assert not set(shares[0]) & set(shares[1]) and sorted([*shares[0], *shares[1]]) == list(range(44))
    assert sorted(share[2 * 3 + i] for share in shares for i in (0, 1)) == list(range(12, 16))  # step 3
    assert (steps_per_epoch(45), rank_batches(45)) == (45, range(45))  # one process: unchanged
    assert rank_batches(45, grad_accum_steps=2) == range(44)  # a partial step is not carried over
    with pytest.raises(ValueError, match="rank 2 is outside"):
        rank_batches(45, rank=2, world_size=2)


def test_overrides_are_validated():
    cfg = apply_overrides(training_preset("tiny"), ["epochs=3", "model.d_model=48", "loss_weights.focal=0.5"])
    assert (cfg.epochs, cfg.model.d_model, cfg.loss_weights.focal) == (3, 48, 0.5)
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(cfg, {"model.width": 3})


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 7, "history": [{"step": 1, "x": 0.5}]}
    path = save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 7
    assert not list(tmp_path.glob(".*tmp*"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        load_checkpoint(tmp_path / "bad.pt")


def test_training_improves_validation_and_writes_checkpoints(cache, tmp_path):
    trainer = Trainer(_config(epochs=3, val_every=15), cache, tmp_path, resume=None)
    before = trainer.evaluate()["val/loss"]
    result = trainer.fit()
    assert result.stopped == "completed" and result.epochs_completed == 3
    assert result.best_val_loss < before - 0.3, (before, result.best_val_loss)
    assert result.best_checkpoint.exists() and result.last_checkpoint.exists()
    val = [h for h in result.history if "val/loss" in h]
    assert len(val) >= 2 and all("val/recall_at_10" in h for h in val)
    assert load_checkpoint(result.last_checkpoint)["step"] == result.steps


def test_resume_is_exact(cache, tmp_path):
    """2N steps straight == N steps, a new process-like Trainer resuming from last.pt, N more steps."""
    n = 12
    straight = Trainer(_config(max_steps=2 * n), cache, tmp_path / "a", resume=None)
    straight.fit()
    first = Trainer(_config(max_steps=n), cache, tmp_path / "b", resume=None)
    first.fit()
    assert load_checkpoint(tmp_path / "b" / LAST)["step"] == n
    second = Trainer(_config(max_steps=2 * n), cache, tmp_path / "b", resume="auto")
    assert second.step == n
    second.fit()
    a, b = straight.model.state_dict(), second.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    ema_a, ema_b = straight.ema.state_dict(), second.ema.state_dict()
    for key in ema_a:
        torch.testing.assert_close(ema_a[key], ema_b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_under_another_world_size_continues_from_the_same_point(cache, tmp_path, caplog):
    """A checkpoint of two ranks 5 batches each into epoch 1, resumed by one process: it goes on after
    the 10 batches used, warning that the resume is not exact; an old checkpoint (no per-rank states)
    resumes as one process's."""
    Trainer(_config(max_steps=5), cache, tmp_path, resume=None).fit()
    state = load_checkpoint(tmp_path / LAST)
    (mine,) = state["ranks"]
    assert (mine["rank"], mine["batch"], state["batch"], state["world_size"]) == (0, 5, 5, 1)
    assert torch.equal(mine["rng"]["torch"], state["rng"]["torch"])
    save_checkpoint(tmp_path / "two.pt", {**state, "world_size": 2, "ranks": [state["ranks"][0], {
        **state["ranks"][0], "rank": 1}]})
    with caplog.at_level("WARNING"):
        assert Trainer(_config(), cache, tmp_path, resume=tmp_path / "two.pt").batch_in_epoch == 10
    assert "written by 2 rank(s)" in caplog.text and "not exactly" in caplog.text
    old = {k: v for k, v in state.items() if k not in ("ranks", "world_size", "grad_accum_steps", "format")}
    save_checkpoint(tmp_path / "old.pt", old)
    assert Trainer(_config(), cache, tmp_path, resume=tmp_path / "old.pt").batch_in_epoch == 5


def test_non_finite_loss_is_skipped_then_aborts(cache, tmp_path, monkeypatch):
    class NanLoss:
        def __init__(self, config):
            pass

        def __call__(self, outputs, batch, phase):
            total = outputs["product_logits"].sum() * float("nan")
            return total, {"total": total.detach()}

    monkeypatch.setattr(trainer_mod, "WorldModelLoss", NanLoss)
    trainer = Trainer(_config(max_bad_steps=3), cache, tmp_path, resume=None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingAborted, match="NaN/Inf for 3 consecutive steps"):
        trainer.fit()
    assert trainer.step == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_non_finite_micro_batch_skips_its_step(cache, tmp_path, monkeypatch):
    """grad_accum_steps=2: a NaN in the first micro-batch of the second step (the last one finite)
    skips that step; the run goes on to max_steps with finite weights."""
    calls = []

    class NanOnThirdCall(trainer_mod.WorldModelLoss):
        def __call__(self, outputs, batch, phase):
            total, parts = super().__call__(outputs, batch, phase)
            if not torch.is_grad_enabled():  # validation
                return total, parts
            calls.append(len(batch))
            return (total * float("nan"), parts) if len(calls) == 3 else (total, parts)

    class Recorder:
        def __init__(self):
            self.records = []

        def log_metrics(self, metrics, step):
            self.records.append((step, metrics))

    monkeypatch.setattr(trainer_mod, "WorldModelLoss", NanOnThirdCall)
    metrics = Recorder()
    trainer = Trainer(_config(max_steps=3, grad_accum_steps=2), cache, tmp_path, metrics=metrics, resume=None)
    result = trainer.fit()
    assert (result.steps, len(calls)) == (3, 8)  # 4 steps' micro-batches, one step skipped
    assert (1, {"train/skipped_steps": 1}) in metrics.records
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_sigterm_checkpoints_and_exits_cleanly(tiny_prepped, tmp_path):
    cache_dir = TensorCache.latest(tiny_prepped.cache).path
    out = tmp_path / "run"
    env = {**os.environ, "RETAILSIM_DATA_DIR": str(tiny_prepped.root), "PYTHONUNBUFFERED": "1"}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "retailsim_pipeline.training", "--preset", "tiny", "--cache", str(cache_dir),
         "--out", str(out), "--no-tracking", "--quiet", "--resume", "none", "--set", "epochs=50",
         "--set", "log_every=1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "step 3:" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    state = load_checkpoint(out / LAST)
    assert 3 <= state["step"] < 1000
    result = json.loads((out / "result.json").read_text())
    assert result["stopped"] == "signal" and result["steps"] == state["step"]


def test_ddp_under_torchrun_on_cpu(tiny_prepped, tmp_path):
    """Two ranks (gloo on CPU) train in lockstep; rank 0 alone writes the checkpoint and the result."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "ddp"
    env = {**os.environ, "RETAILSIM_DATA_DIR": str(tiny_prepped.root), "OMP_NUM_THREADS": "1"}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "retailsim_pipeline.training", "--preset", "tiny",
         "--cache", str(TensorCache.latest(tiny_prepped.cache).path), "--out", str(out), "--no-tracking",
         "--quiet", "--resume", "none", "--set", "max_steps=6", "--set", "device=\"cpu\""],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert load_checkpoint(out / LAST)["step"] == 6
    assert json.loads((out / "result.json").read_text())["stopped"] == "max_steps"


# ---------------------------------------------------------------- exact DDP: two CPU ranks on gloo

#: dropout: the ranks' RNG streams then matter (and differ: their batches differ in shape), so an exact
#: resume needs each rank's own; val_every / checkpoint_every: the gathers inside the loop run too.
DDP = {"model.dropout": 0.1, "val_every": 5, "checkpoint_every": 4, "log_every": 1000, "patience": 1000}


def _torchrun(cache: TensorCache, out, overrides: dict, *, resume=None, nan_at=None, sigterm_at=None,
              nodes: list[list[str]] | None = None) -> list[dict]:
    """Train the tiny preset on two CPU ranks (:mod:`.ddp_worker`); each rank's weights and record.

    ``nodes``: one list of torchrun options per "node", each started as its own torchrun process at
    once (default: one node of two ranks, ``--standalone``)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    params = {"cache": str(cache.path), "out": str(out), "overrides": {**DDP, **overrides}, "resume": resume,
              "nan_at": nan_at, "sigterm_at": sigterm_at}
    procs = [subprocess.Popen([torchrun, *options, "-m", "retailsim_pipeline_tests.training.ddp_worker",
                               json.dumps(params)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for options in nodes or [["--standalone", "--nproc-per-node=2"]]]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240))  # a hung collective times out in the ranks after 60 s
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its ranks
            outputs.append(proc.communicate())
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def _assert_same_weights(a: dict, b: dict) -> None:
    """Model and EMA weights bit-identical."""
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"


@pytest.fixture(scope="module")
def ddp_straight(cache, tmp_path_factory) -> list[dict]:
    """The whole tiny run straight on two ranks: 2 epochs of 22 steps, crossing warm-up → main (step 7),
    the epoch (22) and main → fine-tune (33)."""
    return _torchrun(cache, tmp_path_factory.mktemp("ddp_straight"), {})


def test_ddp_ranks_hold_identical_weights_and_assemble_only_their_share(ddp_straight):
    """After 44 steps both ranks hold bit-identical weights; each assembled only its own batches."""
    rank0, rank1 = ddp_straight
    assert rank0["steps"] == rank1["steps"] == 44 and rank0["stopped"] == rank1["stopped"] == "completed"
    _assert_same_weights(rank0, rank1)
    for rank, record in enumerate(ddp_straight):  # 44 batches an epoch: 22 per rank
        share = list(rank_batches(44, rank, world_size=2))
        assert record["assembled"] == [[0, b] for b in share] + [[1, b] for b in share]


def test_ddp_resume_is_exact(cache, ddp_straight, tmp_path):
    """17 steps, a stop (max_steps), a resume from last.pt and the 27 steps to the end == 44 straight,
    bit for bit, and no batch is assembled twice."""
    first = _torchrun(cache, tmp_path, {"max_steps": 17})
    state = load_checkpoint(tmp_path / LAST)
    assert (state["step"], state["world_size"]) == (17, 2)
    assert [(r["rank"], r["batch"]) for r in state["ranks"]] == [(0, 17), (1, 17)]
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    second = _torchrun(cache, tmp_path, {}, resume="auto")
    for rank in (0, 1):
        assert (second[rank]["steps"], second[rank]["stopped"]) == (44, "completed")
        _assert_same_weights(second[rank], ddp_straight[rank])
        assert first[rank]["assembled"] + second[rank]["assembled"] == ddp_straight[rank]["assembled"]


def test_ddp_resume_is_exact_with_grad_accumulation_after_sigterm(cache, tmp_path):
    """grad_accum_steps=2 (11 steps an epoch): 18 steps straight == a SIGTERM to rank 1 in step 9 (both
    ranks stop after it), a resume and 9 more steps; the run crosses the epoch (11) and fine-tune (16)."""
    accum = {"grad_accum_steps": 2, "max_steps": 18}
    straight = _torchrun(cache, tmp_path / "straight", accum)
    stopped = _torchrun(cache, tmp_path / "resumed", accum, sigterm_at=[1, 17])  # step 9's first micro-batch
    assert [r["stopped"] for r in stopped] == ["signal", "signal"] and stopped[0]["steps"] == stopped[1]["steps"] == 9
    assert load_checkpoint(tmp_path / "resumed" / LAST)["step"] == 9
    resumed = _torchrun(cache, tmp_path / "resumed", accum, resume="auto")
    for rank in (0, 1):
        assert resumed[rank]["steps"] == 18
        _assert_same_weights(resumed[rank], straight[rank])
        assert stopped[rank]["assembled"] + resumed[rank]["assembled"] == straight[rank]["assembled"]
    _assert_same_weights(straight[0], straight[1])


def test_ddp_nan_on_one_rank_skips_the_step_on_both(cache, tmp_path):
    """A NaN loss in rank 1's first micro-batch of step 2 (grad_accum_steps=2, its second micro-batch
    finite) skips that step on both ranks; the run goes on to max_steps with identical, finite weights."""
    rank0, rank1 = _torchrun(cache, tmp_path, {"grad_accum_steps": 2, "max_steps": 6}, nan_at=[1, 3])
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == [[1, 1]]  # at step 1, the first in a row
    assert rank0["steps"] == rank1["steps"] == 6 and len(rank0["assembled"]) == len(rank1["assembled"]) == 14
    _assert_same_weights(rank0, rank1)
    assert all(torch.isfinite(v).all() for v in rank0["model"].values())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_node_8_steps(cache, tmp_path_factory) -> dict:
    """Rank 0 of 8 steps on one node of two ranks (``--standalone``)."""
    return _torchrun(cache, tmp_path_factory.mktemp("one_node"), {"max_steps": 8})[0]


@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_two_nodes_meet_at_a_rendezvous_and_train_in_lockstep(cache, one_node_8_steps, tmp_path, backend):
    """Two "nodes" of one rank each on 127.0.0.1 (two torchrun processes started with the options the op
    builds, ``--nnodes=2 --node-rank=0|1 --rdzv-backend=… --rdzv-endpoint=127.0.0.1:PORT``) train 8 steps
    to bit-identical weights, the same as one node of two ranks. Under static the node rank decides
    which node holds rank 0; under c10d torch decides (it ignores --node-rank)."""
    port = _free_port()
    launches = [LaunchConfig(nnodes=2, node_rank=node, rdzv_backend=backend, rdzv_endpoint=f"127.0.0.1:{port}",
                             rdzv_id="two-nodes" if backend == "c10d" else "") for node in (0, 1)]
    rank0, rank1 = _torchrun(cache, tmp_path, {"max_steps": 8},
                             nodes=[launch.torchrun_args(nproc_per_node=1) for launch in launches])
    assert rank0["steps"] == rank1["steps"] == 8
    assert {rank0["node"], rank1["node"]} == {0, 1}
    if backend == "static":
        assert (rank0["node"], rank1["node"]) == (0, 1)
    _assert_same_weights(rank0, rank1)
    _assert_same_weights(rank0, one_node_8_steps)
