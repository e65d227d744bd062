"""Text-level helpers for the ingest tests: a weekly file is edited as lines of comma-separated fields.

Shared by ``test_ingest.py``, ``test_ingest_variants.py`` and ``test_ingest_defects.py``; the
``week_copy`` fixture lives in this folder's ``conftest.py``.
"""

from pathlib import Path

import polars as pl

from retailsim_pipeline.prep.schema import LGSR_COLUMNS, weekly_file_name

WEEK = 200607
FILE_NAME = weekly_file_name(WEEK)
COL = {c: i for i, c in enumerate(LGSR_COLUMNS)}
N_COLS = len(LGSR_COLUMNS)
TMP_GLOB = ".*tmp*"


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, lines: list[str], newline: str = "\n", *, final_newline: bool = True) -> None:
    with open(path, "w", newline="") as fh:
        fh.write(newline.join(lines) + (newline if final_newline else ""))


def set_fields(line: str, **values: str) -> str:
    fields = line.split(",")
    for name, value in values.items():
        fields[COL[name]] = value
    return ",".join(fields)


def field(line: str, name: str) -> str:
    return line.split(",")[COL[name]]


def q_entries(quarantined: pl.DataFrame, with_value: bool = True) -> list[tuple]:
    """(line, column, reason[, value]) of every quarantined row."""
    columns = ["line_number", "column", "reason"] + (["value"] if with_value else [])
    return list(quarantined.select(columns).iter_rows())


def no_tmp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.glob(TMP_GLOB)]


def without_lines(frame: pl.DataFrame, line_indexes) -> pl.DataFrame:
    """``frame`` (one row per data line, in file order) without the rows of the given 0-based line
    indexes of the file (header = 0, so row = index - 1)."""
    drop = sorted(i - 1 for i in line_indexes)
    return frame.with_row_index("__i").filter(~pl.col("__i").is_in(drop)).drop("__i")
