"""The world model's torch code: the Mamba block and its selective scan (torch only; no polars, dagster, mlflow)."""

from retailsim_pipeline.model.mamba import Mamba, selective_scan, selective_scan_ref

__all__ = ["Mamba", "selective_scan", "selective_scan_ref"]
