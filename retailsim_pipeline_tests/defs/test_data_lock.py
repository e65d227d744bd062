"""One writer per data folder: `retailsim run` processes started together never write at once."""

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from retailsim_pipeline.prep.files import DataFolderBusy, DataFolderLock

REPO = Path(__file__).resolve().parents[2]


def _run(paths, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "RETAILSIM_DAGSTER_DIR",
                                                            "RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR")}
    env["RETAILSIM_DATA_DIR"] = str(paths.root)
    return subprocess.Popen([sys.executable, "-m", "retailsim_pipeline", "run", "--quiet", "--select",
                             "key:raw_transactions", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path):
    lock = DataFolderLock(tmp_path)
    with lock:
        with DataFolderLock(tmp_path):  # the same process again: re-entrant
            pass
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from retailsim_pipeline.prep.files import DataFolderLock as L\n"
             f"try:\n    L({str(tmp_path)!r}).acquire(wait=False)\nexcept Exception as e:\n    print(e); sys.exit(3)"],
            capture_output=True, text=True, cwd=REPO)
        assert probe.returncode == 3, probe.stderr
        assert f"another run (pid {os.getpid()}:" in probe.stdout and str(tmp_path) in probe.stdout
    # Released: another process takes it at once.
    free = subprocess.run([sys.executable, "-c", "from retailsim_pipeline.prep.files import DataFolderLock as L\n"
                           f"L({str(tmp_path)!r}).acquire(wait=False)"], cwd=REPO)
    assert free.returncode == 0


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; from retailsim_pipeline.prep.files import "
                               f"DataFolderLock as L\nL({str(tmp_path)!r}).acquire(wait=False); print('held', "
                               "flush=True); time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DataFolderBusy, match=f"pid {holder.pid}"):
        DataFolderLock(tmp_path).acquire(wait=False)
    holder.kill()
    holder.wait()
    DataFolderLock(tmp_path).acquire(wait=False).release()


def test_second_run_exits_naming_the_first_or_waits_for_it(tiny_copy):
    with DataFolderLock(tiny_copy.root):
        busy = _run(tiny_copy)
        out, _ = busy.communicate(timeout=120)
        assert busy.returncode == 1, out
        assert f"another run (pid {os.getpid()}" in out and str(tiny_copy.root) in out and "--wait" in out
        assert not tiny_copy.transactions.exists()  # it wrote nothing
        waiting = _run(tiny_copy, "--wait")
        time.sleep(8)  # it started, found the lock held and waits
        assert waiting.poll() is None
    out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, out
    assert "waiting for it to finish" in out and "materialized 12 partition(s)" in out


def test_two_runs_started_together_ingest_each_week_once(tiny_copy, monkeypatch):
    first, second = _run(tiny_copy, "--wait"), _run(tiny_copy, "--wait")
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    assert sorted("materialized 12 partition(s)" in o for o in outs) == [False, True], outs
    assert any("12 already up to date" in o for o in outs), outs
    # The instance both runs wrote to (the project's dagster.yaml, state under the data folder).
    monkeypatch.setenv("RETAILSIM_DAGSTER_DIR", str(tiny_copy.root / "dagster"))
    monkeypatch.setenv("RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR", str(tiny_copy.root / "dagster" / "compute_logs"))
    with dg.DagsterInstance.from_config(str(REPO)) as instance:
        records = instance.fetch_materializations(dg.AssetKey("raw_transactions"), limit=100).records
        weeks = [r.asset_materialization.partition for r in records]
        assert sorted(weeks) == sorted(set(weeks)) and len(weeks) == 12  # each week exactly once

