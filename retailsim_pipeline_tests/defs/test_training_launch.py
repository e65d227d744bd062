"""Where the training process runs: the torchrun command from the op's config (one machine or several),
and the Kubernetes pod that dagster-k8s's PipesK8sClient would submit. No cluster here: the pod is
built by dagster-k8s's own code and caught at the Kubernetes API call."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_pipes import PipesDefaultContextLoader, decode_env_var

from retailsim_pipeline.config import LaunchConfig, TrainingPodConfig, config_hash
from retailsim_pipeline.defs.resources import RetailSimData, TrainingPod, training_launch_resources
from retailsim_pipeline.defs.training_assets import (
    TrainSettings,
    resolve_training_config,
    trained_world_model,
    training_command,
)
from retailsim_pipeline.training.pipes import misplaced_rank
from retailsim_pipeline.training.run import build_parser, params_from_args

README = Path(__file__).resolve().parents[2] / "README.md"
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


# ---------------------------------------------------------------- the op, its launcher resources faked at the edge

class Launched(Exception):
    """Raised by the fakes once the process or pod has been handed over: nothing runs."""


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
        resources={"retailsim_data": RetailSimData(data_dir=str(tmp_path)), "training_pipes_client": client,
                   "training_pod": TrainingPod()},
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
    result = _train({"training_pipes_client": client, "training_pod": TrainingPod()},
                    {"preset": "tiny", "launch": {"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "h:29500"}})
    assert not result.success and client.calls == []
    assert "node_rank = 1: the op launches node 0" in _failure(result)


# ---------------------------------------------------------------- Kubernetes

#: The launcher's environment behind the README's pod (section "On Kubernetes").
K8S_ENV = {"RETAILSIM_TRAINING_LAUNCHER": "k8s",
           "RETAILSIM_TRAINING_POD_IMAGE": "registry.example.com/retailsim:0.1.0",
           "RETAILSIM_TRAINING_POD_DATA_VOLUME_CLAIM": "retailsim-data",
           "RETAILSIM_TRAINING_POD_NAMESPACE": "ml",
           "RETAILSIM_TRAINING_POD_CPU_REQUEST": "8",
           "RETAILSIM_TRAINING_POD_MEMORY_REQUEST": "64Gi",
           "RETAILSIM_TRAINING_POD_MEMORY_LIMIT": "64Gi"}


def test_the_definitions_load_with_the_k8s_launcher():
    """In a fresh interpreter, as `dagster dev` would load them, with the launcher chosen by the environment."""
    code = ("import dagster as dg; from retailsim_pipeline.definitions import defs; "
            "dg.Definitions.validate_loadable(defs); r = defs.resources; "
            "print(type(r['training_pipes_client']).__name__, r['training_pod'].image)")
    env = {**os.environ, **K8S_ENV, "PYTHONPATH": str(README.parent)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["PipesK8sClient", "registry.example.com/retailsim:0.1.0"]


@pytest.mark.parametrize("environ, message", [
    ({"RETAILSIM_TRAINING_LAUNCHER": "slurm"}, "RETAILSIM_TRAINING_LAUNCHER='slurm': choose one of subprocess, k8s"),
    ({"RETAILSIM_TRAINING_LAUNCHER": "k8s"}, "needs RETAILSIM_TRAINING_POD_IMAGE and "
                                             "RETAILSIM_TRAINING_POD_DATA_VOLUME_CLAIM"),
    ({**K8S_ENV, "RETAILSIM_TRAINING_POD_CPU_LIMIT": "4"}, "cpu_request = 8 exceeds cpu_limit = 4"),
    ({**K8S_ENV, "RETAILSIM_TRAINING_POD_MEMORY_LIMIT": "64 GB"}, "'64 GB' is not a Kubernetes quantity"),
])
def test_a_bad_launcher_environment_is_refused_when_the_definitions_load(environ, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        training_launch_resources(environ)


def test_the_default_launcher_is_a_subprocess():
    resources = training_launch_resources({})
    assert type(resources["training_pipes_client"]) is dg.PipesSubprocessClient
    assert resources["training_pod"] == TrainingPod()
    assert TrainingPod().model_dump() == TrainingPodConfig().model_dump()


def _readme_pod_spec() -> dict:
    """The pod spec shown in the README below the marker naming this file."""
    text = README.read_text()
    start = text.index("<!-- pod spec: checked by retailsim_pipeline_tests/defs/test_training_launch.py -->")
    block = re.search(r"```yaml\n(.*?)```", text[start:], re.S)
    return yaml.safe_load(block.group(1))["spec"]


@pytest.fixture
def kubernetes_api(monkeypatch):
    """dagster-k8s as is, up to the Kubernetes API: ``create_namespaced_pod`` records the pod and stops."""
    import dagster_k8s.pipes as k8s_pipes

    submitted = []

    class CoreApi:
        def create_namespaced_pod(self, namespace, body):
            submitted.append((namespace, body))
            raise Launched()

    class Client:
        core_api = CoreApi()

    monkeypatch.setattr(k8s_pipes.PipesK8sClient, "_load_k8s_config", lambda self: None)
    monkeypatch.setattr(k8s_pipes.DagsterKubernetesClient, "production_client", classmethod(lambda cls: Client()))
    return submitted


def test_the_pod_it_would_submit_is_the_one_in_the_readme(kubernetes_api, monkeypatch):
    """Command, environment (the Pipes bootstrap variables included), resources, GPU limit, image and
    volumes: the README's pod spec, exactly."""
    import kubernetes

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.ml.svc:5000")
    result = _train(training_launch_resources(K8S_ENV), {"preset": "seed", "n_gpus": 2})
    assert "Launched" in _failure(result)
    ((namespace, pod),) = kubernetes_api
    pod = kubernetes.client.ApiClient().sanitize_for_serialization(pod)  # as sent to the API server
    assert namespace == "ml" and pod["metadata"]["name"].startswith(f"dagster-{result.run_id[:18]}-train-world-model-")

    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    params = json.loads(env["RETAILSIM_TRAINING_PARAMS"])
    context = decode_env_var(env["DAGSTER_PIPES_CONTEXT"])[PipesDefaultContextLoader.DIRECT_KEY]
    assert context["run_id"] == result.run_id and context["extras"] == params
    assert decode_env_var(env["DAGSTER_PIPES_MESSAGES"]) == {"stdio": "stderr"}  # read back from the pod's log
    assert params["config"]["preset"] == "seed" and params["cache_path"] == "/data/cache/0123456789abcdef"
    assert params["out_dir"].startswith("/data/training/0123456789abcdef-seed-")
    assert params["tracking_uri"] == "http://mlflow.ml.svc:5000"
    # The README shows these three values by their meaning.
    readme = _readme_pod_spec()
    shown = {e["name"]: e["value"] for e in readme["containers"][0]["env"]}
    for container_env in pod["spec"]["containers"][0]["env"]:
        if container_env["name"] in ("DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES", "RETAILSIM_TRAINING_PARAMS"):
            container_env["value"] = shown[container_env["name"]]
    assert pod["spec"] == readme


def test_a_pod_needs_an_image_and_one_node(kubernetes_api, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    resources = training_launch_resources(K8S_ENV)
    several = _train(resources, {"preset": "seed", "launch": {"nnodes": 2, "rdzv_endpoint": "h:29500"}})
    assert "nnodes = 2 with the k8s launcher: this op starts one pod" in _failure(several)
    # run config replaces the resource's values as a whole (Dagster does not merge them)
    replaced = dg.materialize_to_memory(
        [cache_stub, trained_world_model], resources={"retailsim_data": RetailSimData(data_dir="/data"), **resources},
        run_config={"resources": {"training_pod": {"config": {"cpu_request": "2"}}}}, raise_on_error=False)
    assert "the training pod has no image: set $RETAILSIM_TRAINING_POD_IMAGE" in _failure(replaced)
    assert kubernetes_api == []
