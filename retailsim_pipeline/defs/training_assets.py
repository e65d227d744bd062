"""Group ``training``: the world model, trained in its own process through Dagster Pipes and registered in MLflow."""

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field, create_model

from retailsim_pipeline import tracking
from retailsim_pipeline.config import (
    LaunchConfig,
    LossWeights,
    ModelConfig,
    TrainingConfig,
    config_hash,
    training_preset,
)
from retailsim_pipeline.defs.resources import RetailSimData, TrainingPod, pod_env_name
from retailsim_pipeline.defs.settings import LaunchSettings
from retailsim_pipeline.training.pipes import PARAMS_ENV
from retailsim_pipeline.training.run import PARENT_PID_ENV, apply_overrides

TRAINING_CODE_VERSION = "2"  # 2: the model reads the customer-history memory


def _overrides_of(cls, name: str, nested: dict[str, type] | None = None) -> type[dg.Config]:
    """A Dagster Config with every field of ``cls`` made optional (None = keep the preset's value).

    Names, types and descriptions come from the config classes in ``config.py``; the values live in
    the presets, so the launchpad shows the same knobs without a second set of defaults.
    """
    nested = nested or {}
    fields = {}
    for fname, info in cls.model_fields.items():
        annotation = nested.get(fname, info.annotation)
        fields[fname] = (Optional[annotation], Field(None, description=info.description))
    return create_model(name, __base__=dg.Config, __doc__=f"Overrides of {cls.__name__} (empty = preset value).",
                        **fields)


ModelOverrides = _overrides_of(ModelConfig, "ModelOverrides")
LossWeightOverrides = _overrides_of(LossWeights, "LossWeightOverrides")
_TrainingOverrides = _overrides_of(TrainingConfig, "_TrainingOverrides",
                                   {"model": ModelOverrides, "loss_weights": LossWeightOverrides})


class TrainSettings(_TrainingOverrides):
    """Training preset (tiny, demo, seed) plus any field of TrainingConfig to override."""

    preset: str = Field("demo", description="tiny (tests), demo (CPU, minutes), seed (GPU, the seed recipe)")
    launch: LaunchSettings = Field(default_factory=LaunchSettings, description="Several machines: torchrun's "
                                   "nnodes, node_rank, rdzv_backend, rdzv_endpoint, rdzv_id (not part of the recipe).")


def resolve_training_config(settings: dg.Config) -> TrainingConfig:
    """The preset named by ``settings.preset`` with every non-empty launchpad field applied."""
    base = training_preset(settings.preset)
    flat: dict = {}
    for key, value in settings.model_dump().items():
        if key in ("preset", "launch") or value is None:
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if v is not None})
        else:
            flat[key] = value
    return apply_overrides(base, flat)


#: The training process's entry point, the same under every launcher.
TRAINING_MODULE = "retailsim_pipeline.training"


def training_command(config: TrainingConfig, launch: LaunchConfig | None = None, *,
                     in_image: bool = False) -> list[str]:
    """The training process's argv: ``python -m retailsim_pipeline.training`` for one GPU on one machine,
    else ``torchrun <options> -m retailsim_pipeline.training`` with ``config.n_gpus`` ranks per node and
    :meth:`LaunchConfig.torchrun_args` for the machines.

    ``in_image``: ``python`` and ``torchrun`` by name, as a container image's PATH finds them; otherwise
    this interpreter and the torchrun installed beside it (one on the PATH could belong to another Python).
    """
    launch = launch or LaunchConfig()
    if config.n_gpus == 1 and launch.nnodes == 1:
        return ["python" if in_image else sys.executable, "-m", TRAINING_MODULE]
    beside = Path(sys.executable).parent / "torchrun"
    torchrun = "torchrun" if in_image else str(beside) if beside.exists() else shutil.which("torchrun") or str(beside)
    return [torchrun, *launch.torchrun_args(nproc_per_node=config.n_gpus), "-m", TRAINING_MODULE]


def _launch_in_pod(context: dg.OpExecutionContext, client: dg.PipesClient, pod: TrainingPod, training: TrainingConfig,
                   launch: LaunchConfig, params: dict, env: dict) -> dg.PipesClientCompletedInvocation:
    """Run the training in a Kubernetes pod through dagster-k8s's ``PipesK8sClient``, which deletes the
    pod when the op ends."""
    if launch.nnodes > 1:
        raise dg.Failure(f"nnodes = {launch.nnodes} with the k8s launcher: this op starts one pod, and several "
                         "nodes need one pod each and a rendezvous address known before they start (a JobSet or "
                         "a Kubeflow PyTorchJob). Use nnodes = 1 with up to one machine's GPUs in n_gpus.")
    for name in ("image", "data_volume_claim"):  # the run config may have replaced the Definitions' values
        if not getattr(pod, name):
            raise dg.Failure(f"the training pod has no {name}: set ${pod_env_name(name)} or "
                             f"resources.training_pod.config.{name}")
    command = training_command(training, launch, in_image=True)
    context.log.info(f"launching {' '.join(command)} in a pod of {pod.image} (preset {training.preset}, "
                     f"{training.n_gpus} x {pod.gpu_resource or 'no GPU'}, out {params['out_dir']})")
    return client.run(context=context, extras=params, image=pod.image, command=command,
                      namespace=pod.namespace or None, env=env,
                      base_pod_spec=pod.pod_spec(training.n_gpus, env["RETAILSIM_DATA_DIR"]))


def _launch_subprocess(context: dg.OpExecutionContext, client: dg.PipesSubprocessClient, training: TrainingConfig,
                       launch: LaunchConfig, params: dict, env: dict) -> dg.PipesClientCompletedInvocation:
    """Run the training as a child process of this one (under torchrun for several GPUs or machines)."""
    command = training_command(training, launch)
    if launch.nnodes > 1:
        # The other nodes run the same command with their node rank and this run's parameters.
        params_file = Path(params["out_dir"]) / "params.json"
        params_file.parent.mkdir(parents=True, exist_ok=True)
        params_file.write_text(json.dumps(params, indent=1))
        for node in range(1, launch.nnodes):
            other = training_command(training, launch.model_copy(update={"node_rank": node}), in_image=True)
            context.log.info(f"node {node} of {launch.nnodes}: start `{' '.join(other)} --params {params_file}`")
    context.log.info(f"launching {' '.join(command)} (preset {training.preset}, out {params['out_dir']})")
    # The child watches this process (PARENT_PID_ENV) and stops cleanly when it is gone.
    return client.run(command=command, context=context, extras=params,
                      env={**env, PARENT_PID_ENV: str(os.getpid())})


@dg.op(pool="gpu", description="Train the world model in its own process (Dagster Pipes: a subprocess, or a "
       "Kubernetes pod); returns the MLflow run, the logged model URI, the best checkpoint and the headline metrics.")
def train_world_model(
    context: dg.OpExecutionContext,
    config: TrainSettings,
    tensor_cache: str,
    training_pipes_client: dg.ResourceParam[dg.PipesClient],
    training_pod: TrainingPod,
    retailsim_data: RetailSimData,
) -> dg.Output[dict]:
    training = resolve_training_config(config)
    launch = LaunchConfig.model_validate(config.launch.model_dump())
    if launch.node_rank != 0:
        raise dg.Failure(f"node_rank = {launch.node_rank}: the op launches node 0, whose rank 0 reports the model to "
                         "Dagster; with node_rank 0 it logs the command that starts each other node")
    paths = retailsim_data.paths()
    # One folder per (cache, recipe): a retried or re-launched run resumes from its last checkpoint.
    out_dir = paths.root / "training" / f"{Path(tensor_cache).name}-{training.preset}-{config_hash(training)}"
    params = {
        "config": training.model_dump(mode="json"),
        "cache_path": tensor_cache,
        "out_dir": str(out_dir),
        "resume": "auto",
        "tracking": True,
        "tracking_uri": tracking.default_tracking_uri(paths),
        "run_name": f"{training.preset}-{context.run_id[:8]}",
        "tags": {"dagster.run_id": context.run_id, "dagster.asset_key": "trained_world_model",
                 "dagster.run_url": f"http://127.0.0.1:3000/runs/{context.run_id}"},
    }
    env = {"RETAILSIM_DATA_DIR": str(paths.root), PARAMS_ENV: json.dumps(params)}
    if isinstance(training_pipes_client, dg.PipesSubprocessClient):
        invocation = _launch_subprocess(context, training_pipes_client, training, launch, params, env)
    else:
        from dagster_k8s import PipesK8sClient  # only with the k8s launcher: the kubernetes client is large

        if not isinstance(training_pipes_client, PipesK8sClient):
            raise TypeError(f"training_pipes_client is a {type(training_pipes_client).__name__}; the training op "
                            "launches through PipesSubprocessClient or dagster-k8s's PipesK8sClient")
        invocation = _launch_in_pod(context, training_pipes_client, training_pod, training, launch, params, env)
    messages = invocation.get_custom_messages()
    if not messages or "model_uri" not in messages[-1]:
        raise dg.Failure(f"the training process ended without reporting a model (messages: {messages})")
    # An Output, not a bare dict: the Pipes session turns this compute function into a generator.
    return dg.Output(messages[-1])


@dg.op(description="Register the trained model in the MLflow registry and point the alias `challenger` at it.")
def register_world_model(context: dg.OpExecutionContext, trained: dict, retailsim_data: RetailSimData) -> dg.Output:
    uri = tracking.default_tracking_uri(retailsim_data.paths())
    version = tracking.register_world_model(
        trained["model_uri"], alias="challenger", tracking_uri=uri,
        tags={"dagster.run_id": context.run_id, "retailsim.cache_key": trained["cache_key"],
              "mlflow.run_id": trained["mlflow_run_id"]},
    )
    info = {**trained, "model_version": str(version.version), "registered_model_uri": version.uri}
    context.log.info(f"registered {version.uri} (alias challenger)")
    return dg.Output(
        info,
        metadata={
            "mlflow_run": dg.MetadataValue.url(trained["mlflow_run_url"]),
            "mlflow_run_id": trained["mlflow_run_id"],
            "model_version": str(version.version),
            "model_uri": version.uri,
            "logged_model_uri": trained["model_uri"],
            "parameters": trained["parameters"],
            "best_val_loss": float(trained["best_val_loss"]),
            "samples_per_s": round(float(trained["samples_per_s"]), 1),
            "wall_seconds": round(float(trained["wall_seconds"]), 1),
            "steps": trained["steps"],
            "stopped": trained["stopped"],
            "best_checkpoint": dg.MetadataValue.path(str(trained["best_checkpoint"])),
            "preset": trained["preset"],
        },
    )


@dg.graph_asset(
    group_name="training",
    code_version=TRAINING_CODE_VERSION,
    kinds={"pytorch", "mlflow"},
    owners=["team:retailsim"],
    description=(
        "The Mamba-Transformer world model (DESIGN §5) trained on the tensor cache by a separate process "
        "launched through Dagster Pipes (torchrun for several GPUs; pool `gpu`, one at a time), logged to "
        "MLflow with its config, curves and system metrics, and registered as `retailsim-world-model` with "
        "alias `challenger`. Metadata links the MLflow run and model version."
    ),
)
def trained_world_model(tensor_cache: str) -> dict:
    return register_world_model(train_world_model(tensor_cache))
