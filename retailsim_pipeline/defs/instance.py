"""The Dagster instance's storage, placed in the project's data folder with no variable to set.

``dagster.yaml`` names these classes, so every way of starting Dagster finds the same instance:
``retailsim run`` / ``retailsim ui`` / ``make ui``, and also ``dagster dev`` or ``dagster-webserver -w
workspace.yaml`` started in the project root with nothing exported (``dagster dev`` then keeps only its
throw-away ``.tmp_dagster_home_*`` folder in the root; runs, schedules, sensors and logs live here).

Where the state goes, first match wins:

1. ``base_dir`` in ``dagster.yaml`` (none there: the project leaves it to 2–3);
2. ``$RETAILSIM_DAGSTER_DIR`` (compute logs: ``$RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR``);
3. ``<data root>/dagster`` (compute logs: ``<data root>/dagster/compute_logs``), where the data root is
   ``$RETAILSIM_DATA_DIR``, default ``./data`` — the folder ``retailsim run`` writes.

When ``$RETAILSIM_DATA_DIR`` is unset, the data root resolved here is pinned in this process's environment
as an absolute path, so the code servers, run workers and daemon it starts use the same folder whatever
their working directory.
"""

import os
from pathlib import Path

import dagster as dg
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
from dagster._core.storage.root import LocalArtifactStorage
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage

from retailsim_pipeline.config import DATA_DIR_ENV, data_root

__all__ = ["ProjectArtifactStorage", "ProjectComputeLogManager", "ProjectSqliteStorage", "state_dirs"]

STATE_ENV = "RETAILSIM_DAGSTER_DIR"
COMPUTE_LOGS_ENV = "RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR"

_OPTIONAL_DIR = {"base_dir": dg.Field(dg.StringSource, is_required=False)}


def state_dirs() -> tuple[Path, Path]:
    """(instance state folder, compute log folder), resolved as above."""
    os.environ.setdefault(DATA_DIR_ENV, str(data_root()))
    state = Path(os.environ.get(STATE_ENV) or data_root() / "dagster").resolve()
    logs = Path(os.environ.get(COMPUTE_LOGS_ENV) or state / "compute_logs").resolve()
    return state, logs


class ProjectSqliteStorage(DagsterSqliteStorage):
    """Dagster's sqlite storage (runs, event logs, schedules) under the project's state folder."""

    @classmethod
    def config_type(cls):
        return dict(_OPTIONAL_DIR)

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls.from_local(base_dir=config_value.get("base_dir") or str(state_dirs()[0]), inst_data=inst_data)


class ProjectArtifactStorage(LocalArtifactStorage):
    """Dagster's local artifact storage under the project's state folder."""

    @classmethod
    def config_type(cls):
        return dict(_OPTIONAL_DIR)

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(base_dir=config_value.get("base_dir") or str(state_dirs()[0]), inst_data=inst_data)


class ProjectComputeLogManager(LocalComputeLogManager):
    """Captured stdout/stderr of each step under the project's compute log folder."""

    @classmethod
    def config_type(cls):
        return {**_OPTIONAL_DIR, "polling_timeout": dg.Field(dg.Float, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        config = dict(config_value)
        config["base_dir"] = config.get("base_dir") or str(state_dirs()[1])
        return cls(inst_data=inst_data, **config)
