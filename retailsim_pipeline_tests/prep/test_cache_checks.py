"""The checks on a built cache: manifest consistency and leakage."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

import retailsim_pipeline.prep.cache_build as build_mod
from retailsim_pipeline.config import CacheConfig
from retailsim_pipeline.prep.cache import CUSTOMERS_FILE, FITTED_ARRAYS, STORES_FILE, VOCABULARY_FILE, TensorCache
from retailsim_pipeline.prep.cache_build import build_tensor_cache
from retailsim_pipeline.prep.cache_checks import check_leakage, check_manifest
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.fitting import FittedTables, fit_train_tables
from retailsim_pipeline.prep.samples import PRODUCTS_FILE, SPLITS, read_samples


def _rebuild(samples_dir, root):
    return TensorCache.open(build_tensor_cache(samples_dir, root, force=True).path)


def test_leakage_check_passes(cache, tiny_prepped):
    outcome = check_leakage(cache, tiny_prepped.samples)
    assert outcome.passed, outcome.failures
    assert outcome.details["refit_tables"] == len(FITTED_ARRAYS) + 3 and outcome.details["refit_differences"] == 0
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


# --------------------------------------------------------------------------------------------
# Negative controls of the refit part: a planted leak in each fitted table fails, named
# --------------------------------------------------------------------------------------------

TABLES = (*FITTED_ARRAYS, "vocabulary", "customers", "stores")


@pytest.fixture(scope="module")
def honest_and_leaky(cache, tiny_prepped) -> tuple[FittedTables, FittedTables]:
    """The tables refit on train (honest) and on train + validation (what a leaking builder would write)."""
    config = CacheConfig(**cache.manifest["config"])
    products = pl.read_parquet(tiny_prepped.samples / PRODUCTS_FILE)
    train = read_samples(tiny_prepped.samples, "train")
    both = pl.concat([train, read_samples(tiny_prepped.samples, "validation")], how="vertical_relaxed")
    return fit_train_tables(train, products, config), fit_train_tables(both, products, config)


def _plant(cache: TensorCache, dest, table: str, value) -> TensorCache:
    """A copy of ``cache`` whose ``table`` is ``value`` (the manifest updated, so it opens cleanly)."""
    shutil.copytree(cache.path, dest)
    if isinstance(value, pl.DataFrame):
        value.write_parquet(dest / {"vocabulary": VOCABULARY_FILE, "customers": CUSTOMERS_FILE,
                                    "stores": STORES_FILE}[table])
    else:
        manifest = json.loads((dest / "manifest.json").read_text())
        meta = manifest["arrays"][table]
        np.save(dest / meta["file"], value)
        meta.update(shape=list(value.shape), dtype=str(value.dtype), sha256=file_sha256(dest / meta["file"]))
        (dest / "manifest.json").write_text(json.dumps(manifest))
    return TensorCache.open(dest)


def _refit_failures(outcome) -> list[str]:
    return [f for f in outcome.failures if not f.startswith("trip features")]


# Not "stores": every store of the tiny data shops in the train weeks, so validation cannot change the
# store index (its perturbation below is the negative control).
@pytest.mark.parametrize("table", [t for t in TABLES if t != "stores"])
def test_a_table_fitted_with_validation_fails_by_name(cache, tiny_prepped, tmp_path, honest_and_leaky, table):
    honest, leaky = (getattr(t, table) for t in honest_and_leaky)
    if isinstance(honest, pl.DataFrame):
        assert not honest.equals(leaky)  # the leak is real
    else:
        assert honest.shape != leaky.shape or not np.array_equal(honest, leaky)  # the leak is real
    outcome = check_leakage(_plant(cache, tmp_path / "leaky", table, leaky), tiny_prepped.samples)
    assert not outcome.passed
    named = _refit_failures(outcome)
    assert named and all(f.startswith(f"{table}:") for f in named), outcome.failures


def _perturbed(cache: TensorCache, table: str):
    if table == "vocabulary":
        v = cache.vocabulary()
        return v.with_columns(pl.when(pl.col("token_id") == 10).then(pl.col("train_count") + 1)
                              .otherwise(pl.col("train_count")).alias("train_count"))
    if table in ("customers", "stores"):
        frame = getattr(cache, table)()
        key = "home_store" if table == "customers" else "store_format"
        swapped = frame.get_column(key).to_list()
        i = next(i for i in range(1, len(swapped)) if swapped[i] != swapped[0])
        swapped[0], swapped[i] = swapped[i], swapped[0]
        return frame.with_columns(pl.Series(key, swapped, dtype=frame.schema[key]))
    arr = np.array(cache[table])
    if np.issubdtype(arr.dtype, np.integer):  # history tokens: swap a customer's two most bought products
        row = int(np.argmax((arr > 0).sum(axis=1)))
        arr[row, [0, 1]] = arr[row, [1, 0]]
    else:
        arr.flat[arr.size // 2] += 1e-3  # far below what a refit on other rows moves, far above rounding
    return arr


@pytest.mark.parametrize("table", TABLES)
def test_a_perturbed_table_fails_by_name(cache, tiny_prepped, tmp_path, table):
    planted = _plant(cache, tmp_path / "perturbed", table, _perturbed(cache, table))
    outcome = check_leakage(planted, tiny_prepped.samples)
    assert not outcome.passed
    named = _refit_failures(outcome)
    assert len(named) == 1 and named[0].startswith(f"{table}:"), outcome.failures
    if table in FITTED_ARRAYS and table != "customer_history_tokens":
        assert "max |difference| 0.001" in named[0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # standardising the statistics of zero customers
def test_the_label_probe_needs_a_probe(cache, tiny_prepped, tmp_path):
    with pytest.raises(ValueError, match="n_probe = 0: .* at least one probed basket"):
        check_leakage(cache, tiny_prepped.samples, n_probe=0)
    # Samples without a carded basket offer nothing to probe: the check fails instead of passing on nothing.
    samples = tmp_path / "samples"
    shutil.copytree(tiny_prepped.samples, samples)
    for split in SPLITS:
        frame = read_samples(samples, split)
        frame.with_columns(pl.lit(None).cast(frame.schema["cust_code"]).alias("cust_code")).write_parquet(
            samples / f"{split}.parquet")
    anonymous = _rebuild(samples, tmp_path / "cache")
    outcome = check_leakage(anonymous, samples)
    assert not outcome.passed and outcome.details["probed_baskets"] == 0
    assert outcome.failures == ["no carded basket to probe: the label-perturbation check cannot run on these samples"]


def test_samples_changed_since_the_build_are_refused(cache, tiny_prepped, tmp_path):
    samples = tmp_path / "samples"
    shutil.copytree(tiny_prepped.samples, samples)
    manifest = json.loads((samples / "_samples.json").read_text())
    manifest["data_version"] = "0" * 16
    (samples / "_samples.json").write_text(json.dumps(manifest))
    outcome = check_leakage(cache, samples)
    assert not outcome.passed and "nothing to compare with" in outcome.failures[0]
