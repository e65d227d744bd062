"""Launchpad config: the plain config classes of ``retailsim_pipeline.config``, made Dagster ``Config``.

The fields, defaults and validation live once, in ``config.py``; a class here adds only what concerns
the Dagster run itself (e.g. a progress bar).
"""

import dagster as dg
from pydantic import Field

from retailsim_pipeline.config import CacheConfig, IngestConfig, LaunchConfig, SplitConfig


class IngestSettings(IngestConfig, dg.Config):
    """Validation of the weekly files (``raw_transactions``)."""

    progress: bool = Field(False, description="A progress bar over the run's weeks on the terminal "
                                             "(`retailsim run` turns it on).")


class SplitSettings(SplitConfig, dg.Config):
    """Temporal split and truncation of the basket samples (``basket_samples``)."""


class CacheSettings(CacheConfig, dg.Config):
    """Dimensions and fitting of the tensor cache (``tensor_cache``)."""


class LaunchSettings(LaunchConfig, dg.Config):
    """Where the training's ranks run: this machine, or several meeting at a torchrun rendezvous."""
