"""The world model's torch code: the Mamba block and its selective scan, the world model, its losses
(torch only; no polars, dagster, mlflow)."""

from retailsim_pipeline.model.losses import WorldModelLoss, aux_losses, focal_loss, info_nce
from retailsim_pipeline.model.mamba import Mamba, selective_scan, selective_scan_ref
from retailsim_pipeline.model.world_model import (
    WorldModel,
    count_parameters,
    no_decay_parameter_names,
)

__all__ = [
    "Mamba",
    "WorldModel",
    "WorldModelLoss",
    "aux_losses",
    "count_parameters",
    "focal_loss",
    "info_nce",
    "no_decay_parameter_names",
    "selective_scan",
    "selective_scan_ref",
]
