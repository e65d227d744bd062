"""The cache reader: opening, LATEST, a moved data folder, and an import without polars or scipy."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retailsim_pipeline.prep.cache import CACHE_FORMAT, TensorCache


def test_importing_the_reader_loads_neither_polars_nor_scipy():
    """Training, evaluation and serving import the reader; the heavy prep libraries stay out of it."""
    code = ("import sys, retailsim_pipeline.prep.cache; "
            "print(sorted(m for m in ('polars', 'scipy', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_opening_refuses_arrays_that_disagree_with_the_manifest(cache, tmp_path):
    copy = tmp_path / cache.path.name
    shutil.copytree(cache.path, copy)
    arr = np.load(copy / "store_context.npy")
    np.save(copy / "store_context.npy", arr[:, :10])
    with pytest.raises(ValueError, match="store_context.npy: shape .* disagree with manifest"):
        TensorCache.open(copy)
    np.save(copy / "store_context.npy", arr)
    TensorCache.open(copy)  # restored: opens again
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["arrays"]["train/tokens"]["shape"] = [1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tokens.npy"):
        TensorCache.open(copy)


def test_a_frame_is_read_only_when_asked_for(cache):
    vocab = cache.vocabulary()
    assert vocab.height == cache.product_embeddings.shape[0] == cache.manifest["sizes"]["vocab"]
    assert cache.customers().height == cache.customer_context.shape[0] - 1
    assert cache.stores().height == cache.store_context.shape[0] - 1
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        cache.split("dev")


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


def test_widths_are_recorded_and_match_the_arrays(cache):
    w = cache.widths
    assert w == {"product": 256, "price": 64, "history": 160, "profile": 32, "customer": 192, "store": 96,
                 "temporal": 64, "trip": 48, "context": 400}
    a = cache.split("validation")
    assert cache.product_embeddings.shape[1] == w["product"] and cache.customer_context.shape[1] == w["profile"]
    assert cache.store_context.shape[1] == w["store"]
    assert a.temporal.shape[1] == w["temporal"] and a.trip.shape[1] == w["trip"]


def test_a_cache_of_another_format_is_refused(cache, tmp_path):
    copy = tmp_path / cache.path.name
    shutil.copytree(cache.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = CACHE_FORMAT - 1
    del manifest["widths"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"format {CACHE_FORMAT - 1}, this code reads format {CACHE_FORMAT}; "
                                         "rebuild it"):
        TensorCache.open(copy)
    (tmp_path / "LATEST").write_text(copy.name)
    with pytest.raises(ValueError, match="rebuild it"):
        TensorCache.latest(tmp_path)


def test_advise_random_reaches_the_mapping_through_views(cache):
    """A shuffled batch reads a few bytes in thousands of places: the mapping is told so (MADV_RANDOM),
    through the plain-ndarray views the batch assembly holds; an array that is not mapped is left alone."""
    import numpy as np

    from retailsim_pipeline.prep.cache import advise_random

    tokens = cache.split("train").tokens
    assert advise_random(tokens) and advise_random(np.asarray(tokens)) and advise_random(np.asarray(tokens)[5:])
    assert not advise_random(np.zeros(3))
