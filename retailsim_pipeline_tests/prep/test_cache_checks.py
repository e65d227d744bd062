"""The checks on a built cache: manifest consistency and leakage."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

import retailsim_pipeline.prep.features as features_mod
import retailsim_pipeline.prep.history as history_mod
from retailsim_pipeline.config import CacheConfig
from retailsim_pipeline.prep.cache import CUSTOMERS_FILE, FITTED_ARRAYS, STORES_FILE, VOCABULARY_FILE, TensorCache
from retailsim_pipeline.prep.cache_build import build_tensor_cache
from retailsim_pipeline.prep.cache_checks import check_leakage, check_manifest
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.fitting import FittedTables, fit_train_tables
from retailsim_pipeline.prep.history import Memory
from retailsim_pipeline.prep.samples import PRODUCTS_FILE, SPLITS, read_samples


def _rebuild(samples_dir, root):
    return TensorCache.open(build_tensor_cache(samples_dir, root, force=True).path)


def test_leakage_check_passes(cache, tiny_prepped):
    outcome = check_leakage(cache, tiny_prepped.samples)
    assert outcome.passed, outcome.failures
    d = outcome.details
    assert d["refit_tables"] == len(FITTED_ARRAYS) + 3 and d["refit_differences"] == 0
    assert d["sequence_checked_baskets"] == sum(len(cache.split(s)) for s in SPLITS)
    assert d["probed_baskets"] > 50 and d["recomputed_equal"] and d["time_rule_held"]
    # Every basket after a probe changed, in its trip context and in its memory: the perturbation bit.
    assert d["later_baskets"] > d["probed_baskets"]
    assert d["later_baskets_changed"] == d["later_trip_changed"] == d["later_baskets"]
    assert d["later_memory_changed"] > 0.9 * d["later_baskets"]
    assert d["perturbed_baskets"] == d["probed_baskets"] + d["later_baskets"]
    # The same with the memory recomputed for every basket, and the probes are seeded.
    full = check_leakage(cache, tiny_prepped.samples, full_memory=True)
    assert full.passed, full.failures
    other = check_leakage(cache, tiny_prepped.samples, n_probe=20, seed=1)
    assert other.passed and other.details["probed_baskets"] == 20
    assert other.details["probe_customers_baskets"] != check_leakage(
        cache, tiny_prepped.samples, n_probe=20, seed=2).details["probe_customers_baskets"]


# --------------------------------------------------------------------------------------------
# Negative controls of the time rule: a builder whose history features see the basket itself or a
# later one fails, and the failure names the feature
# --------------------------------------------------------------------------------------------

def _sequence(frames) -> pl.DataFrame:
    """basket_id, cust_code, and the customer's previous and next basket's date and type (any split)."""
    return (pl.concat([f.select("basket_id", pl.col("cust_code").cast(pl.String), "date", "hour",
                                pl.col("basket_type").cast(pl.String)) for f in frames.values()])
            .sort("cust_code", "date", "hour", "basket_id")
            .with_columns(pl.col("date").shift(-1).over("cust_code").alias("next_date"),
                          pl.col("basket_type").shift(-1).over("cust_code").alias("next_type")))


_TRIP_LEAKS = {
    # column replaced → its leaky value
    "itself": ("past_basket_type_Full Shop", (pl.col("basket_type") == "Full Shop").cast(pl.Float32)),
    "next label": ("past_basket_type_Full Shop", (pl.col("next_type") == "Full Shop").fill_null(False)
                   .cast(pl.Float32)),
    "next date": ("log_days_since_last", (pl.col("next_date") - pl.col("date")).dt.total_days().fill_null(0)
                  .cast(pl.Float32).log1p()),
}


@pytest.mark.parametrize("leak", list(_TRIP_LEAKS))
def test_trip_features_that_see_the_basket_or_a_later_one_fail_by_name(tiny_prepped, tmp_path, monkeypatch, leak):
    """The builder's trip context reads the basket's own label, the next basket's label, or the days until
    the next trip: the time rule fails and names the column."""
    honest = features_mod.TripStream.step
    column, value = _TRIP_LEAKS[leak]

    def leaky(self, chunk, customer_key=None):  # the builder's stream, and the check's recomputation through it
        seen = _sequence({"chunk": chunk}).select("basket_id", pl.when(pl.col("cust_code").is_not_null())
                                                  .then(value).otherwise(0.0).alias("__leak"))  # next: in the chunk
        return (honest(self, chunk, customer_key).join(seen, on="basket_id", how="left", maintain_order="left")
                .with_columns(pl.col("__leak").alias(column)).drop("__leak"))

    monkeypatch.setattr(features_mod.TripStream, "step", leaky)
    leaky_cache = _rebuild(tiny_prepped.samples, tmp_path / "cache")
    outcome = check_leakage(leaky_cache, tiny_prepped.samples)
    assert not outcome.passed and outcome.details["recomputed_equal"]  # the cache is what its code computes
    assert all(f.startswith(f"time rule: trip features ({column}) of ") for f in outcome.failures), outcome.failures
    assert any("probe baskets change" in f and "the basket itself or a later one leaks into it" in f
               for f in outcome.failures)
    if leak == "next label":  # the basket before the probe reads the probe's label
        assert any("baskets before their customer's probe change" in f for f in outcome.failures)


def _memory_after_each_basket(honest):
    """A MemoryState.advance that counts the basket itself: each basket gets the memory its customer's next
    basket has (the last of a chunk: the state's after it)."""
    def leaky(self, customer_key, past_baskets, offsets, tokens):
        before = honest(self, customer_key, past_baskets, offsets, tokens)
        key, past = np.asarray(customer_key, np.int64), np.asarray(past_baskets, np.int64)
        carded = np.flatnonzero(key > 0)
        order = carded[np.lexsort((past[carded], key[carded]))]
        has_next = np.r_[key[order][1:] == key[order][:-1], False]
        after = Memory(*(a.copy() for a in before))
        last = order[~has_next]
        for dest, src, now in zip(after, before, self.memory_at(key[last], past[last] + 1)):
            dest[order[has_next]] = src[order[np.flatnonzero(has_next) + 1]]
            dest[last] = now
        return after
    return leaky


def test_a_memory_that_holds_the_basket_itself_fails_by_name(tiny_prepped, tmp_path, monkeypatch):
    monkeypatch.setattr(history_mod.MemoryState, "advance", _memory_after_each_basket(history_mod.MemoryState.advance))
    leaky_cache = _rebuild(tiny_prepped.samples, tmp_path / "cache")
    train = leaky_cache.split("train")
    assert np.asarray(train.history_counts)[np.asarray(train.past_baskets) == 0].any()  # the leak is real
    outcome = check_leakage(leaky_cache, tiny_prepped.samples)
    assert not outcome.passed and outcome.details["recomputed_equal"]
    assert {f.split(" of ")[0] for f in outcome.failures} == {f"time rule: history_{name}" for name in
                                                              ("tokens", "counts", "recency", "decayed")}
    assert all("probe baskets change" in f and "the basket itself or a later one leaks" in f
               for f in outcome.failures), outcome.failures


def test_a_past_that_counts_the_basket_itself_fails_by_name(cache, tiny_prepped, tmp_path):
    """past_baskets + 1: whoever reads a basket's history by it (the as-of history of the baselines and
    the evaluation) would count the basket itself. The perturbation cannot see a count; the check
    recomputes it, and counts it afresh. (The builder cannot write it: its MemoryState refuses a customer
    whose baskets do not start at 0.)"""
    leaky = cache
    for i, split in enumerate(SPLITS):
        key, past = np.asarray(leaky.split(split).customer_key), np.asarray(leaky.split(split).past_baskets)
        leaky = _plant(leaky, tmp_path / f"leaky{i}", f"{split}/past_baskets",
                       np.where(key > 0, past + 1, 0).astype(np.int32))
    outcome = check_leakage(leaky, tiny_prepped.samples)
    assert not outcome.passed
    for split in SPLITS:
        assert any(f.startswith(f"{split}/past_baskets: ") and "differ from the recomputation" in f
                   for f in outcome.failures), outcome.failures
        assert any(f.startswith(f"{split}/past_baskets: ") and "strictly before them" in f for f in outcome.failures)
    assert all("/past_baskets: " in f for f in outcome.failures), outcome.failures


def test_a_perturbation_that_changes_nothing_proves_nothing(tiny_prepped, tmp_path, monkeypatch):
    """A builder whose history features ignore what was bought (all trip columns 0, empty memories)
    leaks nothing, but the perturbation cannot show it: the check fails rather than pass on nothing."""
    honest = features_mod.TripStream.step
    monkeypatch.setattr(features_mod.TripStream, "step", lambda self, chunk, key=None: honest(self, chunk, key).select(
        "basket_id", pl.all().exclude("basket_id") * 0.0))
    monkeypatch.setattr(history_mod.MemoryState, "advance", lambda self, key, past, offsets, tokens: Memory(
        np.full((len(key), self.k), 0, np.int32), np.zeros((len(key), self.k), np.uint16),
        np.zeros((len(key), self.k), np.uint16), np.zeros((len(key), self.k), np.float16)))
    outcome = check_leakage(_rebuild(tiny_prepped.samples, tmp_path / "cache"), tiny_prepped.samples)
    assert not outcome.passed and outcome.details["later_baskets_changed"] == 0
    n = outcome.details["probed_baskets"]
    assert outcome.failures == [f"time rule: perturbing the probe basket and every later one changed no later "
                                f"basket's features for {n:,} of {n:,} probe customers: the perturbation proved nothing"]


# --------------------------------------------------------------------------------------------
# The history arrays are compared with their recomputation from the samples, by split and array
# --------------------------------------------------------------------------------------------

def _tamper_row(arr: np.ndarray, row: int) -> np.ndarray:
    arr = np.array(arr)
    arr[row] += 1  # a memory: every slot of the row
    return arr


@pytest.mark.parametrize("name", ["customer_key", "past_baskets", "history_tokens", "history_counts",
                                  "history_recency", "history_decayed"])
def test_a_history_array_that_differs_from_its_recomputation_fails_by_name(cache, tiny_prepped, tmp_path, name):
    a = cache.split("validation")
    # a basket with a memory, of a customer with 3 baskets or more (probed: every such customer is, below)
    row = int(np.flatnonzero((np.asarray(a.past_baskets) >= 2) & (np.asarray(a.history_counts)[:, 1] > 0))[0])
    planted = _plant(cache, tmp_path / "tampered", f"validation/{name}", _tamper_row(a.__getattribute__(name), row))
    for kwargs in ({"n_probe": 10_000}, {"full_memory": True}):
        outcome = check_leakage(planted, tiny_prepped.samples, **kwargs)
        assert not outcome.passed
        assert any(f.startswith(f"validation/{name}: 1 of ") and "differ from the recomputation" in f
                   for f in outcome.failures), outcome.failures
        assert not any(f.startswith(("train/", "test/")) for f in outcome.failures), outcome.failures


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


def test_manifest_check_reads_the_memory_arrays(cache, tmp_path):
    """A memory slot with a product but no count (or a count for PAD) is not a memory."""
    copy = tmp_path / cache.path.name
    shutil.copytree(cache.path, copy)
    counts = np.load(copy / "test/history_counts.npy")
    counts[np.argmax(counts[:, 0] > 0), 0] = 0
    np.save(copy / "test/history_counts.npy", counts)
    outcome = check_manifest(TensorCache.open(copy), verify_hashes=False)
    assert outcome.failures == [f"test/history_tokens: outside [0, {cache.manifest['sizes']['vocab']}), or PAD slots "
                                "and zero counts disagree", _RECENCY_DECAYED]


_RECENCY_DECAYED = ("test/history_decayed, history_recency: a decayed share outside (0, 1] at a filled slot (or "
                    "non-zero at an empty one), or a recency of at least the customer's past baskets")


@pytest.mark.parametrize("name, plant", [("history_decayed", 1.5), ("history_decayed", 0.0),
                                         ("history_recency", "past")])
def test_manifest_check_bounds_recency_and_decayed_share(cache, tmp_path, name, plant):
    """A filled slot's decayed share lies in (0, 1]; its product was bought in one of the earlier baskets."""
    copy = tmp_path / cache.path.name
    shutil.copytree(cache.path, copy)
    counts, past = np.load(copy / "test/history_counts.npy"), np.load(copy / "test/past_baskets.npy")
    values = np.load(copy / f"test/{name}.npy")
    row = int(np.argmax(counts[:, 0] > 0))
    values[row, 0] = past[row] if plant == "past" else plant
    np.save(copy / f"test/{name}.npy", values)
    outcome = check_manifest(TensorCache.open(copy), verify_hashes=False)
    assert outcome.failures == [_RECENCY_DECAYED]


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
    assert all(f.startswith(f"{table}:") for f in outcome.failures), outcome.failures


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
    if np.issubdtype(arr.dtype, np.integer):  # token ids (product neighbours): another product
        arr.flat[arr.size // 2] += 1
        return arr
    arr.flat[arr.size // 2] += 1e-3  # far below what a refit on other rows moves, far above rounding
    return arr


@pytest.mark.parametrize("table", TABLES)
def test_a_perturbed_table_fails_by_name(cache, tiny_prepped, tmp_path, table):
    planted = _plant(cache, tmp_path / "perturbed", table, _perturbed(cache, table))
    outcome = check_leakage(planted, tiny_prepped.samples)
    assert not outcome.passed
    assert len(outcome.failures) == 1 and outcome.failures[0].startswith(f"{table}:"), outcome.failures
    if table in FITTED_ARRAYS and np.issubdtype(np.asarray(cache[table]).dtype, np.floating):
        assert "max |difference| 0.001" in outcome.failures[0]
    elif table in FITTED_ARRAYS:
        assert "1 of" in outcome.failures[0] and "values differ" in outcome.failures[0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # standardising the statistics of zero customers
def test_the_time_rule_needs_a_probe(cache, tiny_prepped, tmp_path):
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
    assert outcome.failures == ["no carded customer with 3 baskets or more to probe: the time-rule check cannot run "
                                "on these samples"]


def test_samples_changed_since_the_build_are_refused(cache, tiny_prepped, tmp_path):
    samples = tmp_path / "samples"
    shutil.copytree(tiny_prepped.samples, samples)
    manifest = json.loads((samples / "_samples.json").read_text())
    manifest["data_version"] = "0" * 16
    (samples / "_samples.json").write_text(json.dumps(manifest))
    outcome = check_leakage(cache, samples)
    assert not outcome.passed and "nothing to compare with" in outcome.failures[0]
