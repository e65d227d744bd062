"""The cache writer: shapes, reuse, publishing, and what each input may (not) change."""

import shutil

import numpy as np
import polars as pl

import retailsim_pipeline.prep.cache_build as build_mod
from retailsim_pipeline.config import CacheConfig
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.cache_build import build_tensor_cache
from retailsim_pipeline.prep.cache_checks import check_manifest
from retailsim_pipeline.prep.samples import SPLITS, read_samples


def _copy_samples(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rebuild(samples_dir, root):
    return TensorCache.open(build_tensor_cache(samples_dir, root, force=True).path)


def test_shapes_dtypes_and_memory_mapping(cache, tiny_prepped):
    cfg = CacheConfig()
    m = cache.manifest
    v, c, s = m["sizes"]["vocab"], m["sizes"]["customers"], m["sizes"]["stores"]
    assert cache.product_embeddings.shape == (v, 256) and cache.product_embeddings.dtype == np.float32
    assert cache.customer_context.shape == (c, 32) and cache.store_context.shape == (s, 96)
    for split in SPLITS:
        a = cache.split(split)
        n = len(read_samples(tiny_prepped.samples, split))
        assert len(a) == n == m["splits"][split]["n_samples"]
        assert a.offsets.dtype == np.int64 and a.tokens.dtype == np.int32
        assert a.customer_key.shape == a.past_baskets.shape == (n,)
        assert a.customer_key.dtype == a.past_baskets.dtype == np.int32
        assert a.history_tokens.shape == a.history_counts.shape == (n, cfg.history_items)
        assert a.history_tokens.dtype == np.int32 and a.history_counts.dtype == np.uint16
        assert a.temporal.shape == (n, cfg.temporal_dim) and a.trip.shape == (n, cfg.trip_dim)
        assert a.labels.shape == (n, 4) and a.labels.dtype == np.int8
        assert isinstance(a.tokens, np.memmap) and isinstance(a.trip, np.memmap)
        assert np.all(np.diff(a.offsets) <= 50)
    outcome = check_manifest(cache)
    assert outcome.passed, outcome.failures
    assert (cache.path.parent / "LATEST").read_text().strip() == cache.path.name


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
        # Train baskets precede every validation/test basket, so even their point-in-time history is
        # unchanged; only customer_key numbers the customers of every split (customers seen only in the
        # dropped halves are gone).
        if name.startswith("train/") and name != "train/customer_key":
            assert np.array_equal(np.asarray(other[name]), np.asarray(cache[name])), name
    assert len(other.split("validation")) == len(cache.split("validation")) // 2
    # Whereas a test basket's history includes the customer's earlier validation (and test) baskets.
    assert not np.array_equal(np.asarray(other["test/trip"]), np.asarray(cache["test/trip"])[:len(other.split("test"))])


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
        for field in ("customer_key", "past_baskets", "history_tokens", "history_counts"):  # no label in them
            assert np.array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field))), field
    # Train labels do feed *later* baskets' history (that is the point of the trip context).
    assert not np.array_equal(np.asarray(cache.split("test").trip), np.asarray(other.split("test").trip))


def test_build_reuses_existing_folder_and_leaves_no_temporaries(tiny_prepped):
    again = build_tensor_cache(tiny_prepped.samples, tiny_prepped.cache)
    assert again.reused and again.path == TensorCache.latest(tiny_prepped.cache).path
    assert not list(tiny_prepped.cache.glob(".tmp-*"))
    different = build_mod.cache_key(again.manifest["upstream"]["basket_samples"], CacheConfig(seed=1))
    assert different != again.key


def test_a_cache_built_meanwhile_by_another_process_is_kept_not_deleted(tiny_prepped, tmp_path):
    """Two builders of the same key: the second keeps the first's folder (a reader may hold it)."""
    root = tmp_path / "cache"
    shutil.copytree(tiny_prepped.cache, root)
    final = TensorCache.latest(root).path
    reader = TensorCache.open(final)  # memory maps into the folder
    inode = final.stat().st_ino
    tmp = root / ".tmp-other"
    shutil.copytree(final, tmp)
    build_mod._publish(tmp, final, force=False)
    assert final.stat().st_ino == inode and tmp.exists()  # kept; the caller removes its own tmp
    shutil.rmtree(tmp)
    # A forced rebuild swaps the folder in with renames; the old reader's maps stay readable.
    shutil.copytree(final, tmp)
    build_mod._publish(tmp, final, force=True)
    assert final.stat().st_ino != inode and not tmp.exists()
    assert not list(root.glob(".old-*"))
    assert reader.product_embeddings.sum() == TensorCache.open(final).product_embeddings.sum()


def test_the_widths_are_the_settings(tiny_prepped, tmp_path):
    """Product, price, history, customer and store widths follow CacheConfig; the manifest records them."""
    config = CacheConfig(product_dim=128, hierarchy_dim_per_level=8, price_dim=32, customer_history_dim=96,
                         store_dim=80)
    built = TensorCache.open(build_tensor_cache(tiny_prepped.samples, tmp_path / "cache", config).path)
    assert built.widths == {"product": 128, "price": 32, "history": 96, "profile": 32, "customer": 128,
                            "store": 80, "temporal": 64, "trip": 48, "context": 128 + 64 + 80 + 48}
    assert built.product_embeddings.shape[1] == 128 and built.customer_context.shape[1] == 32
    assert built.store_context.shape[1] == 80
    outcome = check_manifest(built)
    assert outcome.passed, outcome.failures


def test_the_streamed_build_does_not_depend_on_its_chunks(tiny_prepped, tmp_path, cache, monkeypatch):
    """One week per chunk (chunk_lines=1) writes the same files, byte for byte, as one chunk per split; the
    per-customer states do carry across chunks (customers span them), and every hash streamed into the
    manifest is the file's."""
    chunked = build_tensor_cache(tiny_prepped.samples, tmp_path / "cache", force=True, chunk_lines=1)
    reads = []
    honest = build_mod._chunks
    monkeypatch.setattr(build_mod, "_chunks", lambda samples_dir, plan: reads.append(len(plan.chunks))
                        or honest(samples_dir, plan))
    whole = build_tensor_cache(tiny_prepped.samples, tmp_path / "whole", force=True, chunk_lines=10**9)
    assert reads == [1] * 4  # the fit's first pass reads train, then each split once (the fit counts the train lines on the way)
    assert chunked.key == whole.key == cache.path.name
    assert len(np.unique(np.asarray(TensorCache.open(whole.path).split("train").week))) > 3  # > 3 chunks above
    for name, meta in whole.manifest["arrays"].items():
        assert chunked.manifest["arrays"][name] == meta, name
        assert (chunked.path / meta["file"]).read_bytes() == (whole.path / meta["file"]).read_bytes(), name
        assert (cache.path / meta["file"]).read_bytes() == (whole.path / meta["file"]).read_bytes(), name
    assert check_manifest(TensorCache.open(chunked.path), verify_hashes=True).passed
    # Customers of the train split come back in later weeks: the memory and the sequence were carried.
    train = TensorCache.open(chunked.path).split("train")
    weeks_of = np.asarray(train.week)
    later = weeks_of > weeks_of.min()
    assert (np.asarray(train.history_counts)[later, 0] > 0).any()
