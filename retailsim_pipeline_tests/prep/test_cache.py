import json
import shutil

import numpy as np
import polars as pl
import pytest

import retailsim_pipeline.prep.cache as cache_mod
from retailsim_pipeline.config import CacheConfig
from retailsim_pipeline.prep.cache import (
    MASK,
    PAD,
    UNK,
    TensorCache,
    build_tensor_cache,
    check_leakage,
    check_manifest,
    price_features,
    temporal_features,
)
from retailsim_pipeline.prep.samples import SPLITS, read_samples


@pytest.fixture(scope="module")
def cache(tiny_prepped) -> TensorCache:
    return TensorCache.latest(tiny_prepped.cache)


def _copy_samples(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_shapes_dtypes_and_memory_mapping(cache, tiny_prepped):
    cfg = CacheConfig()
    m = cache.manifest
    v, c, s = m["sizes"]["vocab"], m["sizes"]["customers"], m["sizes"]["stores"]
    assert cache.product_embeddings.shape == (v, 256) and cache.product_embeddings.dtype == np.float32
    assert cache.customer_context.shape == (c, 192) and cache.store_context.shape == (s, 96)
    for split in SPLITS:
        a = cache.split(split)
        n = len(read_samples(tiny_prepped.samples, split))
        assert len(a) == n == m["splits"][split]["n_samples"]
        assert a.offsets.dtype == np.int64 and a.tokens.dtype == np.int32
        assert a.temporal.shape == (n, cfg.temporal_dim) and a.trip.shape == (n, cfg.trip_dim)
        assert a.labels.shape == (n, 4) and a.labels.dtype == np.int8
        assert isinstance(a.tokens, np.memmap) and isinstance(a.trip, np.memmap)
        assert np.all(np.diff(a.offsets) <= 50)
    outcome = check_manifest(cache)
    assert outcome.passed, outcome.failures
    assert (cache.path.parent / "LATEST").read_text().strip() == cache.path.name


def test_vocabulary_is_train_products_by_frequency(cache, tiny_prepped):
    vocab = cache.vocabulary()
    assert vocab.get_column("token_id").to_list()[:3] == [PAD, MASK, UNK]
    assert vocab.get_column("token_id").to_list() == list(range(vocab.height))
    train = read_samples(tiny_prepped.samples, "train")
    counts = train.select(pl.col("products").explode().cast(pl.String)).to_series().value_counts()
    assert vocab.height == 3 + counts.height
    real = vocab.slice(3)
    assert real.get_column("train_count").is_sorted(descending=True)
    assert real.get_column("PROD_CODE_10").null_count() == 0  # hierarchy joined for every product
    # Tokens decode back to the sample's products (train: never UNK).
    a = cache.split("train")
    codes = vocab.get_column("PROD_CODE").to_numpy()
    first = train.row(0, named=True)["products"]
    assert list(codes[a.tokens[a.offsets[0]:a.offsets[1]]]) == first
    assert UNK not in set(np.asarray(a.tokens).tolist())


def test_padded_tokens_matches_slices(cache):
    a = cache.split("validation")
    idx = np.array([0, 5, 3, len(a) - 1])
    padded = a.padded_tokens(idx)
    for row, i in zip(padded, idx):
        seq = np.asarray(a.tokens[a.offsets[i]:a.offsets[i + 1]])
        assert np.array_equal(row[: len(seq)], seq) and np.all(row[len(seq):] == PAD)
    assert a.padded_tokens(idx, pad_to=50).shape == (4, 50)


def test_product_embeddings_encode_planted_complements(cache, tiny_raw):
    """The generator plants complementary products bought together: their embeddings must be close."""
    emb = np.asarray(cache.product_embeddings)
    assert np.isfinite(emb).all()
    assert not emb[PAD].any() and not emb[MASK].any() and emb[UNK].any()
    token = dict(cache.vocabulary().select("PROD_CODE", "token_id").iter_rows())
    truth = pl.read_parquet(tiny_raw.ground_truth / "products.parquet")
    strong = truth.filter(pl.col("complement_prob") > 0.3)
    pairs = np.array([(token[a], token[b]) for a, b in strong.select("PROD_CODE", "complement").iter_rows()
                      if a in token and b in token and a != b])
    assert len(pairs) >= 10
    unit = emb[:, :192] / np.maximum(np.linalg.norm(emb[:, :192], axis=1, keepdims=True), 1e-9)
    cos_pairs = np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], axis=1).mean()
    rng = np.random.default_rng(0)
    r1, r2 = rng.integers(3, emb.shape[0], 2000), rng.integers(3, emb.shape[0], 2000)
    cos_rand = np.sum(unit[r1] * unit[r2], axis=1).mean()
    assert cos_pairs > cos_rand + 0.1, (cos_pairs, cos_rand)


def test_leakage_check_passes(cache, tiny_prepped):
    outcome = check_leakage(cache, tiny_prepped.samples)
    assert outcome.passed, outcome.failures
    assert outcome.details["probed_baskets"] > 50 and outcome.details["labels_perturbed"]


def _rebuild(samples_dir, root):
    return TensorCache.open(build_tensor_cache(samples_dir, root, force=True).path)


def test_nothing_is_fitted_on_validation_or_test(tiny_prepped, tmp_path, cache):
    """Rewriting validation and test completely leaves every fitted table and the train split unchanged."""
    samples = _copy_samples(tiny_prepped.samples, tmp_path / "samples")
    for split in ("validation", "test"):
        frame = read_samples(samples, split)
        frame = frame.with_columns(
            pl.col("products").list.reverse(), pl.col("spend").list.eval(pl.element() * 3.0),
            pl.col("basket_type").shift(1).fill_null("XX"),
        ).head(frame.height // 2)
        frame.write_parquet(samples / f"{split}.parquet")
    other = _rebuild(samples, tmp_path / "cache")
    for name in ("product_embeddings", "product_log_price", "customer_context", "store_context"):
        assert np.array_equal(np.asarray(other[name]), np.asarray(cache[name])), name
    assert other.vocabulary().equals(cache.vocabulary())
    for name in cache.array_names:
        if name.startswith("train/"):
            assert np.array_equal(np.asarray(other[name]), np.asarray(cache[name])), name
    assert len(other.split("validation")) == len(cache.split("validation")) // 2


def test_changing_labels_leaves_features_unchanged(tiny_prepped, tmp_path, cache):
    samples = _copy_samples(tiny_prepped.samples, tmp_path / "samples")
    # One basket per customer: a basket's labels legitimately shape its customer's later baskets.
    everyone = pl.concat([read_samples(samples, s).with_columns(pl.lit(s).alias("split")) for s in SPLITS])
    firsts = everyone.filter(pl.col("cust_code").is_not_null()).unique("cust_code", keep="first", maintain_order=True)
    changed = {}
    for split in SPLITS:
        frame = read_samples(samples, split)
        pick = firsts.filter(pl.col("split") == split).get_column("basket_id").head(20)
        assert len(pick) > 0
        changed[split] = pick.to_numpy()
        flip = pl.col("basket_id").is_in(pick.implode())
        frame = frame.with_columns(
            pl.when(flip).then(pl.lit("L")).otherwise(pl.col("basket_size")).cast(frame.schema["basket_size"])
            .alias("basket_size"),
            pl.when(flip).then(pl.lit("Full Shop")).otherwise(pl.col("basket_type")).cast(frame.schema["basket_type"])
            .alias("basket_type"),
        )
        frame.write_parquet(samples / f"{split}.parquet")
    other = _rebuild(samples, tmp_path / "cache")
    for split in SPLITS:
        a, b = cache.split(split), other.split(split)
        rows = np.flatnonzero(np.isin(np.asarray(a.basket_id), changed[split]))
        assert len(rows) == len(changed[split])
        for field in ("trip", "temporal", "customer_index", "store_index"):
            assert np.array_equal(np.asarray(getattr(a, field))[rows], np.asarray(getattr(b, field))[rows]), field
        assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    # Train labels do feed *later* baskets' history (that is the point of the trip context).
    assert not np.array_equal(np.asarray(cache.split("test").trip), np.asarray(other.split("test").trip))


def test_leakage_check_catches_a_leaky_feature(tiny_prepped, tmp_path, monkeypatch):
    honest = cache_mod.trip_features

    def leaky(samples, home):
        out = honest(samples, home)
        own = samples.select("basket_id", (pl.col("basket_type").cast(pl.String) == "Full Shop")
                             .cast(pl.Float32).alias("own"))
        col = out.columns[1]
        return out.join(own, on="basket_id", how="left", maintain_order="left").with_columns(
            pl.col("own").alias(col)).drop("own")

    monkeypatch.setattr(cache_mod, "trip_features", leaky)
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
    assert not outcome.passed and any("store_context" in f for f in outcome.failures)
    np.save(copy / "store_context.npy", arr[:, :10])
    with pytest.raises(ValueError, match="disagree with manifest"):
        TensorCache.open(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["arrays"]["train/tokens"]["shape"] = [1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError):
        TensorCache.open(copy)


def test_build_reuses_existing_folder_and_leaves_no_temporaries(tiny_prepped):
    again = build_tensor_cache(tiny_prepped.samples, tiny_prepped.cache)
    assert again.reused and again.path == TensorCache.latest(tiny_prepped.cache).path
    assert not list(tiny_prepped.cache.glob(".tmp-*"))
    different = cache_mod.cache_key(again.manifest["upstream"]["basket_samples"], CacheConfig(seed=1))
    assert different != again.key


def test_price_and_temporal_features():
    ratio = np.array([0.0, -0.3, 0.3, 0.0], dtype=np.float32)
    price = np.array([0.5, 0.5, 0.5, 2.0], dtype=np.float32)
    f = price_features(ratio, price)
    assert f.shape == (4, 64) and np.all(np.abs(f) <= 1.0)
    assert len({tuple(np.round(r, 5)) for r in f}) == 4
    t = temporal_features(np.array([0, 10]), np.array([100, 200]), np.array([4, 7]), np.array([1, 4]),
                          np.array([9, 18]), 10.0)
    assert t.shape == (2, 64)
    assert t[0, 14 + 0] == 1.0 and t[1, 14 + 3] == 1.0  # weekday one-hot (1 = Sunday)
    assert t[0, 23] == 1.0 and t[1, 23] == 0.0  # weekend flag
    assert t[0, 24 + 9] == 1.0 and t[1, 24 + 18] == 1.0  # hour one-hot
    assert t[1, 62] == pytest.approx(1.0)  # trend


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


def test_a_moved_data_folder_points_at_its_own_samples(tiny_prepped, tmp_path):
    """The manifest stores the samples folder relative to the data folder, not as an absolute path."""
    assert TensorCache.latest(tiny_prepped.cache).manifest["upstream"]["samples_dir"] == "samples"
    moved = tmp_path / "moved"
    shutil.copytree(tiny_prepped.root, moved)
    copy = TensorCache.latest(moved / "cache")
    assert copy.samples_dir == (moved / "samples").resolve()
    assert not str(copy.samples_dir).startswith(str(tiny_prepped.root))


@pytest.mark.parametrize("content", ["../../etc", "0123456789abcdef", "not a key\n"], ids=["path", "absent", "junk"])
def test_latest_must_name_an_existing_cache_key(tiny_prepped, tmp_path, content):
    root = tmp_path / "cache"
    shutil.copytree(tiny_prepped.cache, root)
    good = TensorCache.latest(root)
    (root / "LATEST").write_text(content)
    with pytest.raises(ValueError, match="does not name a tensor cache"):
        TensorCache.latest(root)
    (root / "LATEST").write_text(good.path.name + "\n")
    assert TensorCache.latest(root).path == good.path


def test_a_cache_built_meanwhile_by_another_process_is_kept_not_deleted(tiny_prepped, tmp_path):
    """Two builders of the same key: the second keeps the first's folder (a reader may hold it)."""
    root = tmp_path / "cache"
    shutil.copytree(tiny_prepped.cache, root)
    final = TensorCache.latest(root).path
    reader = TensorCache.open(final)  # memory maps into the folder
    inode = final.stat().st_ino
    tmp = root / ".tmp-other"
    shutil.copytree(final, tmp)
    cache_mod._publish(tmp, final, force=False)
    assert final.stat().st_ino == inode and tmp.exists()  # kept; the caller removes its own tmp
    shutil.rmtree(tmp)
    # A forced rebuild swaps the folder in with renames; the old reader's maps stay readable.
    shutil.copytree(final, tmp)
    cache_mod._publish(tmp, final, force=True)
    assert final.stat().st_ino != inode and not tmp.exists()
    assert not list(root.glob(".old-*"))
    assert reader.product_embeddings.sum() == TensorCache.open(final).product_embeddings.sum()
