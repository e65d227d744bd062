"""Recovery after a crash: nothing stays STARTED, RUNNING or half-written once its process is gone.

A run killed with SIGKILL (or a machine that lost power) leaves three kinds of debris:

- a Dagster run STARTED forever, still holding its pool slot (the training op's ``gpu`` pool has
  one: the next training waits on "Step blocked by limit for pool gpu" for ever);
- an MLflow run RUNNING forever (when the training process itself was killed);
- temporary files and folders (``.*.tmp-<pid>``, ``cache/.tmp-<key>-<pid>``) never renamed.

A run's process is known two ways: ``retailsim run`` tags the runs it executes in-process with its
pid and host (:data:`PID_TAG` / :data:`HOST_TAG`), and a run launched from the UI or a sensor records
its run worker's pid in the engine event "Started process for run (pid: N)" (the default run
launcher starts it on this machine). :func:`recover` marks a run failed when that process is gone
(and frees its pool slots), ends MLflow runs whose training process is gone as KILLED, and removes
temporaries whose writer is gone. It runs at the start of every ``retailsim run`` (under
the data folder's writer lock) and every minute in the daemon (``recover_crashed_runs_sensor``).
Dagster's own run monitoring (``dagster.yaml``) still handles runs stuck while starting or
cancelling; the default run launcher cannot check a run worker's health, which is what this adds.

A process on another host cannot be checked from here: its runs are left alone.
"""

import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from retailsim_pipeline.config import DataPaths

log = logging.getLogger(__name__)

PID_TAG = "retailsim/pid"
HOST_TAG = "retailsim/host"

#: Statuses of a run that is (or claims to be) in flight.
_IN_FLIGHT = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
#: Our temporary names end in the writer's pid: ``.x.parquet.tmp-123``, ``.tmp-<key>-123``, ``.old-<key>-123``.
_TEMPORARY = re.compile(r"^\..*(?:tmp|old)-(?:[0-9a-f]+-)?(\d+)$")
#: Folders of the data root whose temporaries a crash can leave (training checkpoints are atomic).
_OUTPUT_FOLDERS = ("transactions", "quarantine", "samples", "cache")


def process_tags() -> dict[str, str]:
    """The tags that name this process as the one doing a run's work."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


_WORKER_STARTED = re.compile(r"Started process for run \(pid: (\d+)\)")


def run_process(instance: dg.DagsterInstance, run: dg.DagsterRun) -> tuple[int, str | None] | None:
    """(pid, host) of the process executing ``run``, or None when it is not known."""
    if PID_TAG in run.tags:
        return int(run.tags[PID_TAG]), run.tags.get(HOST_TAG)
    for record in instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records:
        entry = record.event_log_entry  # an engine event's text is its message (user_message is empty)
        m = _WORKER_STARTED.search(entry.message or entry.user_message or "")
        if m:
            return int(m.group(1)), None  # the default run launcher runs workers on this machine
    return None


def process_alive(pid: int, host: str | None = None) -> bool:
    """Whether ``pid`` runs on this host (a zombie counts as gone); True when it cannot be told."""
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class RecoveryReport:
    failed_runs: list[str] = field(default_factory=list)
    closed_mlflow_runs: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        if self.failed_runs:
            out.append(f"recovered {len(self.failed_runs)} run(s) whose process was gone (marked failed, pool "
                       f"slots freed): {', '.join(r[:8] for r in self.failed_runs)}")
        if self.closed_mlflow_runs:
            out.append(f"ended {len(self.closed_mlflow_runs)} orphaned MLflow run(s) as KILLED: "
                       f"{', '.join(r[:8] for r in self.closed_mlflow_runs)}")
        if self.removed:
            out.append(f"removed {len(self.removed)} temporary file(s)/folder(s) left by a crash")
        return out


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every in-flight run whose tagged process is gone; free its concurrency slots."""
    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_IN_FLIGHT)):
        owner = run_process(instance, run)
        if owner is None or process_alive(*owner):
            continue
        pid = owner[0]
        instance.report_run_failed(
            run, f"the process that ran it (pid {pid}) is gone (killed or crashed); marked failed by recovery"
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
        log.warning("run %s: its process %s is gone; marked failed and its pool slots freed", run.run_id, pid)
    return failed


def remove_dead_temporaries(paths: DataPaths) -> list[str]:
    """Remove temporaries whose writer (the pid in the name) is gone."""
    removed = []
    for folder in _OUTPUT_FOLDERS:
        root = paths.root / folder
        if not root.is_dir():
            continue
        for path in root.iterdir():
            m = _TEMPORARY.match(path.name)
            if m is None or process_alive(int(m.group(1))):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def recover(instance: dg.DagsterInstance, paths: DataPaths, tracking_uri: str | None = None) -> RecoveryReport:
    """Everything above, for this instance and data folder."""
    report = RecoveryReport(failed_runs=fail_dead_runs(instance), removed=remove_dead_temporaries(paths))
    store = paths.mlflow / "mlflow.db"
    if tracking_uri is not None or store.exists():  # no store yet: no run to close, no mlflow import
        from retailsim_pipeline import tracking

        uri = tracking_uri or tracking.default_tracking_uri(paths)
        report.closed_mlflow_runs = tracking.close_orphaned_runs(
            uri, lambda pid, host: process_alive(pid, host))
    for line in report.lines():
        log.warning(line)
    return report
