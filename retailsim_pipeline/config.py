"""The one home of settings: paths, generator presets, ingest, split and cache configuration.

Every default lives here, with the reason for it. The Dagster layer (``defs/``) exposes the same
classes to the launchpad through thin ``dagster.Config`` subclasses, so there is one source of truth.
Paths are kept as ``str`` (Dagster config accepts str, not Path).
"""

import hashlib
import json
import os
import re
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
    """Validation of the weekly files."""

    max_quarantine_rate: float = Field(
        0.01, ge=0.0, le=1.0, description="Asset check: share of rows quarantined above which it fails."
    )
    # Ceilings that catch absurd but parseable values (1e308, an overflowed counter) before they reach
    # the cache's price ratios. The 94 published LGSR weeks peak at QUANTITY 1,685 (one bulk line) and
    # SPEND/QUANTITY £219.15: the ceilings sit well above anything real.
    max_quantity: int = Field(10_000, ge=1, description="Rows with a larger QUANTITY are quarantined.")
    max_unit_spend: float = Field(
        10_000.0, gt=0.0, description="Rows whose SPEND / QUANTITY (pounds per unit) exceeds this are quarantined."
    )
    # A published week is ~4 MB of CSV: 64 MB validates ~16 weeks per query (the per-query cost paid once
    # for them, not 16 times) and bounds the batch's frames to a few hundred MB.
    batch_mb: float = Field(
        64.0, gt=0.0, description="Weekly files are validated together in batches of up to this many MB of CSV (a "
                              "gzip file counts uncompressed); a larger file is ingested alone."
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


#: Widths fixed by the feature definitions in ``prep/features.py`` (each column is a named feature:
#: temporal = harmonics, one-hots and trend; trip = past label mix, recency, cold-start bucket, card,
#: store, daypart). A different width needs a different definition, not a setting, so
#: :class:`CacheConfig` accepts only these values for ``temporal_dim`` and ``trip_dim``.
TEMPORAL_WIDTH = 64
TRIP_WIDTH = 48


#: Default decay per basket of the memory's decayed share (prep/history.py). Chosen on the real data's
#: *validation* split: the decayed share alone (TIFU-KNN's personal vector) scores Recall@10 0.2335 at
#: decay 1.0, 0.2637 at 0.97 and 0.2578 at 0.9 (README, "Point-in-time memory").
MEMORY_DECAY = 0.97


class CacheConfig(BaseModel):
    """Dimensions and fitting choices of the tensor cache (DESIGN §4; dims from the seeds)."""

    product_dim: int = Field(256, description="Seed: product embeddings [V, 256].")
    hierarchy_dim_per_level: int = Field(
        16, description="Part of the product embedding that encodes each of the 4 hierarchy levels."
    )
    customer_history_dim: int = Field(160, description="Seed: customer context = history 160 + profile 32; the "
                                                       "history is the point-in-time memory's mean embedding.")
    customer_profile_dim: int = 32
    store_dim: int = Field(96, description="Seed: store context 96.")
    temporal_dim: int = Field(TEMPORAL_WIDTH, description="Seed: temporal context 64 (fixed by its definition).")
    trip_dim: int = Field(TRIP_WIDTH, description="Seed: trip context 48 (fixed by its definition).")
    price_dim: int = Field(64, ge=4, description="Seed: price features 64 per line, computed on the fly; a "
                                                  "multiple of 4 (sin and cos of ratio and price).")
    ppmi_smoothing: float = Field(
        0.75, description="Context-distribution smoothing of PPMI (Levy et al. 2015): tames rare products."
    )
    seed: int = Field(0, description="Seed of the randomized SVD and the hierarchy codes.")
    history_items: int = Field(32, ge=1, description="Slots of the point-in-time memory: the customer's most "
                                                    "bought products before each basket (justified on the "
                                                    "real data in the README).")
    memory_decay: float = Field(MEMORY_DECAY, gt=0.0, le=1.0,
                                description="Decay per basket of the memory's decayed share (prep/history.py: "
                                            "chosen on the real data's validation split).")

    cooccurrence_neighbours: int = Field(100, ge=1, description="Most co-occurring products kept per product (the "
                                                              "model's co-occurrence path; justified on the real "
                                                              "data in the README).")

    @model_validator(mode="after")
    def _widths(self) -> "CacheConfig":
        for name, fixed in (("temporal_dim", TEMPORAL_WIDTH), ("trip_dim", TRIP_WIDTH)):
            if getattr(self, name) != fixed:
                raise ValueError(f"{name} = {getattr(self, name)}: the {name[:-4]} features have exactly {fixed} "
                                 f"columns, fixed by their definition in prep/features.py; leave it at {fixed}")
        if self.customer_history_dim > self.product_dim:
            raise ValueError(f"customer_history_dim = {self.customer_history_dim}: the history vector is the mean of "
                             f"the first customer_history_dim columns of the product embeddings, which has only "
                             f"product_dim = {self.product_dim}")
        if self.price_dim % 4:
            raise ValueError(f"price_dim = {self.price_dim}: must be a multiple of 4 (sin and cos of the price "
                             "ratio and of the product's price, each at price_dim / 4 frequencies)")
        return self

    @property
    def cooccurrence_dim(self) -> int:
        return self.product_dim - 4 * self.hierarchy_dim_per_level

    @property
    def customer_dim(self) -> int:
        """Width of a sample's customer vector: history (the memory's mean embedding) + profile."""
        return self.customer_history_dim + self.customer_profile_dim

    @property
    def context_dim(self) -> int:
        """Width of a sample's context vector: customer | temporal | store | trip."""
        return self.customer_dim + self.temporal_dim + self.store_dim + self.trip_dim


def config_hash(*models: BaseModel) -> str:
    """Stable short hash of one or more config models (part of the cache's content address)."""
    payload = json.dumps([m.model_dump(mode="json") for m in models], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Model and training (DESIGN §5–6; seeds 000–004)
# --------------------------------------------------------------------------------------------

#: The vocabulary's reserved token ids, written once: the cache builds its vocabulary with them first
#: (``<PAD>``, ``<MASK>``, ``<UNK>``), the model masks them out of rankings, serving maps unknown codes to
#: UNK. Not a setting but the contract the polars side and the torch side share without importing each other.
PAD, MASK, UNK = 0, 1, 2
SPECIAL_CODES: tuple[str, ...] = ("<PAD>", "<MASK>", "<UNK>")
N_SPECIAL = len(SPECIAL_CODES)

#: Basket-length buckets, one ladder for every report: bucket i holds lengths in [edges[i], edges[i+1]), the
#: last is open. Roughly doubling widths, so each bucket of real LGSR baskets (mean 6.4 lines) stays populous.
BASKET_LENGTH_EDGES: tuple[int, ...] = (1, 2, 5, 10, 20, 30, 50, 100)
#: The evaluation's length buckets: the same ladder from 2 (a scored basket needs one product hidden and one
#: visible) to 20, the longer baskets pooled up to the model's ``max_basket_len`` (few positions each above 20).
EVALUATION_LENGTH_EDGES: tuple[int, ...] = (2, 5, 10, 20)
#: Batch assembly's bucket upper bounds (inclusive): batches hold baskets of one bucket so padding stays small;
#: the last bound must reach the longest truncated basket (the seed's ``max_basket_len`` 50).
BATCH_LENGTH_BOUNDS: tuple[int, ...] = (10, 20, 30, 50)


def length_bucket_labels(edges: tuple[int, ...], top: int | None = None) -> list[str]:
    """Labels of the buckets of ``edges``: ``"1"``, ``"2-4"``, …, the last ``"20-50"`` when the lengths stop at
    ``top``, else ``"100+"``. A length ``n`` falls in bucket ``searchsorted(edges, n, "right") - 1``."""
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])]
    return [*labels, f"{edges[-1]}-{top}" if top is not None else f"{edges[-1]}+"]


#: Classes of the four auxiliary heads, in the order of the cache's ``labels`` columns. Each is the
#: data contract's code set (XX included); basket_size has no XX in the contract, so it gets an
#: explicit unknown class (DESIGN §5: "plus an unknown class").
AUX_HEADS: tuple[str, ...] = ("basket_size", "price_sensitivity", "mission_type", "mission_focus")
AUX_CLASSES: dict[str, int] = {"basket_size": 4, "price_sensitivity": 4, "mission_type": 4, "mission_focus": 5}


class ModelConfig(BaseModel):
    """Shape of the world model (seed 000: ``WorldModelConfig``). Presets in :data:`MODEL_PRESETS`."""

    d_model: int = Field(512, description="Seed: 512.")
    n_products: int = Field(5003, description="Vocabulary size V incl. PAD/MASK/UNK; set from the cache.")
    mamba_num_layers: int = Field(4, description="Seed: 4 Mamba encoder layers.")
    decoder_num_layers: int = Field(2, description="Seed: 2 Transformer decoder layers.")
    max_basket_len: int = Field(50, description="Seed: baskets truncated to 50 products.")
    n_heads: int = Field(8, description="Attention heads of the decoder (d_model / 64).")
    ffn_mult: int = Field(4, description="Decoder feed-forward width = ffn_mult × d_model.")
    d_state: int = Field(16, description="Mamba SSM state size (mamba_ssm default).")
    d_conv: int = Field(4, description="Mamba causal conv width (mamba_ssm default).")
    expand: int = Field(2, description="Mamba inner width = expand × d_model (mamba_ssm default).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    product_dim: int = Field(256, description="Product embedding width from the cache.")
    price_dim: int = Field(64, description="Price features per line.")
    context_dim: int = Field(400, description="customer 192 + temporal 64 + store 96 + trip 48.")
    cooccurrence_neighbours: int = Field(100, description="Neighbours per product of the co-occurrence path; set "
                                                          "from the cache.")
    history_slot_hidden: int = Field(64, ge=0, description="Hidden width of the copy path's per-slot scorer (an MLP "
                                                           "over each memory slot's count, share, re-buy rate, "
                                                           "co-occurrence with the visible products and the "
                                                           "basket's context); 0 turns it off.")


MODEL_PRESETS: dict[str, ModelConfig] = {
    # The seed's model: ≈ 23M parameters with the full vocabulary.
    "seed": ModelConfig(),
    # Trains on a 2-core CPU in minutes on the demo data.
    "demo": ModelConfig(d_model=128, mamba_num_layers=2, decoder_num_layers=1, n_heads=4, ffn_mult=2),
    # Unit tests: a few thousand parameters' worth of work per step.
    "tiny": ModelConfig(d_model=32, mamba_num_layers=1, decoder_num_layers=1, n_heads=2, ffn_mult=2, d_state=8,
                        dropout=0.0),
}


class LossWeights(BaseModel):
    """Weights of the loss parts in the main and fine-tune phases (seed 001).

    The seed's weights (focal 0.60, contrastive 0.20, basket_size 0.08, price_sensitivity 0.08,
    mission_type 0.04) sum to 1.0 and leave mission_focus out, so its head would never learn: it
    gets 0.04 here by default (DESIGN §6).
    """

    focal: float = 0.60
    contrastive: float = 0.20
    basket_size: float = 0.08
    price_sensitivity: float = 0.08
    mission_type: float = 0.04
    mission_focus: float = 0.04


class TrainingConfig(BaseModel):
    """The training recipe (DESIGN §6). Phase boundaries scale with ``epochs``."""

    preset: str = "demo"
    model: ModelConfig = Field(default_factory=lambda: MODEL_PRESETS["demo"])
    epochs: int = Field(20, ge=1, description="Seed: 20.")
    warmup_fraction: float = Field(0.15, ge=0.0, lt=1.0,
                                   description="Share of steps in warm-up (seed: epochs 1–3 of 20), focal only.")
    finetune_fraction: float = Field(0.25, ge=0.0, lt=1.0,
                                     description="Share of steps in fine-tune (seed: epochs 16–20 of 20).")
    lr_warmup: float = Field(1e-5, description="Seed 001: warm-up phase LR.")
    lr_main: float = Field(5e-5, description="Seed 001: main phase LR.")
    lr_finetune: float = Field(1e-5, description="Seed 001: fine-tune phase LR.")
    lr_ramp_steps: int = Field(500, ge=0, description="Linear ramp from 0 at the very start (seed 002).")
    mask_prob: float = Field(0.15, description="BERT-style masking in warm-up and main.")
    mask_prob_finetune: float = Field(0.20, description="Masking in fine-tune.")
    gamma: float = Field(2.0, description="Focal loss γ.")
    exclude_visible: bool = Field(True, description="Score each masked product against the products that can be "
                                  "the answer: the basket's visible products are excluded from its softmax, as "
                                  "the evaluation and serving exclude them from the ranking.")
    shuffle_lines: bool = Field(True, description="Train and validate on each basket's lines in a random order "
                                "(a basket is a set; the published LGSR files sort most baskets by product code, "
                                "which a line masked in place would give away).")
    temperature: float = Field(0.07, description="InfoNCE τ.")
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    batch_size: int = Field(256, ge=1, description="Seed: 256 baskets.")
    grad_accum_steps: int = Field(1, ge=1)
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW; none on norms, biases, A_log, D.")
    adam_betas: list[float] = Field(
        [0.9, 0.98], min_length=2, max_length=2, description="AdamW betas: β2 0.98 (not 0.999) as for Transformers trained with warm-up, "
        "which adapts faster when the loss scale moves between phases.")
    adam_eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon (PyTorch's default).")
    grad_clip: float = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="Seed 002: EMA weights used for evaluation.")
    log_every: int = Field(100, ge=1)
    val_every: int = Field(500, ge=1)
    val_samples: int = Field(4096, ge=1, description="Fixed validation subset (deterministic masking).")
    patience: int = Field(3, ge=1, description="Validations without improvement before stopping.")
    min_delta: float = Field(1e-4, ge=0.0, description="A validation loss must drop by more than this to count as "
                             "an improvement (the loss is ~3-7 nats: below 1e-4 is noise of the masking).")
    checkpoint_every: int = Field(2000, ge=1)
    max_steps: int | None = Field(None, description="Stop after this many optimizer steps (tests, smoke runs).")
    max_bad_steps: int = Field(10, ge=1, description="Consecutive NaN/Inf losses before aborting.")
    seed: int = 0
    device: str = Field("auto", description="auto: cuda if available, else cpu.")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    compile: bool = Field(False, description="torch.compile the model.")
    prefetch: int = Field(2, ge=0, description="Batches assembled ahead in a background thread.")
    n_gpus: int = Field(1, ge=1, description="GPUs for the training process: > 1 launches it under torchrun (DDP).")


#: ``HOST:PORT`` of a rendezvous: a host name, an IPv4 address or a bracketed IPv6 address, and a port.
_ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")
_RDZV_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


class LaunchConfig(BaseModel):
    """Where the ranks of a training run: one machine (``torchrun --standalone``), or several machines
    that meet at a rendezvous (``torchrun --nnodes N --node-rank K --rdzv-backend … --rdzv-endpoint …``).

    Each node runs ``TrainingConfig.n_gpus`` ranks; the world size is ``nnodes × n_gpus``. Kept out of
    :class:`TrainingConfig` on purpose: the recipe's hash names the checkpoint folder, which every node
    must share, so neither the node's rank nor the rendezvous address may change it.
    """

    nnodes: int = Field(1, ge=1, description="Machines taking part; > 1 launches torchrun with a rendezvous "
                                             "even for n_gpus = 1.")
    node_rank: int = Field(0, ge=0, description="This machine's rank among the nodes, 0 .. nnodes-1. The Dagster "
                                                "op launches node 0 (whose rank 0 reports the model); the others "
                                                "run the same command with their own rank. c10d ignores it.")
    rdzv_backend: Literal["static", "c10d"] = Field(
        "static", description="static: node_rank decides the ranks and node 0 hosts the store at rdzv_endpoint, "
        "so the op's node holds rank 0 (the one that reports to Dagster and MLflow). c10d: torch assigns the "
        "node ranks in the sorted order of the hosts' names and ignores node_rank; the op then fails at start "
        "unless its node came first.")
    rdzv_endpoint: str = Field("", description="HOST:PORT every node can reach: node 0's address for static, "
                                               "the rendezvous server for c10d. Required when nnodes > 1.")
    rdzv_id: str = Field("", description="c10d: the job id shared by all nodes of one run (empty: torchrun's "
                                         "default, 'none'). Letters, digits, '.', '_', '-'.")

    @model_validator(mode="after")
    def _consistent(self) -> "LaunchConfig":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank = {self.node_rank} with nnodes = {self.nnodes}: node ranks run from 0 to "
                             f"{self.nnodes - 1}")
        if self.nnodes == 1:
            for name in ("rdzv_endpoint", "rdzv_id"):
                if getattr(self, name):
                    raise ValueError(f"{name} = {getattr(self, name)!r} with nnodes = 1: a single machine needs no "
                                     f"rendezvous (torchrun --standalone); leave {name} empty or set nnodes")
            return self
        if not self.rdzv_endpoint:
            raise ValueError(f"nnodes = {self.nnodes} needs rdzv_endpoint, the HOST:PORT every node can reach "
                             "(node 0's address for the static backend, e.g. 10.0.0.1:29500)")
        match = _ENDPOINT.match(self.rdzv_endpoint)
        if match is None or not 1 <= int(match["port"]) <= 65535:
            raise ValueError(f"rdzv_endpoint = {self.rdzv_endpoint!r} is not HOST:PORT with a port from 1 to 65535 "
                             "(an IPv6 host goes in brackets: [fd00::1]:29500)")
        if self.rdzv_id and self.rdzv_backend == "static":
            raise ValueError(f"rdzv_id = {self.rdzv_id!r} with rdzv_backend = 'static', which has no job id; leave "
                             "it empty or use c10d")
        if self.rdzv_id and not _RDZV_ID.match(self.rdzv_id):
            raise ValueError(f"rdzv_id = {self.rdzv_id!r}: use letters, digits, '.', '_' and '-' only")
        return self

    def torchrun_args(self, nproc_per_node: int) -> list[str]:
        """torchrun's options for this node, ``nproc_per_node`` ranks on it (``--standalone`` for one node)."""
        if self.nnodes == 1:
            return ["--standalone", f"--nproc-per-node={nproc_per_node}"]
        args = [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--nproc-per-node={nproc_per_node}",
                f"--rdzv-backend={self.rdzv_backend}", f"--rdzv-endpoint={self.rdzv_endpoint}"]
        return args + ([f"--rdzv-id={self.rdzv_id}"] if self.rdzv_id else [])


def training_preset(name: str) -> TrainingConfig:
    """``tiny`` (tests), ``demo`` (CPU, minutes), ``seed`` (the seed documents' recipe, GPU)."""
    if name == "tiny":
        return TrainingConfig(preset="tiny", model=MODEL_PRESETS["tiny"], epochs=2, batch_size=32, lr_main=1e-3,
                              lr_warmup=1e-3, lr_finetune=5e-4, lr_ramp_steps=0, log_every=5, val_every=10,
                              val_samples=128, checkpoint_every=20, ema_decay=0.9, prefetch=0)
    if name == "demo":
        # Higher LRs than the seed's: a 20× smaller model, 100× fewer samples, a few epochs on a CPU.
        return TrainingConfig(preset="demo", model=MODEL_PRESETS["demo"], epochs=2, batch_size=256,
                              lr_warmup=5e-4, lr_main=2e-3,
                              lr_finetune=5e-4, lr_ramp_steps=50, log_every=20, val_every=100, val_samples=2048,
                              checkpoint_every=200, ema_decay=0.99)
    if name == "seed":
        return TrainingConfig(preset="seed", model=MODEL_PRESETS["seed"])
    raise ValueError(f"unknown training preset {name!r}; one of tiny, demo, seed")


#: A Kubernetes quantity as this project writes them: a decimal number and an optional unit suffix
#: (``500m``, ``4``, ``16Gi``, ``1.5G``); the exponent forms the API also accepts are left out.
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(\.[0-9]+)?)(?P<unit>m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_QUANTITY_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_value(text: str) -> float:
    """``"500m"`` → 0.5, ``"16Gi"`` → 17179869184.0; a ValueError says what a quantity looks like."""
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity such as 500m, 4, 512Mi or 16Gi")
    return float(match["number"]) * _QUANTITY_UNITS[match["unit"]]


class TrainingPodConfig(BaseModel):
    """The pod that runs ``python -m retailsim_pipeline.training`` when the op's Pipes client is
    dagster-k8s's ``PipesK8sClient`` (``RETAILSIM_TRAINING_LAUNCHER=k8s``; each field from
    ``RETAILSIM_TRAINING_POD_<FIELD>``). GPUs: ``TrainingConfig.n_gpus``.

    The pod reads and writes the data root at the same path as the Dagster process (the tensor cache,
    the checkpoint folder, a sqlite MLflow store under it): a PersistentVolumeClaim mounted there.
    """

    image: str = Field("", description="Image with this package installed (python and torchrun on its PATH, CUDA "
                                       "torch); required.")
    namespace: str = Field("", description="Empty: the namespace dagster-k8s detects (the in-cluster service "
                                           "account's, else 'default').")
    service_account_name: str = Field("", description="Empty: the namespace's default service account.")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent", description="Kubernetes' own default for a tagged image.")
    cpu_request: str = Field("4", description="The trainer, the batch-prefetch thread and the validation scorer.")
    cpu_limit: str = Field("", description="Empty: no CPU limit (a limit throttles batch assembly between "
                                           "steps while the GPU waits).")
    memory_request: str = Field("16Gi", description="The seed model, its optimizer state and the prefetched "
                                                    "batches, with room for the page cache of the cache's arrays.")
    memory_limit: str = Field("16Gi", description="Equal to the request: the pod is never evicted for memory "
                                                  "it was promised.")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource the device plugin advertises "
                                                            "(amd.com/gpu on AMD); n_gpus of it as a limit. "
                                                            "Empty: a CPU pod.")
    data_volume_claim: str = Field("", description="PersistentVolumeClaim holding the data root; mounted at the "
                                                   "data root's path. Required.")
    shm_size: str = Field("2Gi", description="/dev/shm (a memory emptyDir) when n_gpus > 1: NCCL exchanges "
                                             "between the pod's ranks through it, and a container's default "
                                             "64 MB is too small.")

    @model_validator(mode="after")
    def _quantities(self) -> "TrainingPodConfig":
        for name in ("cpu_request", "cpu_limit", "memory_request", "memory_limit", "shm_size"):
            value = getattr(self, name)
            if value or name in ("cpu_request", "memory_request", "shm_size"):
                try:
                    quantity_value(value)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        for kind in ("cpu", "memory"):
            request, limit = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            if limit and quantity_value(request) > quantity_value(limit):
                raise ValueError(f"{kind}_request = {request} exceeds {kind}_limit = {limit}; Kubernetes refuses "
                                 "such a pod: raise the limit or lower the request")
        return self


class EvaluationConfig(BaseModel):
    """Scoring and promotion (DESIGN §7–8)."""

    split: str = Field("test", description="Split to score: test (default) or validation.")
    seed: int = Field(1234, description="Seed of the evaluation masking: the same positions for every model.")
    mask_rate: float = Field(0.15, gt=0.0, lt=1.0, description="Share of a basket's lines hidden for scoring (the "
                             "seed's BERT masking rate, so evaluation asks what training asks).")
    promotion_metric: str = Field("recall@10", description="Metric compared with the current champion.")
    promotion_margin: float = Field(0.0, ge=0.0, description="The challenger must beat the champion by more.")
    bootstrap_resamples: int = Field(1000, ge=1000, description="Resamples of the paired bootstrap over baskets "
                                     "behind the baseline gate (1,000: the usual floor for a 95 % percentile interval).")
    bootstrap_confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Coverage of the gate's interval: the "
                                        "model passes when the whole interval of model − strongest baseline is > 0.")
    device: str = Field("cpu", description="Device to score on.")
