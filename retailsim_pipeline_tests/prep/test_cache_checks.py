"""The checks on a built cache: manifest consistency and leakage."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

import retailsim_pipeline.prep.cache_build as build_mod
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.cache_build import build_tensor_cache
from retailsim_pipeline.prep.cache_checks import check_leakage, check_manifest


def _rebuild(samples_dir, root):
    return TensorCache.open(build_tensor_cache(samples_dir, root, force=True).path)


def test_leakage_check_passes(cache, tiny_prepped):
    outcome = check_leakage(cache, tiny_prepped.samples)
    assert outcome.passed, outcome.failures
    assert outcome.details["probed_baskets"] > 50 and outcome.details["labels_perturbed"]


def test_leakage_check_catches_a_leaky_feature(tiny_prepped, tmp_path, monkeypatch):
    """A builder whose trip context reads the basket's own label fails the label-perturbation part."""
    honest = build_mod.trip_features_all

    def leaky(frames, home):
        out = honest(frames, home)
        own = pl.concat([f.select("basket_id", (pl.col("basket_type").cast(pl.String) == "Full Shop")
                                  .cast(pl.Float32).alias("own")) for f in frames.values()])
        col = out.columns[1]
        return out.join(own, on="basket_id", how="left", maintain_order="left").with_columns(
            pl.col("own").alias(col)).drop("own")

    monkeypatch.setattr(build_mod, "trip_features_all", leaky)
    leaky_cache = _rebuild(tiny_prepped.samples, tmp_path / "cache")
    outcome = check_leakage(leaky_cache, tiny_prepped.samples)
    assert not outcome.passed
    assert any("own labels" in f for f in outcome.failures)


def test_manifest_check_catches_tampering(cache, tmp_path):
    copy = tmp_path / cache.path.name
    shutil.copytree(cache.path, copy)
    arr = np.load(copy / "store_context.npy")
    arr[1, 0] += 1.0
    np.save(copy / "store_context.npy", arr)
    outcome = check_manifest(TensorCache.open(copy))
    assert not outcome.passed and any("store_context: sha256" in f for f in outcome.failures)


@pytest.mark.parametrize("value", [np.inf, np.nan], ids=["inf", "nan"])
def test_manifest_check_requires_every_float_array_finite(cache, tmp_path, value):
    """A value that slipped through (e.g. SPEND 1e308 -> an inf price ratio) fails the check by name."""
    copy = tmp_path / cache.path.name
    shutil.copytree(cache.path, copy)
    meta = json.loads((copy / "manifest.json").read_text())["arrays"]["test/trip"]
    arr = np.load(copy / meta["file"])
    assert np.issubdtype(arr.dtype, np.floating)
    arr.flat[7] = value
    np.save(copy / meta["file"], arr)
    outcome = check_manifest(TensorCache.open(copy), verify_hashes=False)
    assert not outcome.passed
    assert outcome.failures == ["test/trip: holds 1 NaN/Inf value(s)"]
