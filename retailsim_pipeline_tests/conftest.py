"""Shared fixtures: the `tiny` preset generated once per session, and the prep chain run on it."""

import shutil

import pytest

from retailsim_pipeline.config import DataPaths, generator_preset
from retailsim_pipeline.prep.cache_build import build_tensor_cache
from retailsim_pipeline.prep.generator import generate
from retailsim_pipeline.prep.ingest import ingest_weekly_file
from retailsim_pipeline.prep.samples import build_basket_samples


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> DataPaths:
    """A data root holding only the generated `tiny` raw files (and the generator's sidecar). Read-only."""
    root = tmp_path_factory.mktemp("tiny_raw")
    generate(generator_preset("tiny"), root)
    return DataPaths(root)


@pytest.fixture
def tiny_copy(tiny_raw, tmp_path) -> DataPaths:
    """A private, writable copy of the tiny raw data for tests that modify or materialize."""
    root = tmp_path / "data"
    shutil.copytree(tiny_raw.raw, root / "raw")
    return DataPaths(root)


@pytest.fixture(scope="session")
def tiny_prepped(tiny_raw, tmp_path_factory) -> DataPaths:
    """Ingested, sampled and cached tiny data (plain functions, no Dagster). Read-only."""
    root = tmp_path_factory.mktemp("tiny_prepped")
    shutil.copytree(tiny_raw.raw, root / "raw")
    paths = DataPaths(root)
    for source in sorted(paths.raw.glob("transactions_*.csv")):
        ingest_weekly_file(source, paths.transactions, paths.quarantine)
    build_basket_samples(paths.transactions, paths.samples)
    build_tensor_cache(paths.samples, paths.cache)
    return paths
