"""File helpers shared by every stage: content hashes and atomic parquet writes."""

import hashlib
import os
from pathlib import Path

import polars as pl


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_parquet_atomic(df: pl.DataFrame, path: Path, statistics: bool = True) -> None:
    """Write ``df`` to ``path`` through a temporary sibling and a rename: never half-written.

    ``statistics=False`` skips the column statistics (min/max per row group): ~20 % faster for small
    files that are always read whole (the weekly partitions).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.write_parquet(tmp, compression="lz4", statistics=statistics)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
