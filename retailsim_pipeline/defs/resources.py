"""Resources shared by the assets, and the choice of where the training process runs."""

import os
from collections.abc import Mapping

import dagster as dg

from retailsim_pipeline.config import DataPaths, TrainingPodConfig, data_root

#: Which Pipes client launches the training process, read where the Definitions are built:
#: ``subprocess`` (default: a child process of the run) or ``k8s`` (a pod, through dagster-k8s).
TRAINING_LAUNCHER_ENV = "RETAILSIM_TRAINING_LAUNCHER"
TRAINING_LAUNCHERS = ("subprocess", "k8s")
#: With ``k8s``, each field of the training pod (:class:`TrainingPodConfig`) from the variable of its
#: name: ``RETAILSIM_TRAINING_POD_IMAGE``, ``RETAILSIM_TRAINING_POD_CPU_REQUEST``, …
TRAINING_POD_ENV_PREFIX = "RETAILSIM_TRAINING_POD_"


def pod_env_name(field: str) -> str:
    return TRAINING_POD_ENV_PREFIX + field.upper()


class RetailSimData(dg.ConfigurableResource):
    """Where the pipeline's data lives. Empty ``data_dir`` means ``$RETAILSIM_DATA_DIR`` (default ``./data``)."""

    data_dir: str = ""

    def paths(self) -> DataPaths:
        from pathlib import Path

        return DataPaths(Path(self.data_dir).resolve() if self.data_dir else data_root())


def writer_lock(context: dg.AssetExecutionContext, data: RetailSimData):
    """The data folder's writer lock, waited for with a line in the run's log (re-entrant under
    ``retailsim run``, which already holds it)."""
    from retailsim_pipeline.prep.files import DataFolderLock

    return DataFolderLock(data.paths().root, wait=True, on_wait=context.log.info)


class JsonIOManager(dg.IOManager):
    """Stores what assets hand each other (folder paths, small JSON documents) as JSON files.

    Never pickles: a value that is not JSON (str, number, bool, None, list, dict) is a TypeError
    naming the output. Files live under ``DATA/dagster/values/``: an asset's value at
    ``<asset key>/<partition or __all__>.json``, an op's intermediate output (inside the training graph
    asset) at ``runs/<run id>/<step>/<output>.json``. Large data never passes here: assets exchange
    folders (the tensor cache) and read their files themselves.
    """

    def __init__(self, root):
        from pathlib import Path

        self.root = Path(root)

    def _path(self, context):
        if context.has_asset_key:
            leaf = context.asset_partition_key if context.has_asset_partitions else "__all__"
            return self.root.joinpath(*context.asset_key.path, f"{leaf}.json")
        return self.root.joinpath("runs", *context.get_run_scoped_output_identifier()).with_suffix(".json")

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        import json
        import os

        path = self._path(context)
        try:
            text = json.dumps(obj, indent=1)
        except TypeError as exc:
            raise TypeError(f"output {context.name!r} is not JSON ({type(obj).__name__}); assets pass folder "
                            f"paths and small JSON documents between them: {exc}") from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        context.add_output_metadata({"value_path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext):
        import json

        upstream = context.upstream_output
        path = self._path(upstream if upstream is not None else context)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no stored value for input {context.name!r}; materialize its "
                                    "upstream asset first")
        return json.loads(path.read_text())


@dg.io_manager(required_resource_keys={"retailsim_data"},
               description="JSON files under DATA/dagster/values (paths and small documents; never pickles).")
def json_io_manager(init_context) -> JsonIOManager:
    return JsonIOManager(init_context.resources.retailsim_data.paths().dagster / "values")


class TrainingPod(TrainingPodConfig, dg.ConfigurableResource):
    """The pod that runs the training when the launcher is ``k8s`` (unused by the subprocess launcher).
    Fields and defaults: :class:`~retailsim_pipeline.config.TrainingPodConfig`."""

    def pod_spec(self, n_gpus: int, data_dir: str) -> dict:
        """The ``base_pod_spec`` for ``PipesK8sClient.run``: resources, the data volume at ``data_dir``,
        and /dev/shm for several ranks. Image, command and environment are the run's own arguments;
        dagster-k8s adds the Pipes variables and ``restartPolicy: Never``."""
        requests = {"cpu": self.cpu_request, "memory": self.memory_request}
        limits = {"memory": self.memory_limit} if self.memory_limit else {}
        if self.cpu_limit:
            limits["cpu"] = self.cpu_limit
        if self.gpu_resource:
            limits[self.gpu_resource] = str(n_gpus)  # extended resources are set as limits only
        container = {"image_pull_policy": self.image_pull_policy,
                     "resources": {"requests": requests, **({"limits": limits} if limits else {})},
                     "volume_mounts": [{"name": "data", "mount_path": data_dir}]}
        volumes = [{"name": "data", "persistent_volume_claim": {"claim_name": self.data_volume_claim}}]
        if n_gpus > 1:
            container["volume_mounts"].append({"name": "dshm", "mount_path": "/dev/shm"})
            volumes.append({"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": self.shm_size}})
        spec = {"containers": [container], "volumes": volumes}
        if self.service_account_name:
            spec["service_account_name"] = self.service_account_name
        return spec


def training_launch_resources(environ: Mapping[str, str] = os.environ) -> dict:
    """The resources ``training_pipes_client`` and ``training_pod``, chosen by ``$RETAILSIM_TRAINING_LAUNCHER``.

    ``subprocess`` (or unset): ``PipesSubprocessClient`` with ``forward_termination`` (cancelling the run
    terminates the training process). ``k8s``: dagster-k8s's ``PipesK8sClient`` (in-cluster config when
    ``KUBERNETES_SERVICE_HOST`` is set, else the kubeconfig) and a :class:`TrainingPod` whose fields
    come from ``$RETAILSIM_TRAINING_POD_<FIELD>`` (image and data_volume_claim required).
    """
    launcher = environ.get(TRAINING_LAUNCHER_ENV, "").strip() or "subprocess"
    if launcher == "subprocess":
        return {"training_pipes_client": dg.PipesSubprocessClient(forward_termination=True),
                "training_pod": TrainingPod()}
    if launcher != "k8s":
        raise ValueError(f"{TRAINING_LAUNCHER_ENV}={launcher!r}: choose one of {', '.join(TRAINING_LAUNCHERS)}")
    fields = {name: environ[pod_env_name(name)] for name in TrainingPodConfig.model_fields
              if pod_env_name(name) in environ}
    missing = [pod_env_name(name) for name in ("image", "data_volume_claim") if not fields.get(name)]
    if missing:
        raise ValueError(f"{TRAINING_LAUNCHER_ENV}=k8s needs {' and '.join(missing)}: the image with this package "
                         "installed, and the PersistentVolumeClaim holding the data root")
    try:
        pod = TrainingPod(**fields)
    except ValueError as exc:  # pydantic names the field; say where its value came from
        raise ValueError(f"the training pod from ${TRAINING_POD_ENV_PREFIX}*: {exc}") from None
    from dagster_k8s import PipesK8sClient  # imported only here: the kubernetes client is large

    return {"training_pipes_client": PipesK8sClient(), "training_pod": pod}
