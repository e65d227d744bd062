"""The model registry: versions of :data:`REGISTERED_MODEL`, their aliases, and loading a model back.

:func:`register_world_model` turns a logged model (``models:/m-<id>``, from
:func:`~retailsim_pipeline.tracking.serving.log_world_model`) into a new version and points an alias at
it (``challenger``; the evaluation moves ``champion`` with :func:`set_alias`) and lists the version on
the LoggedModel (:func:`link_logged_model`). :func:`record_evaluation` writes on a version what its
evaluation found (test metrics, data, gate, decision) as tags and a description. :func:`load_world_model`
gives back the torch module and vocabulary of a logged or registered model for batched scoring, and
:func:`load_served_model` the module with its serving features (what the pyfunc serves), reading only
the artifacts (the pyfunc wrapper is not unpickled).

Registered URIs are resolved here with an explicit client on our store: MLflow's own resolution of
``models:/<name>@<alias>`` asks the process-global registry (mlflow 3.17).
"""

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from retailsim_pipeline.tracking.runs import (
    NOTE_TAG,
    default_tracking_uri,
    global_tracking_uri,
    interval_text,
    metric_name,
    mlflow_client,
    weeks_text,
)
from retailsim_pipeline.tracking.serving import ServedModel, read_served_model, read_world_model

log = logging.getLogger(__name__)

REGISTERED_MODEL = "retailsim-world-model"
REGISTERED_DESCRIPTION = (
    "RetailSim world model: given what a store system knows about a basket being filled (customer card, "
    "store, date and hour, the products so far), ranks the products most likely to complete it. Input "
    "columns: customer_code (optional), store_code, timestamp (ISO), products, optional quantities, spend, "
    "basket_id; output: top_k product codes, their scores and the count of unknown products; param k. "
    "Each version is trained on one tensor cache; the alias 'champion' marks the version serving, moved "
    "only when a challenger beats it and the strongest simple baseline on the same test positions.\n\n"
    "Each evaluated version says why in its description and tags: its test metrics (test/recall_at_10 …), "
    "the data it was tested on (retailsim.cache_key, retailsim.test_weeks), model − strongest baseline "
    "with its 95 % interval (retailsim.promotion.gate) and the decision (retailsim.promotion.decision). "
    "Tick two versions and Compare to see their training runs' test and gate metrics side by side."
)

#: The LoggedModel tag through which the UI lists a logged model's registered versions (MLflow's
#: ``mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS``: a JSON list of ``{"name", "version"}``).
MODEL_VERSIONS_TAG = "mlflow.modelVersions"


def _replaceable(description: str | None) -> bool:
    """Empty, or a text this project wrote earlier (never one a person wrote in the UI)."""
    text = (description or "").strip()
    return not text or "DESIGN §" in text or text.startswith("RetailSim world model")


def ensure_registered_model(client, name: str = REGISTERED_MODEL) -> None:
    """Create registered model ``name`` with :data:`REGISTERED_DESCRIPTION`, or bring an existing one's
    description up to date when it is empty or an earlier text of ours."""
    try:
        client.create_registered_model(name, description=REGISTERED_DESCRIPTION)
        return
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    current = client.get_registered_model(name).description
    if current != REGISTERED_DESCRIPTION and _replaceable(current):
        client.update_registered_model(name, description=REGISTERED_DESCRIPTION)


def link_logged_model(client, model_id: str, name: str, version: str | int) -> None:
    """Record version ``version`` of ``name`` on LoggedModel ``model_id`` (tag :data:`MODEL_VERSIONS_TAG`).

    ``mlflow.register_model`` and the tracking server's create-model-version handler write this tag; a
    client on a sqlite store creating the version directly does not, and the logged model's page then
    says "Not registered". Idempotent; keeps the versions already listed.
    """
    model = client.get_logged_model(model_id)
    listed = []
    if raw := model.tags.get(MODEL_VERSIONS_TAG):
        try:
            listed = [v for v in json.loads(raw) if isinstance(v, dict)]
        except json.JSONDecodeError:
            listed = []
    if any(v.get("name") == name and str(v.get("version")) == str(version) for v in listed):
        return
    listed.append({"name": name, "version": str(version)})
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(listed)})


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
    ensure_registered_model(client, name)
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
    if model_id:
        link_logged_model(client, model_id, name, created.version)
    if alias:
        client.set_registered_model_alias(name, alias, str(created.version))
    log.info("registered %s version %s (alias %s)", name, created.version, alias)
    return _registered_version(client, name, created.version)


def _registered_version(client, name: str, version: str | int) -> RegisteredVersion:
    mv = client.get_model_version(name, str(version))
    return RegisteredVersion(
        name=name,
        version=str(mv.version),
        run_id=mv.run_id,
        model_id=_model_id(mv),
        source=mv.source,
        aliases=tuple(mv.aliases),
        tags=dict(mv.tags),
    )


def _model_id(mv) -> str | None:
    """The LoggedModel behind a model version (its ``model_id``, or a ``models:/m-<id>`` source)."""
    if mv.model_id:
        return mv.model_id
    return mv.source.removeprefix("models:/") if mv.source.startswith("models:/m-") else None


def record_evaluation(version: str | int, doc: Mapping[str, Any], *, name: str = REGISTERED_MODEL,
                      weeks: Sequence[int] | None = None, tracking_uri: str | None = None) -> RegisteredVersion:
    """What the evaluation ``doc`` (``metrics.json``) found, on registered version ``version`` of ``name``.

    Tags (:func:`evaluation_tags`): the model's main test metrics under the run's metric keys
    (``test/recall_at_10`` …), the data (``retailsim.cache_key``, ``retailsim.<split>_weeks`` from
    ``weeks``, the split's first and last week), the gate (``retailsim.promotion.gate``: model − strongest
    baseline with its 95 % interval) and the decision; the version's description says the same and more
    in sentences (:func:`evaluation_description`), and so does the LoggedModel's description (unless
    someone wrote another). Also lists the version on its LoggedModel
    (:func:`link_logged_model`: versions registered before that was done) and updates the registered
    model's description (:func:`ensure_registered_model`). The metrics themselves are linked to the
    LoggedModel by :func:`~retailsim_pipeline.tracking.runs.log_evaluation` (``model_id``: this
    function's ``.model_id``).
    """
    client = mlflow_client(tracking_uri)
    ensure_registered_model(client, name)
    number = str(version)
    for key, value in evaluation_tags(doc, weeks).items():
        client.set_model_version_tag(name, number, key, value)
    description = evaluation_description(doc, weeks)
    client.update_model_version(name, number, description=description)
    registered = _registered_version(client, name, number)
    if registered.model_id:
        link_logged_model(client, registered.model_id, name, number)
        # The logged model's page shows its description from the same tag as runs and experiments.
        heading = f"Version {number} of {name}."
        current = client.get_logged_model(registered.model_id).tags.get(NOTE_TAG, "")
        if not current.strip() or current.startswith(heading):
            client.set_logged_model_tags(registered.model_id, {NOTE_TAG: f"{heading} {description}"})
    return registered


#: The model's metrics a version carries as tags (all of them are on its LoggedModel and training run).
VERSION_METRICS = ("recall@10", "recall@20", "mrr", "ndcg@10")


def evaluation_tags(doc: Mapping[str, Any], weeks: Sequence[int] | None = None) -> dict[str, str]:
    """Model-version tags of an evaluation, few enough for the registered model's version table: the
    model's :data:`VERSION_METRICS` (4 decimals), the data, the gate and the decision. The rest (every
    metric, the champion it was compared with) is in the description, on the LoggedModel and on the runs."""
    meta, promotion = doc["meta"], doc["promotion"]
    split = meta["split"]
    tags = {f"{split}/{metric_name(k)}": f"{doc['model'][k]:.4f}" for k in VERSION_METRICS}
    tags |= {
        "retailsim.cache_key": str(meta["cache_key"]),
        "retailsim.promotion.decision": promotion["decision"],
        "retailsim.promotion.gate": interval_text(doc),
    }
    if (span := weeks_text(weeks)) is not None:
        tags[f"retailsim.{split}_weeks"] = span
    return tags


def evaluation_description(doc: Mapping[str, Any], weeks: Sequence[int] | None = None) -> str:
    """The version's description (markdown): score, data, gate, decision, in four lines."""
    meta, promotion, model = doc["meta"], doc["promotion"], doc["model"]
    split = meta["split"]
    strongest = doc["baseline_choice"]["strongest"]
    metric = doc["baseline_choice"]["metric"]
    span = weeks_text(weeks)
    data = f"tensor cache `{meta['cache_key']}`" + (f", {split} weeks {span}" if span else "")
    gate = "passes" if promotion["passed_baseline_check"] else "fails"
    lines = [
        f"Evaluation of {meta['created'][:16].replace('T', ' ')} → **{promotion['decision']}**: "
        f"{promotion['reason']}.",
        f"- {split.capitalize()}: recall@10 {model['recall@10']:.4f}, recall@20 {model['recall@20']:.4f}, "
        f"MRR {model['mrr']:.4f}, NDCG@10 {model['ndcg@10']:.4f} on {meta['n_positions']:,} masked positions "
        f"({meta['n_baskets']:,} baskets) of {data}.",
        f"- Gate ({gate}): {interval_text(doc)} (paired bootstrap over baskets; {strongest} is the strongest "
        f"baseline on validation, {metric} {doc['baselines'][strongest][metric]:.4f} on {split}).",
    ]
    if promotion["champion_version"] is not None:
        champion = (f"{promotion['metric']} {promotion['champion']:.4f} on the same positions"
                    if promotion["champion"] is not None else "could not be re-scored")
        lines.append(f"- Champion at the time: version {promotion['champion_version']}, {champion}.")
    return "\n".join(lines)


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


def _read_artifacts(model_uri: str, tracking_uri: str | None, read):
    """``read(local artifacts folder)`` on a logged or registered model's ``artifacts/``, downloaded to a
    temporary folder (removed afterwards) from the explicit store."""
    tracking_uri = tracking_uri or default_tracking_uri()
    location = model_artifact_location(model_uri, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="world_model_") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/artifacts", dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        return read(local)


def load_world_model(model_uri: str, *, tracking_uri: str | None = None, device: str = "cpu"):
    """``(torch module in eval mode, vocabulary)`` from a logged or registered model, for batched scoring.

    ``model_uri``: ``models:/m-<id>``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``, or any
    artifact URI/path of a logged model folder. Only the three artifacts are downloaded and read; the
    pyfunc wrapper is not unpickled.

    Registered URIs are resolved here with an explicit client: MLflow's own ``models:/<name>@<alias>``
    resolution asks the process-global registry and ignores the ``tracking_uri``/``registry_uri``
    passed to ``download_artifacts`` (mlflow 3.17, ``ModelsArtifactRepository._get_model_uri_infos``).
    """
    return _read_artifacts(model_uri, tracking_uri, lambda local: read_world_model(local, device=device))


def load_served_model(model_uri: str, *, tracking_uri: str | None = None, device: str = "cpu") -> ServedModel:
    """:class:`~retailsim_pipeline.tracking.serving.ServedModel` (module, vocabulary, serving features) of a
    logged or registered model: what its pyfunc serves, without unpickling the wrapper. URIs as
    :func:`load_world_model`."""
    return _read_artifacts(model_uri, tracking_uri, lambda local: read_served_model(local, device=device))


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
