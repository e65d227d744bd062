"""Launchpad config: the plain config classes of ``retailsim_pipeline.config``, made Dagster ``Config``.

Each class adds nothing: the fields, defaults and validation live once, in ``config.py``.
"""

import dagster as dg

from retailsim_pipeline.config import CacheConfig, IngestConfig, SplitConfig


class IngestSettings(IngestConfig, dg.Config):
    """Validation of the weekly files (``raw_transactions``)."""


class SplitSettings(SplitConfig, dg.Config):
    """Temporal split and truncation of the basket samples (``basket_samples``)."""


class CacheSettings(CacheConfig, dg.Config):
    """Dimensions and fitting of the tensor cache (``tensor_cache``)."""
