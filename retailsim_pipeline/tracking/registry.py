"""The model registry: versions of :data:`REGISTERED_MODEL`, their aliases, and loading a model back.

:func:`register_world_model` turns a logged model (``models:/m-<id>``, from
:func:`~retailsim_pipeline.tracking.serving.log_world_model`) into a new version and points an alias at
it (``challenger``; the evaluation moves ``champion`` with :func:`set_alias`). :func:`load_world_model`
gives back the torch module and vocabulary of a logged or registered model for batched scoring, and
:func:`load_served_model` the module with its serving features (what the pyfunc serves), reading only
the artifacts (the pyfunc wrapper is not unpickled).

Registered URIs are resolved here with an explicit client on our store: MLflow's own resolution of
``models:/<name>@<alias>`` asks the process-global registry (mlflow 3.17).
"""

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from retailsim_pipeline.tracking.runs import default_tracking_uri, global_tracking_uri, mlflow_client
from retailsim_pipeline.tracking.serving import ServedModel, read_served_model, read_world_model

log = logging.getLogger(__name__)

REGISTERED_MODEL = "retailsim-world-model"
REGISTERED_DESCRIPTION = (
    "RetailSim world model: given what a store system knows about a basket being filled (customer card, "
    "store, date and hour, the products so far), ranks the products most likely to complete it. Input "
    "columns: customer_code (optional), store_code, timestamp (ISO), products, optional quantities, spend, "
    "basket_id; output: top_k product codes, their scores and the count of unknown products; param k. "
    "Each version is trained on one tensor cache; the alias 'champion' marks the version serving, moved "
    "only when a challenger beats it and the strongest simple baseline on the same test positions."
)


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model (MLflow's ``ModelVersion.version`` is an int on some stores)."""

    name: str
    version: str
    run_id: str | None
    model_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``."""
        return registered_model_uri(self.version, self.name)


def register_world_model(
    model_uri: str,
    *,
    name: str = REGISTERED_MODEL,
    alias: str | None = "challenger",
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> RegisteredVersion:
    """Register ``model_uri`` (``models:/m-<id>``) as a new version of ``name``, point ``alias`` at it, tag it.

    The registered model is created on first use. Setting the alias moves it from whichever version held
    it (an alias names one version at a time). The version records the LoggedModel's source run.
    """
    client = mlflow_client(tracking_uri)
    try:
        client.create_registered_model(
            name, description=REGISTERED_DESCRIPTION
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    run_id = client.get_logged_model(model_id).source_run_id if model_id else None
    # mlflow 3.17's sqlite registry looks the LoggedModel up through a *default* MlflowClient (the
    # process-global tracking URI), not through this client: point the global URI at our store.
    with global_tracking_uri(client.tracking_uri):
        created = client.create_model_version(
            name,
            source=model_uri,
            run_id=run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
            model_id=model_id,
        )
    if alias:
        client.set_registered_model_alias(name, alias, str(created.version))
    log.info("registered %s version %s (alias %s)", name, created.version, alias)
    mv = client.get_model_version(name, str(created.version))
    return RegisteredVersion(
        name=name,
        version=str(mv.version),
        run_id=mv.run_id,
        model_id=model_id,
        source=mv.source,
        aliases=tuple(mv.aliases),
        tags=dict(mv.tags),
    )


def registered_model_uri(version: str | int, name: str = REGISTERED_MODEL) -> str:
    return f"models:/{name}/{version}"


def get_alias_version(alias: str, name: str = REGISTERED_MODEL, tracking_uri: str | None = None) -> str | None:
    """The version number ``alias`` points at, or None when the alias (or the registered model) is absent."""
    try:
        return str(mlflow_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def set_alias(version: str | int, alias: str, name: str = REGISTERED_MODEL, tracking_uri: str | None = None) -> None:
    """Point ``alias`` (``champion``/``challenger``) at ``version``; an alias names one version at a time."""
    mlflow_client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def load_world_model(model_uri: str, *, tracking_uri: str | None = None, device: str = "cpu"):
    """``(torch module in eval mode, vocabulary)`` from a logged or registered model, for batched scoring.

    ``model_uri``: ``models:/m-<id>``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``, or any
    artifact URI/path of a logged model folder. Only the three artifacts are downloaded and read; the
    pyfunc wrapper is not unpickled.

    Registered URIs are resolved here with an explicit client: MLflow's own ``models:/<name>@<alias>``
    resolution asks the process-global registry and ignores the ``tracking_uri``/``registry_uri``
    passed to ``download_artifacts`` (mlflow 3.17, ``ModelsArtifactRepository._get_model_uri_infos``).
    """
    tracking_uri = tracking_uri or default_tracking_uri()
    location = model_artifact_location(model_uri, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="world_model_") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/artifacts", dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        return read_world_model(local, device=device)


def load_served_model(model_uri: str, *, tracking_uri: str | None = None, device: str = "cpu") -> ServedModel:
    """:class:`~retailsim_pipeline.tracking.serving.ServedModel` (module, vocabulary, serving features) of a
    logged or registered model: what its pyfunc serves, without unpickling the wrapper. URIs as
    :func:`load_world_model`."""
    tracking_uri = tracking_uri or default_tracking_uri()
    location = model_artifact_location(model_uri, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="world_model_") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/artifacts", dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        return read_served_model(local, device=device)


def load_champion(version: str, *, tracking_uri: str | None = None, device: str = "cpu"):
    """``(ServedModel, None)`` for registered ``version``, or ``(None, why)`` when it cannot be re-scored:
    its weights do not fit this code's :class:`~retailsim_pipeline.model.world_model.WorldModel` (a model
    trained for an older feature layout: its state dict misses or mis-sizes parameters), or it was logged
    without serving features. The champion is re-scored through its own vocabulary and features
    (:func:`~retailsim_pipeline.evaluation.evaluate.rescore_model`); when it cannot be, the caller
    compares the challenger with the baselines alone."""
    try:
        served = load_served_model(registered_model_uri(version), tracking_uri=tracking_uri, device=device)
    except RuntimeError as err:  # load_state_dict(strict=True): missing/unexpected keys, size mismatch
        first = " ".join(str(err).split())[:300]
        log.warning("champion v%s cannot be scored by this version of the model code: %s", version, first)
        return None, f"champion v{version} was trained for another model layout and cannot be re-scored ({first})"
    if served.features is None:
        why = f"champion v{version} was logged without serving features and cannot be re-scored"
        log.warning(why)
        return None, why
    return served, None


def model_artifact_location(model_uri: str, *, tracking_uri: str | None = None) -> str:
    """Where a model's files are: a ``models:/…`` URI resolved to its LoggedModel's artifact location."""
    if not model_uri.startswith("models:/"):
        return model_uri
    client = mlflow_client(tracking_uri)
    ref = model_uri.removeprefix("models:/").strip("/")
    if ref.startswith("m-") and "/" not in ref:
        model_id = ref
    else:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise ValueError(
                f"{model_uri}: expected models:/m-<id>, models:/<name>@<alias> or models:/<name>/<version>"
            )
        model_id = version.model_id or version.source.removeprefix("models:/")
    return client.get_logged_model(model_id).artifact_location
