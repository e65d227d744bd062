"""Where the training process runs: the torchrun command from the op's config, on one machine or several."""

import json
import re
import sys
from pathlib import Path

import dagster as dg
import pytest

from retailsim_pipeline.config import LaunchConfig, config_hash
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.defs.training_assets import (
    TrainSettings,
    resolve_training_config,
    trained_world_model,
    training_command,
)
from retailsim_pipeline.training.pipes import misplaced_rank
from retailsim_pipeline.training.run import build_parser, params_from_args

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ENTRY = ["-m", "retailsim_pipeline.training"]


# ---------------------------------------------------------------- torchrun from the op's config

def test_the_op_config_gives_the_exact_torchrun_command():
    one = resolve_training_config(TrainSettings(preset="tiny"))
    assert training_command(one) == [sys.executable, *ENTRY]
    gpus = TrainSettings(preset="tiny", n_gpus=4)
    assert training_command(resolve_training_config(gpus), gpus.launch) == [
        TORCHRUN, "--standalone", "--nproc-per-node=4", *ENTRY]
    nodes = TrainSettings(preset="tiny", n_gpus=4, launch={"nnodes": 2, "rdzv_endpoint": "10.0.0.1:29500"})
    assert training_command(resolve_training_config(nodes), nodes.launch) == [
        TORCHRUN, "--nnodes=2", "--node-rank=0", "--nproc-per-node=4", "--rdzv-backend=static",
        "--rdzv-endpoint=10.0.0.1:29500", *ENTRY]
    c10d = TrainSettings(preset="tiny", launch={"nnodes": 3, "rdzv_backend": "c10d", "rdzv_id": "retrain-42",
                                                "rdzv_endpoint": "[fd00::1]:29400"})
    # one GPU per node still needs torchrun; in an image, the executables go by name
    assert training_command(resolve_training_config(c10d), c10d.launch, in_image=True) == [
        "torchrun", "--nnodes=3", "--node-rank=0", "--nproc-per-node=1", "--rdzv-backend=c10d",
        "--rdzv-endpoint=[fd00::1]:29400", "--rdzv-id=retrain-42", *ENTRY]
    assert training_command(one, in_image=True) == ["python", *ENTRY]
    # where the ranks run is not part of the recipe: the checkpoint folder is the same on every node
    assert config_hash(resolve_training_config(nodes)) == config_hash(resolve_training_config(gpus))


@pytest.mark.parametrize("launch, message", [
    ({"node_rank": 1}, "node ranks run from 0 to 0"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "node ranks run from 0 to 1"),
    ({"nnodes": 2}, "needs rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "10.0.0.1"}, "is not HOST:PORT"),
    ({"nnodes": 2, "rdzv_endpoint": "10.0.0.1:65536"}, "is not HOST:PORT"),
    ({"rdzv_endpoint": "10.0.0.1:29500"}, "a single machine needs no rendezvous"),
    ({"nnodes": 2, "rdzv_endpoint": "h:1", "rdzv_id": "job"}, "'static', which has no job id"),
    ({"nnodes": 2, "rdzv_endpoint": "h:1", "rdzv_backend": "c10d", "rdzv_id": "job 1"}, "letters, digits"),
    ({"nnodes": 2, "rdzv_endpoint": "h:1", "rdzv_backend": "etcd"}, "'static' or 'c10d'"),
])
def test_a_bad_launch_is_refused_with_the_reason(launch, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LaunchConfig(**launch)
    with pytest.raises(ValueError, match=re.escape(message)):  # the launchpad's class validates the same
        TrainSettings(launch=launch)


def test_other_nodes_take_the_run_parameters_from_a_file(tmp_path):
    params = {"config": {"preset": "tiny"}, "cache_path": "/data/cache/x", "out_dir": "/data/training/x"}
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = build_parser().parse_args(["--params", str(tmp_path / "params.json"), "--quiet"])
    assert params_from_args(args) == params
    args = build_parser().parse_args(["--params", str(tmp_path / "params.json"), "--preset", "tiny", "--set", "a=1"])
    with pytest.raises(SystemExit, match="drop --preset, --set"):
        params_from_args(args)


def test_the_node_dagster_launched_must_hold_rank_0():
    assert misplaced_rank({}) is None  # no torchrun
    assert misplaced_rank({"RANK": "0", "LOCAL_RANK": "0"}) is None
    assert misplaced_rank({"RANK": "3", "LOCAL_RANK": "3"}) is None  # another rank of node 0
    problem = misplaced_rank({"RANK": "4", "LOCAL_RANK": "0", "GROUP_RANK": "1"})
    assert "global rank 4 (node 1)" in problem and "rdzv_backend 'static'" in problem


# ---------------------------------------------------------------- the op, its Pipes client faked at the edge

class Launched(Exception):
    """Raised by the fake once the process has been handed over: nothing runs."""


@dg.asset(name="tensor_cache")
def cache_stub() -> str:
    return "/data/cache/0123456789abcdef"


def _train(resources: dict, op_config: dict) -> dg.ExecuteInProcessResult:
    return dg.materialize_to_memory(
        [cache_stub, trained_world_model], resources={"retailsim_data": RetailSimData(data_dir="/data"), **resources},
        run_config={"ops": {"trained_world_model": {"ops": {"train_world_model": {"config": op_config}}}}},
        raise_on_error=False)


def _failure(result: dg.ExecuteInProcessResult) -> str:
    (event,) = [e for e in result.all_events if e.is_step_failure]
    return event.step_failure_data.error.to_string()


class RecordingSubprocessClient(dg.PipesSubprocessClient):
    def __init__(self):
        super().__init__()
        self.calls = []

    def run(self, *, context, command, extras=None, env=None, **kwargs):
        self.calls.append({"command": command, "extras": extras, "env": env})
        raise Launched()


def test_the_op_launches_node_0_and_tells_how_to_start_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    client = RecordingSubprocessClient()
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize_to_memory(
        [cache_stub, trained_world_model], instance=instance,
        resources={"retailsim_data": RetailSimData(data_dir=str(tmp_path)), "pipes_subprocess_client": client},
        run_config={"ops": {"trained_world_model": {"ops": {"train_world_model": {"config": {
            "preset": "tiny", "n_gpus": 2, "launch": {"nnodes": 2, "rdzv_endpoint": "node0.example:29500"}}}}}}},
        raise_on_error=False)
    assert "Launched" in _failure(result)
    (call,) = client.calls
    assert call["command"] == [TORCHRUN, "--nnodes=2", "--node-rank=0", "--nproc-per-node=2", "--rdzv-backend=static",
                               "--rdzv-endpoint=node0.example:29500", *ENTRY]
    assert json.loads(call["env"]["RETAILSIM_TRAINING_PARAMS"]) == call["extras"]
    params_file = Path(call["extras"]["out_dir"]) / "params.json"
    assert json.loads(params_file.read_text()) == call["extras"]
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert f"node 1 of 2: start `torchrun --nnodes=2 --node-rank=1 --nproc-per-node=2 --rdzv-backend=static " \
           f"--rdzv-endpoint=node0.example:29500 -m retailsim_pipeline.training --params {params_file}`" in logged


def test_the_op_refuses_to_be_another_node_than_0(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    client = RecordingSubprocessClient()
    result = _train({"pipes_subprocess_client": client},
                    {"preset": "tiny", "launch": {"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "h:29500"}})
    assert not result.success and client.calls == []
    assert "node_rank = 1: the op launches node 0" in _failure(result)
