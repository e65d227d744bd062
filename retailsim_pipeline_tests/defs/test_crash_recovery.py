"""kill -9 at every stage: afterwards nothing is STARTED/RUNNING or half-written, and the next
`retailsim run` completes with the outputs of a clean run.

Each test drives the real CLI (`python -m retailsim_pipeline run`) in a subprocess on a copy of the
tiny data, with the project's dagster.yaml and its state under the data folder, and kills it (or
its training child) with SIGKILL at a chosen moment.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from retailsim_pipeline.defs.recovery import _IN_FLIGHT
from retailsim_pipeline.prep.cache import TensorCache

REPO = Path(__file__).resolve().parents[2]
DATA = "group:ingest or group:prep"


def _env(paths) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (
        "DAGSTER_HOME", "RETAILSIM_DAGSTER_DIR", "RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR", "MLFLOW_TRACKING_URI")}
    env.update(RETAILSIM_DATA_DIR=str(paths.root), PYTHONUNBUFFERED="1")
    return env


def _hold(module: str, name: str, at_call: int = 1) -> str:
    """A script standing in for the CLI that holds the ``at_call``-th call of ``module.name`` (printing
    ``HELD`` first), so that a kill lands at that point whatever the machine's speed (the tiny cache,
    say, builds in 0.2 s)."""
    return (
        "import sys, time, importlib\n"
        f"mod = importlib.import_module({module!r})\n"
        f"real = getattr(mod, {name!r})\n"
        "calls = []\n"
        "def held(*a, **k):\n"
        "    calls.append(1)\n"
        f"    if len(calls) == {at_call}:\n"
        "        print('HELD', flush=True); time.sleep(120)\n"
        "    return real(*a, **k)\n"
        f"setattr(mod, {name!r}, held)\n"
        "from retailsim_pipeline.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )


#: In the middle of a partition run (the 4th week's outputs, once the batch of weeks was validated), and
#: with the cache's temporary folder complete but not yet renamed.
HOLD = {"ingest": _hold("retailsim_pipeline.prep.ingest_batch", "write_outputs", at_call=4),
        "cache": _hold("retailsim_pipeline.prep.cache_build", "_publish")}


def _start(paths, select: str, *args: str, code: str | None = None) -> subprocess.Popen:
    """The CLI in a subprocess (``code``: a script standing in for ``python -m retailsim_pipeline``);
    its output (the training child's too) accumulates in ``proc.lines``."""
    entry = ["-c", code] if code else ["-m", "retailsim_pipeline"]
    proc = subprocess.Popen([sys.executable, *entry, "run", "--quiet", "--select", select,
                             "--preset", "tiny", *args], cwd=REPO, env=_env(paths), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.lines = []
    proc.reader = threading.Thread(target=lambda: proc.lines.extend(proc.stdout), daemon=True)
    proc.reader.start()
    return proc


def _output(proc: subprocess.Popen) -> str:
    proc.reader.join(timeout=30)
    return "".join(proc.lines)


def _finish(paths, select: str = "*", timeout: float = 600) -> str:
    proc = _start(paths, select)
    proc.wait(timeout=timeout)
    out = _output(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def _wait_for(condition, what: str, timeout: float = 300, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {_output(proc)[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _instance(paths, monkeypatch) -> dg.DagsterInstance:
    monkeypatch.setenv("RETAILSIM_DAGSTER_DIR", str(paths.root / "dagster"))
    monkeypatch.setenv("RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR", str(paths.root / "dagster" / "compute_logs"))
    return dg.DagsterInstance.from_config(str(REPO))


def _in_flight(paths, monkeypatch) -> list[str]:
    with _instance(paths, monkeypatch) as instance:
        return [r.run_id for r in instance.get_runs(filters=dg.RunsFilter(statuses=_IN_FLIGHT))]


def _temporaries(paths) -> list[Path]:
    return [p for folder in ("transactions", "quarantine", "samples", "cache") if (paths.root / folder).is_dir()
            for p in (paths.root / folder).iterdir() if p.name.startswith(".") and ("tmp" in p.name or ".old-" in
                                                                                    p.name)]


def _training_children(paths) -> list[int]:
    """Training processes launched for this data folder (found by their environment)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"retailsim_pipeline.training" in cmdline and f"RETAILSIM_DATA_DIR={paths.root}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def _mlflow_runs(paths) -> list[dict]:
    from retailsim_pipeline import tracking

    client = tracking.mlflow_client(tracking.default_tracking_uri(paths))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        return []
    # Training runs only: an evaluation adds one finished child run per scorer under its training run.
    return [{"id": r.info.run_id, "status": r.info.status, "tags": r.data.tags}
            for r in client.search_runs([experiment.experiment_id], max_results=100)
            if "mlflow.parentRunId" not in r.data.tags]


@pytest.mark.parametrize("moment", ["ingest", "cache"])
def test_kill_during_data_stages_then_the_next_run_completes_like_a_clean_one(tiny_copy, tiny_prepped, moment,
                                                                             monkeypatch):
    proc = _start(tiny_copy, DATA, code=HOLD[moment])
    _wait_for(lambda: any(line.startswith("HELD") for line in proc.lines), f"the {moment} stage", proc=proc)
    if moment == "ingest":
        assert len(list(tiny_copy.transactions.glob("*.parquet"))) == 3
    _kill(proc)
    if moment == "cache":
        assert _temporaries(tiny_copy), "the kill was meant to leave a half-built cache behind"
    assert _in_flight(tiny_copy, monkeypatch), "the kill was meant to leave a run STARTED"

    out = _finish(tiny_copy, DATA, timeout=300)
    assert "recovered 1 run(s) whose process was gone" in out, out
    assert _in_flight(tiny_copy, monkeypatch) == [] and _temporaries(tiny_copy) == []
    # The outputs of a clean run: every week, the same samples and the same cache key.
    assert len(list(tiny_copy.transactions.glob("*.parquet"))) == 12
    clean = json.loads((tiny_prepped.samples / "_samples.json").read_text())
    again = json.loads((tiny_copy.samples / "_samples.json").read_text())
    assert again["counts"] == clean["counts"] and again["data_version"] == clean["data_version"]
    assert TensorCache.latest(tiny_copy.cache).manifest["key"] == TensorCache.latest(tiny_prepped.cache).manifest["key"]


@pytest.mark.parametrize("victim", ["parent", "child"])
def test_kill_during_training_frees_the_pool_and_the_next_run_trains(tiny_copy, victim, monkeypatch):
    _finish(tiny_copy, DATA, timeout=300)
    proc = _start(tiny_copy, "*")
    # Let it train a little: its MLflow run is open and its signal handlers are in place.
    _wait_for(lambda: any("step 10:" in line for line in proc.lines), "ten training steps", proc=proc)
    child = _wait_for(lambda: _training_children(tiny_copy), "the training process", proc=proc)[0]
    assert [r["status"] for r in _mlflow_runs(tiny_copy)] == ["RUNNING"]
    if victim == "parent":
        _kill(proc)
        # The orphan stops by itself (it watches its launcher) and ends its MLflow run as KILLED.
        _wait_for(lambda: not _training_children(tiny_copy), "the orphaned training to stop", timeout=60)
        assert [r["status"] for r in _mlflow_runs(tiny_copy)] == ["KILLED"], "".join(proc.lines[-40:])
        assert _in_flight(tiny_copy, monkeypatch), "the killed run should still look STARTED"
    else:
        os.kill(child, signal.SIGKILL)
        proc.wait(timeout=120)
        assert proc.returncode == 1, _output(proc)[-3000:]  # the op failed: its process died
        assert [r["status"] for r in _mlflow_runs(tiny_copy)] == ["RUNNING"]  # nobody could end it

    started = time.time()
    out = _finish(tiny_copy, "*", timeout=600)
    assert time.time() - started < 400, "the next run must not wait on the gpu pool"
    assert _in_flight(tiny_copy, monkeypatch) == [] and _temporaries(tiny_copy) == []
    if victim == "child":
        assert "ended 1 orphaned MLflow run(s) as KILLED" in out, out
    else:
        assert "recovered 1 run(s) whose process was gone" in out, out
    runs = sorted(_mlflow_runs(tiny_copy), key=lambda r: r["status"])
    assert [r["status"] for r in runs] == ["FINISHED", "KILLED"], runs
    # The registered challenger was trained by the run that finished, to the end.
    result = next((tiny_copy.root / "training").glob("*/result.json"))
    summary = json.loads(result.read_text())
    assert summary["stopped"] in ("completed", "early_stopping") and summary["steps"] > 0
    assert summary["mlflow_run_id"] == next(r["id"] for r in runs if r["status"] == "FINISHED")
    assert "materialized: trained_world_model, evaluation_report" in out, out
