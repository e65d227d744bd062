"""MLflow tracking and the model registry: the only package in the project that imports mlflow.

- :mod:`~retailsim_pipeline.tracking.runs`: the store (tracking URI, client), the experiment, one run
  per training with its metrics (:class:`MlflowLogger`), system metrics, orphaned runs, and the
  evaluation's record on the training run and its child runs, one per scorer.
- :mod:`~retailsim_pipeline.tracking.serving`: the world model as an MLflow pyfunc (its contract:
  artifacts, input, output), logged by :func:`log_world_model`.
- :mod:`~retailsim_pipeline.tracking.registry`: registered versions, aliases, the evaluation's record on
  a version (tags, description), loading a model back.

Callers use the names re-exported here (``tracking.register_world_model(...)``).
:class:`WorldModelPyfunc` stays importable from here as well: models logged before this package was
split pickled it as ``retailsim_pipeline.tracking.WorldModelPyfunc``.
"""

from retailsim_pipeline.tracking.registry import (
    MODEL_VERSIONS_TAG,
    REGISTERED_DESCRIPTION,
    REGISTERED_MODEL,
    RegisteredVersion,
    ensure_registered_model,
    evaluation_description,
    evaluation_tags,
    get_alias_version,
    link_logged_model,
    load_champion,
    load_served_model,
    load_world_model,
    model_artifact_location,
    record_evaluation,
    register_world_model,
    registered_model_uri,
    set_alias,
)
from retailsim_pipeline.tracking.runs import (
    EXPERIMENT,
    EXPERIMENT_DESCRIPTION,
    HOST_TAG,
    NOTE_TAG,
    PARENT_RUN_TAG,
    PID_TAG,
    SCORER_ORDER,
    SCORER_TAG,
    MetricsLogger,
    MlflowLogger,
    close_orphaned_runs,
    default_tracking_uri,
    flatten_params,
    gate_metrics,
    get_or_create_experiment,
    global_tracking_uri,
    interval_text,
    log_evaluation,
    metric_history,
    metric_name,
    mlflow_client,
    scorer_metrics,
    weeks_text,
)
from retailsim_pipeline.tracking.serving import (
    DEFAULT_TOP_K,
    RequestError,
    ServedModel,
    WorldModelPyfunc,
    log_world_model,
    rank_requests,
    read_served_model,
    read_world_model,
)

__all__ = [
    "DEFAULT_TOP_K",
    "EXPERIMENT",
    "EXPERIMENT_DESCRIPTION",
    "HOST_TAG",
    "MODEL_VERSIONS_TAG",
    "NOTE_TAG",
    "PARENT_RUN_TAG",
    "PID_TAG",
    "REGISTERED_DESCRIPTION",
    "REGISTERED_MODEL",
    "SCORER_ORDER",
    "SCORER_TAG",
    "MetricsLogger",
    "MlflowLogger",
    "RegisteredVersion",
    "RequestError",
    "ServedModel",
    "WorldModelPyfunc",
    "close_orphaned_runs",
    "default_tracking_uri",
    "ensure_registered_model",
    "evaluation_description",
    "evaluation_tags",
    "flatten_params",
    "gate_metrics",
    "get_alias_version",
    "get_or_create_experiment",
    "global_tracking_uri",
    "interval_text",
    "link_logged_model",
    "load_champion",
    "load_served_model",
    "load_world_model",
    "log_evaluation",
    "log_world_model",
    "metric_history",
    "metric_name",
    "mlflow_client",
    "model_artifact_location",
    "rank_requests",
    "read_served_model",
    "read_world_model",
    "record_evaluation",
    "register_world_model",
    "registered_model_uri",
    "scorer_metrics",
    "set_alias",
    "weeks_text",
]
