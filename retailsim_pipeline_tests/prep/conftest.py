"""Fixtures of the ingest tests (each module provides its own ``real_week_file``)."""

import shutil
from pathlib import Path

import pytest

from retailsim_pipeline_tests.prep.lgsr_text import FILE_NAME


@pytest.fixture
def week_copy(real_week_file, tmp_path) -> Path:
    """A private copy of the module's generated weekly file, same name (so the file's week is known)."""
    dest = tmp_path / "raw" / FILE_NAME
    dest.parent.mkdir()
    shutil.copyfile(real_week_file, dest)
    return dest


@pytest.fixture(scope="module")
def cache(tiny_prepped):
    """The session's tiny tensor cache, opened (read-only: copy it before changing anything)."""
    from retailsim_pipeline.prep.cache import TensorCache

    return TensorCache.latest(tiny_prepped.cache)
