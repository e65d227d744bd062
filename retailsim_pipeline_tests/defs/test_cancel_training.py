"""Interrupting the Dagster run that trains stops the training process: Pipes forwards SIGINT, the
trainer checkpoints and exits."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import dagster as dg

    from retailsim_pipeline.config import DataPaths
    from retailsim_pipeline.definitions import defs
    from retailsim_pipeline.defs.resources import RetailSimData
    from retailsim_pipeline.defs.runner import materialize_selection

    paths = DataPaths(Path(sys.argv[1]))
    with dg.instance_for_test(temp_dir=sys.argv[2]) as instance:
        report = materialize_selection("group:ingest or group:prep", paths, instance=instance, defs=defs,
                                       progress=False)
        assert report.success, report.failures
        print("DATA READY", flush=True)
        dg.materialize(
            list(defs.assets) + list(defs.asset_checks), selection=["trained_world_model"], instance=instance,
            resources={**defs.resources, "retailsim_data": RetailSimData(data_dir=str(paths.root)),
                       "training_pipes_client": dg.PipesSubprocessClient(forward_termination=True)},
            run_config={"ops": {"trained_world_model": {"ops": {"train_world_model": {"config": {
                "preset": "tiny", "epochs": 500, "log_every": 1, "val_every": 1000}}}}}},
            raise_on_error=False,
        )
        print("MATERIALIZE RETURNED", flush=True)
''')


def test_interrupting_the_run_stops_the_training_process(tiny_copy, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    (tmp_path / "dagster").mkdir()
    env = {**os.environ, "RETAILSIM_DATA_DIR": str(tiny_copy.root), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_copy.root), str(tmp_path / "dagster")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    deadline = time.time() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 5:" in line or time.time() > deadline:
                break
        assert any("step 5:" in line for line in lines), "".join(lines[-30:])
        os.kill(proc.pid, signal.SIGINT)  # what terminating the run does to its worker process
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    assert "sending SIGINT to subprocess" in output, output[-3000:]
    results = list((tiny_copy.root / "training").glob("*/result.json"))
    assert len(results) == 1, output[-3000:]
    result = json.loads(results[0].read_text())
    assert result["stopped"] == "signal" and result["steps"] >= 5
    assert (results[0].parent / "last.pt").exists()
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-f", "retailsim_pipeline.training"], capture_output=True, text=True)
    children = [pid for pid in leftover.stdout.split() if Path(f"/proc/{pid}/environ").exists()
                and str(tiny_copy.root).encode() in Path(f"/proc/{pid}/environ").read_bytes()]
    assert not children, f"training processes still running: {children}"
