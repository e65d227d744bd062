"""Recovery in the daemon path: the housekeeping sensor finds runs whose process is gone."""

import os
import subprocess
import sys
import uuid

import dagster as dg
import pytest
from dagster._core.events import EngineEventData
from dagster._core.storage.dagster_run import DagsterRun

from retailsim_pipeline.defs.automation import recover_crashed_runs_sensor
from retailsim_pipeline.defs.recovery import HOST_TAG, PID_TAG
from retailsim_pipeline.defs.resources import RetailSimData


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _started_run(instance, tags=None) -> DagsterRun:
    return instance.add_run(DagsterRun(job_name="ingest_job", run_id=str(uuid.uuid4()),
                                       status=dg.DagsterRunStatus.STARTED, tags=tags or {}))


def test_sensor_fails_runs_whose_process_is_gone_and_removes_their_temporaries(tiny_copy, instance):
    dead, alive = _dead_pid(), os.getpid()
    tagged_dead = _started_run(instance, {PID_TAG: str(dead), HOST_TAG: os.uname().nodename})
    tagged_alive = _started_run(instance, {PID_TAG: str(alive)})
    # A run launched by the daemon: its worker's pid is in the launcher's engine event.
    launched = _started_run(instance)
    instance.report_engine_event(f"Started process for run (pid: {dead}).", launched, EngineEventData.in_process(dead))
    unknown = _started_run(instance)  # no way to tell: left alone
    tiny_copy.transactions.mkdir(parents=True)
    stale = tiny_copy.transactions / f".transactions_200607.parquet.tmp-{dead}"
    live = tiny_copy.transactions / f".transactions_200608.parquet.tmp-{alive}"
    stale.write_text("half")
    live.write_text("in progress")
    (tiny_copy.cache / f".tmp-0123abcd-{dead}").mkdir(parents=True)

    with dg.build_sensor_context(instance=instance, resources={
            "retailsim_data": RetailSimData(data_dir=str(tiny_copy.root))}) as context:
        result = recover_crashed_runs_sensor(context)
        assert "recovered 2 run(s) whose process was gone" in result.skip_message
        assert "removed 2 temporary file(s)/folder(s)" in result.skip_message
        status = [instance.get_run_by_id(r.run_id).status for r in (tagged_dead, tagged_alive, launched, unknown)]
        assert status == [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.FAILURE,
                          dg.DagsterRunStatus.STARTED]
        assert not stale.exists() and live.exists() and not list(tiny_copy.cache.glob(".tmp-*"))

        again = recover_crashed_runs_sensor(context)
        assert again.skip_message == "nothing to recover"
