"""Checks on a built tensor cache: the manifest agrees with the arrays, and nothing leaks.

Plain functions returning a :class:`CheckOutcome`; the Dagster asset checks in
``defs/checks.py`` wrap them, the tests call them directly.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retailsim_pipeline.config import CacheConfig
from retailsim_pipeline.prep.cache import FITTED_ARRAYS, TensorCache
from retailsim_pipeline.prep.features import trip_features_all
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.fitting import fit_train_tables
from retailsim_pipeline.prep.samples import PRODUCTS_FILE, SPLITS, read_manifest, scan_samples
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


#: Largest absolute difference allowed between a cached float table and its refit. The refit runs the
#: same seeded code on the same rows, so it is bit-identical on one machine; the margin only absorbs
#: BLAS summation order on another (a table fitted on other rows moves by orders of magnitude more).
FLOAT_TOLERANCE = 1e-5


def check_leakage(cache: TensorCache, samples_dir: Path, *, n_probe: int = 200, seed: int = 0) -> CheckOutcome:
    """Nothing in the cache was computed from validation/test baskets, and labels never leak into features.

    1. Refit: every fitted table (vocabulary, product embeddings and log prices, customer and store
       context with their indices, customer history) is fitted again from the train split of
       ``samples_dir`` alone and must equal the cached one — integer tables and frames exactly, float
       tables within :data:`FLOAT_TOLERANCE`. A table fitted on anything else fails, named, with the
       size of the difference.
    2. Label perturbation: for ``n_probe`` (≥ 1) random carded baskets (all splits, one per customer)
       the labels are changed to another class and the trip context of their customers is recomputed
       from scratch; the probed baskets' features must equal the cached ones, bit for bit. Samples
       without a carded basket cannot be probed: that fails too, rather than passing on nothing.
    """
    if n_probe < 1:
        raise ValueError(f"n_probe = {n_probe}: the label-perturbation check needs at least one probed basket")
    samples_dir = Path(samples_dir)
    version = read_manifest(samples_dir)["data_version"]
    if version != cache.manifest["upstream"]["basket_samples"]:
        return CheckOutcome(False, [f"{samples_dir} holds samples version {version}, the cache was built from "
                                    f"{cache.manifest['upstream']['basket_samples']}: nothing to compare with"], {})
    failures = refit_differences(cache, samples_dir)
    details: dict = {"refit_tables": len(FITTED_ARRAYS) + 3, "refit_differences": len(failures)}
    frames = {s: scan_samples(samples_dir, s).collect() for s in SPLITS}
    probe_failures, probe_details = _label_perturbation(cache, frames, n_probe, seed)
    return CheckOutcome(not failures and not probe_failures, failures + probe_failures, details | probe_details)


def refit_differences(cache: TensorCache, samples_dir: Path) -> list[str]:
    """One line per fitted table of ``cache`` that differs from its refit on the train split of ``samples_dir``."""
    train = scan_samples(samples_dir, "train").collect()
    products = pl.read_parquet(samples_dir / PRODUCTS_FILE)
    refit = fit_train_tables(train, products, CacheConfig(**cache.manifest["config"]))
    out = []
    for name in FITTED_ARRAYS:
        cached, fresh = np.asarray(cache[name]), getattr(refit, name)
        if cached.shape != fresh.shape:
            out.append(f"{name}: shape {cached.shape}, refit on the train split {fresh.shape}")
        elif np.issubdtype(fresh.dtype, np.integer):
            if (bad := int((cached != fresh).sum())):
                out.append(f"{name}: {bad:,} of {fresh.size:,} values differ from the refit on the train split")
        else:
            diff = np.abs(cached.astype(np.float64) - fresh.astype(np.float64))
            if not diff.max(initial=0.0) <= FLOAT_TOLERANCE:  # NaN fails too
                out.append(f"{name}: max |difference| {diff.max():.3g} ({int((diff > FLOAT_TOLERANCE).sum()):,} of "
                           f"{fresh.size:,} values) from the refit on the train split")
    for name, cached, fresh in (("vocabulary", cache.vocabulary(), refit.vocabulary),
                                ("customers", cache.customers(), refit.customers),
                                ("stores", cache.stores(), refit.stores)):
        if cached.columns != fresh.columns or cached.height != fresh.height:
            out.append(f"{name}: {cached.height} rows {cached.columns}, refit on the train split "
                       f"{fresh.height} rows {fresh.columns}")
        elif not cached.equals(fresh):
            bad = cached.join(fresh, on=cached.columns, how="anti", nulls_equal=True)
            out.append(f"{name}: {bad.height:,} of {cached.height:,} rows differ from the refit on the train split "
                       f"(e.g. {bad.head(2).rows()})")
    return out


def _label_perturbation(cache: TensorCache, frames: dict[str, pl.DataFrame], n_probe: int,
                        seed: int) -> tuple[list[str], dict]:
    """Part 2 of :func:`check_leakage`: failures and details."""
    carded = pl.concat([f.select("basket_id", "cust_code").with_columns(pl.lit(s).alias("split"))
                        for s, f in frames.items()]).filter(pl.col("cust_code").is_not_null())
    # One basket per customer: a basket's labels may (and do) shape its customer's *later* baskets.
    probe = (carded.sample(fraction=1.0, shuffle=True, seed=seed).unique("cust_code", keep="first",
                                                                          maintain_order=True).head(n_probe))
    details: dict = {"probed_baskets": int(probe.height)}
    if probe.height == 0:
        return ["no carded basket to probe: the label-perturbation check cannot run on these samples"], details
    probe_ids = probe.get_column("basket_id").implode()
    custs = probe.get_column("cust_code").unique().implode()
    subset = {s: f.filter(pl.col("cust_code").is_in(custs)) for s, f in frames.items()}
    home = cache.customers().select("cust_code", "home_store")

    def perturbed(f: pl.DataFrame) -> pl.DataFrame:
        hit = pl.col("basket_id").is_in(probe_ids)
        return f.with_columns(
            pl.when(hit).then(pl.col(lab).cast(pl.String).replace_strict(
                {c: codes[(i + 1) % len(codes)] for i, c in enumerate(codes)})).otherwise(
                pl.col(lab).cast(pl.String)).cast(f.schema[lab]).alias(lab)
            for lab, codes in ((c.lower(), LABEL_CODES[c]) for c in LABEL_COLUMNS)
        )

    cached_parts = []
    for s in SPLITS:
        a = cache.split(s)
        ids = np.asarray(a.basket_id)
        order = np.argsort(ids)
        want = probe.filter(pl.col("split") == s).get_column("basket_id").to_numpy()
        rows = order[np.searchsorted(ids, want, sorter=order)]
        cached_parts.append((ids[rows], np.asarray(a.trip[rows]).astype(np.float32)))
    cached_ids = np.concatenate([i for i, _ in cached_parts])
    cached_feat = np.concatenate([f for _, f in cached_parts])[np.argsort(cached_ids)]
    cached_ids = np.sort(cached_ids)
    failures = []
    for perturb in (False, True):
        frames_in = {s: perturbed(f) if perturb else f for s, f in subset.items()}
        fresh = trip_features_all(frames_in, home).filter(pl.col("basket_id").is_in(probe_ids)).sort("basket_id")
        fresh_np = fresh.drop("basket_id").to_numpy().astype(np.float16).astype(np.float32)
        same = np.array_equal(fresh.get_column("basket_id").to_numpy(), cached_ids) and np.array_equal(
            fresh_np, cached_feat)
        details["labels_perturbed" if perturb else "recomputed"] = bool(same)
        if not same:
            failures.append("trip features change when the basket's own labels change" if perturb
                            else "trip features recomputed from the samples differ from the cache")
    return failures, details
