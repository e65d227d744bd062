"""Checks on a built tensor cache: the manifest agrees with the arrays, and nothing leaks.

Plain functions returning a :class:`CheckOutcome`; the Dagster asset checks in
``defs/checks.py`` wrap them, the tests call them directly.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retailsim_pipeline.config import N_SPECIAL, CacheConfig
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.features import trip_features
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.samples import LABELS, SPLITS, read_manifest, scan_samples
from retailsim_pipeline.prep.schema import LABEL_CODES, LABEL_COLUMNS


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    failures: list[str]
    details: dict

    def summary(self) -> str:
        return "ok" if self.passed else "; ".join(self.failures)


def check_manifest(cache: TensorCache, *, verify_hashes: bool = True) -> CheckOutcome:
    """The manifest agrees with the arrays: files, shapes, dtypes, hashes, and cross-array invariants."""
    failures: list[str] = []
    m = cache.manifest
    for name, meta in m["arrays"].items():
        arr = cache[name]
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            failures.append(f"{name}: {arr.shape} {arr.dtype} vs manifest {meta['shape']} {meta['dtype']}")
        if verify_hashes and file_sha256(cache.path / meta["file"]) != meta["sha256"]:
            failures.append(f"{name}: sha256 differs from the manifest")
    v, c, s = m["sizes"]["vocab"], m["sizes"]["customers"], m["sizes"]["stores"]
    cfg = CacheConfig(**m["config"])
    expect_widths = {"product": cfg.product_dim, "price": cfg.price_dim, "customer": cfg.customer_dim,
                     "store": cfg.store_dim, "temporal": cfg.temporal_dim, "trip": cfg.trip_dim,
                     "context": cfg.context_dim}
    if cache.widths != expect_widths:
        failures.append(f"widths {cache.widths} disagree with the config's {expect_widths}")
    w = cache.widths
    expect = {
        "product_embeddings": (v, w["product"]), "product_log_price": (v,), "customer_context": (c, w["customer"]),
        "store_context": (s, w["store"]),
        **{f"{split}/{name}": (m["splits"][split]["n_samples"], w[name])
           for split in cache.split_names for name in ("temporal", "trip")},
    }
    for name, shape in expect.items():
        if tuple(cache[name].shape) != shape:
            failures.append(f"{name}: shape {cache[name].shape}, expected {shape}")
    for name in m["arrays"]:  # every float array, split arrays included: no NaN/Inf may reach the model
        arr = cache[name]
        if np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all():
            failures.append(f"{name}: holds {int((~np.isfinite(arr)).sum()):,} NaN/Inf value(s)")
    for split in SPLITS:
        a = cache.split(split)
        n, info = len(a), m["splits"][split]
        if n != info["n_samples"] or int(a.offsets[-1]) != len(a.tokens) or len(a.tokens) != info["n_tokens"]:
            failures.append(f"{split}: {n} samples / {len(a.tokens)} tokens disagree with offsets or manifest")
        if np.any(np.diff(a.offsets) < 1):
            failures.append(f"{split}: a basket has no tokens")
        for name, bound in (("tokens", v), ("customer_index", c), ("store_index", s)):
            arr = a.__getattribute__(name)
            if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= bound):
                failures.append(f"{split}/{name}: values outside [0, {bound})")
        for name in ("temporal", "trip", "labels", "customer_index", "basket_id", "n_lines", "week"):
            if a.__getattribute__(name).shape[0] != n:
                failures.append(f"{split}/{name}: {a.__getattribute__(name).shape[0]} rows for {n} samples")
        if len(a.line_log_price_ratio) != len(a.tokens) or len(a.line_quantity) != len(a.tokens):
            failures.append(f"{split}: line arrays are not aligned with tokens")
    return CheckOutcome(not failures, failures, {"arrays": len(m["arrays"]), "vocab": v, "customers": c,
                                                  "stores": s})


def check_leakage(cache: TensorCache, samples_dir: Path, *, n_probe: int = 200, seed: int = 0) -> CheckOutcome:
    """Nothing in the cache was computed from validation/test weeks, and labels never leak into features.

    1. The tables were fitted on train weeks only, all before the first validation week.
    2. The vocabulary is exactly the train products with their train line counts.
    3. Every customer and store row belongs to someone seen in the train split.
    4. Label perturbation: for ``n_probe`` random carded baskets (all splits, one per customer) the
       labels are changed to another class and the trip context of their customers is recomputed from
       scratch; the probed baskets' features must equal the cached ones, bit for bit.
    """
    failures: list[str] = []
    details: dict = {}
    samples_dir = Path(samples_dir)
    sm = read_manifest(samples_dir)
    fit_last = cache.manifest["fit"]["weeks"][1]
    val_first = sm["splits"]["validation"][0]
    details["fit_last_week"], details["validation_first_week"] = fit_last, val_first
    if not fit_last < val_first:
        failures.append(f"tables fitted up to week {fit_last}, not before validation week {val_first}")

    train = scan_samples(samples_dir, "train")
    counts = (train.select(pl.col("products").explode().cast(pl.String).alias("PROD_CODE"))
              .group_by("PROD_CODE").len("expected").collect())
    vocab = cache.vocabulary().filter(pl.col("token_id") >= N_SPECIAL)
    cmp = vocab.join(counts, on="PROD_CODE", how="full", coalesce=True)
    bad_vocab = cmp.filter(pl.col("train_count").cast(pl.Int64).fill_null(-1)
                           != pl.col("expected").cast(pl.Int64).fill_null(-1))
    details["vocab_mismatches"] = bad_vocab.height
    if bad_vocab.height:
        failures.append(f"{bad_vocab.height} vocabulary entries are not train products with train counts "
                        f"(e.g. {bad_vocab.get_column('PROD_CODE').head(3).to_list()})")

    train_ids = train.select(pl.col("cust_code").cast(pl.String), pl.col("store_code").cast(pl.String)).collect()
    customers = cache.customers()
    stores = cache.stores()
    stray_c = customers.filter(~pl.col("cust_code").is_in(train_ids.get_column("cust_code").drop_nulls().implode()))
    stray_s = stores.filter(~pl.col("store_code").is_in(train_ids.get_column("store_code").implode()))
    if stray_c.height or stray_s.height:
        failures.append(f"{stray_c.height} customer and {stray_s.height} store rows come from outside the train split")

    frames = {s: scan_samples(samples_dir, s).collect() for s in SPLITS}
    carded = pl.concat([f.select("basket_id", "cust_code").with_columns(pl.lit(s).alias("split"))
                        for s, f in frames.items()]).filter(pl.col("cust_code").is_not_null())
    # One basket per customer: a basket's labels may (and do) shape its customer's *later* baskets.
    probe = (carded.sample(fraction=1.0, shuffle=True, seed=seed).unique("cust_code", keep="first",
                                                                          maintain_order=True).head(n_probe))
    probe_ids = probe.get_column("basket_id")
    custs = probe.get_column("cust_code").unique()
    subset = {s: f.filter(pl.col("cust_code").is_in(custs.implode())) for s, f in frames.items()}
    home = customers.select("cust_code", "home_store")

    def recompute(perturb: bool) -> pl.DataFrame:
        parts = []
        for s, f in subset.items():
            f = f.select("basket_id", "cust_code", "store_code", "store_format", "date", "hour", "weekday", "n_lines",
                         "spend", "cust_price_sensitivity", "cust_lifestage", *LABELS)
            if perturb:
                hit = pl.col("basket_id").is_in(probe_ids.implode())
                f = f.with_columns(
                    pl.when(hit).then(pl.col(lab).cast(pl.String).replace_strict(
                        {c: codes[(i + 1) % len(codes)] for i, c in enumerate(codes)})).otherwise(
                        pl.col(lab).cast(pl.String)).cast(f.schema[lab]).alias(lab)
                    for lab, codes in ((c.lower(), LABEL_CODES[c]) for c in LABEL_COLUMNS)
                )
            parts.append(f.with_columns(pl.lit(s == "train").alias("is_train"), pl.col("cust_code").cast(pl.String),
                                        pl.col("store_code").cast(pl.String)))
        return trip_features(pl.concat(parts), home).filter(pl.col("basket_id").is_in(probe_ids.implode()))

    cached_rows = []
    for s in SPLITS:
        a = cache.split(s)
        ids = np.asarray(a.basket_id)
        want = probe.filter(pl.col("split") == s).get_column("basket_id").to_numpy()
        pos = np.searchsorted(ids, want, sorter=np.argsort(ids))
        rows = np.argsort(ids)[pos]
        cached_rows.append(pl.DataFrame({"basket_id": ids[rows], "__row": np.arange(len(rows))})
                           .with_columns(pl.Series("__feat", np.asarray(a.trip[rows]).astype(np.float32))))
    cached = pl.concat(cached_rows).sort("basket_id")
    for perturb in (False, True):
        fresh = recompute(perturb).sort("basket_id")
        fresh_np = fresh.drop("basket_id").to_numpy().astype(np.float16).astype(np.float32)
        cached_np = np.stack(cached.get_column("__feat").to_list()) if cached.height else fresh_np
        same = fresh.get_column("basket_id").equals(cached.get_column("basket_id")) and np.array_equal(
            fresh_np, cached_np)
        details["labels_perturbed" if perturb else "recomputed"] = bool(same)
        if not same:
            failures.append("trip features change when the basket's own labels change" if perturb
                            else "trip features recomputed from the samples differ from the cache")
    details["probed_baskets"] = int(probe.height)
    return CheckOutcome(not failures, failures, details)
