"""The one home of settings: paths, generator presets, ingest, split and cache configuration.

Every default lives here, with the reason for it. The Dagster layer (``defs/``) exposes the same
classes to the launchpad through thin ``dagster.Config`` subclasses, so there is one source of truth.
Paths are kept as ``str`` (Dagster config accepts str, not Path).
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

DATA_DIR_ENV = "RETAILSIM_DATA_DIR"


def data_root() -> Path:
    """The data root: ``$RETAILSIM_DATA_DIR``, default ``./data`` (relative to the working directory)."""
    return Path(os.environ.get(DATA_DIR_ENV, "data")).resolve()


@dataclass(frozen=True)
class DataPaths:
    """Where each stage reads and writes, under one data root.

    ``raw/`` holds the weekly LGSR CSV files (generated or real); ``ground_truth/`` the generator's
    sidecar (never read by features); every other folder is the output of one asset.
    """

    root: Path

    @classmethod
    def from_env(cls) -> "DataPaths":
        return cls(data_root())

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def ground_truth(self) -> Path:
        return self.root / "ground_truth"

    @property
    def transactions(self) -> Path:
        """Typed, validated parquet per week (``raw_transactions``)."""
        return self.root / "transactions"

    @property
    def quarantine(self) -> Path:
        """Rejected rows per week with file, line and reason."""
        return self.root / "quarantine"

    @property
    def samples(self) -> Path:
        """One parquet per split (``basket_samples``)."""
        return self.root / "samples"

    @property
    def cache(self) -> Path:
        """Content-addressed tensor cache folders (``tensor_cache``)."""
        return self.root / "cache"

    @property
    def dagster(self) -> Path:
        return self.root / "dagster"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


class GeneratorConfig(BaseModel):
    """Size and shape of a generated LGSR-format dataset. See ``prep/generator.py`` for the model."""

    preset: str = "custom"
    seed: int = Field(0, description="Everything generated is a pure function of (config, seed).")
    n_weeks: int = Field(12, ge=1, le=520, description="Weekly files from 200607 on.")
    n_products: int = Field(200, ge=20, description="Distinct PROD_CODEs.")
    n_stores: int = Field(6, ge=1, description="Distinct STORE_CODEs.")
    n_customers: int = Field(400, ge=1, description="Loyalty customers over the whole period.")
    baskets_per_week: int = Field(170, ge=1, description="Mean baskets per week before trend/season.")
    anonymous_share: float = Field(
        0.25, ge=0.0, le=1.0, description="Share of baskets without a loyalty card (LGSR: about a quarter)."
    )
    xx_share: float = Field(
        0.02, ge=0.0, le=0.5, description="Share of customer segments and basket labels recorded as XX."
    )
    arriving_customer_share: float = Field(
        0.45,
        ge=0.0,
        le=1.0,
        description="Customers who join after the first week (uniformly over time): the test weeks' cold starts.",
    )
    leaving_customer_share: float = Field(
        0.15, ge=0.0, le=1.0, description="Customers who stop shopping at a random week after they join."
    )
    promo_share: float = Field(
        0.05, ge=0.0, le=1.0, description="Share of products on promotion (15-40 % off) in a given week."
    )


GENERATOR_PRESETS: dict[str, GeneratorConfig] = {
    # ~20k rows: the test suite's data; every structure present, seconds to generate.
    "tiny": GeneratorConfig(
        preset="tiny", n_weeks=12, n_products=200, n_stores=6, n_customers=400, baskets_per_week=170
    ),
    # ~1.5M rows: `make demo`; small enough that the whole demo (model included) fits ~10 min on 2 cores.
    "demo": GeneratorConfig(
        preset="demo", n_weeks=40, n_products=1000, n_stores=40, n_customers=10_000, baskets_per_week=3_700
    ),
    # The real dataset's order of magnitude: 117 weeks, ~5,000 products, ~760 stores, ~500k customers,
    # ~300M rows. Streamed week by week with bounded memory.
    "full": GeneratorConfig(
        preset="full",
        n_weeks=117,
        n_products=5000,
        n_stores=760,
        n_customers=500_000,
        baskets_per_week=250_000,
    ),
}

GeneratorPresetName = Literal["tiny", "demo", "full"]


def generator_preset(name: str, seed: int | None = None) -> GeneratorConfig:
    if name not in GENERATOR_PRESETS:
        raise ValueError(f"unknown generator preset {name!r}; choose one of {sorted(GENERATOR_PRESETS)}")
    cfg = GENERATOR_PRESETS[name]
    return cfg if seed is None else cfg.model_copy(update={"seed": seed})


# --------------------------------------------------------------------------------------------
# Ingest, samples, cache
# --------------------------------------------------------------------------------------------


class IngestConfig(BaseModel):
    """Validation of one weekly file."""

    max_quarantine_rate: float = Field(
        0.01, ge=0.0, le=1.0, description="Asset check: share of rows quarantined above which it fails."
    )


class SplitConfig(BaseModel):
    """Temporal split by SHOP_WEEK: train < validation < test, no basket in two splits.

    By default the last ~10 % of weeks are test and the ~10 % before them validation. Explicit
    first weeks (``validation_start_week``/``test_start_week``, codes like 200801) override the fractions.
    """

    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    validation_start_week: int | None = None
    test_start_week: int | None = None
    max_basket_len: int = Field(50, ge=1, description="Products kept per basket (seed: 50).")

    @model_validator(mode="after")
    def _ordered(self) -> "SplitConfig":
        v, t = self.validation_start_week, self.test_start_week
        if (v is None) != (t is None):
            raise ValueError("set both validation_start_week and test_start_week, or neither")
        if v is not None and t is not None and not v < t:
            raise ValueError(f"validation_start_week {v} must come before test_start_week {t}")
        return self


class CacheConfig(BaseModel):
    """Dimensions and fitting choices of the tensor cache (DESIGN §4; dims from the seeds)."""

    product_dim: int = Field(256, description="Seed: product embeddings [V, 256].")
    hierarchy_dim_per_level: int = Field(
        16, description="Part of the product embedding that encodes each of the 4 hierarchy levels."
    )
    customer_history_dim: int = Field(160, description="Seed: customer context = history 160 + profile 32.")
    customer_profile_dim: int = 32
    store_dim: int = Field(96, description="Seed: store context 96.")
    temporal_dim: int = Field(64, description="Seed: temporal context 64.")
    trip_dim: int = Field(48, description="Seed: trip context 48.")
    price_dim: int = Field(64, description="Seed: price features 64 per line, computed on the fly.")
    ppmi_smoothing: float = Field(
        0.75, description="Context-distribution smoothing of PPMI (Levy et al. 2015): tames rare products."
    )
    seed: int = Field(0, description="Seed of the randomized SVD and the hierarchy codes.")

    @property
    def cooccurrence_dim(self) -> int:
        return self.product_dim - 4 * self.hierarchy_dim_per_level


def config_hash(*models: BaseModel) -> str:
    """Stable short hash of one or more config models (part of the cache's content address)."""
    payload = json.dumps([m.model_dump(mode="json") for m in models], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
