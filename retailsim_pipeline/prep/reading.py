"""Read one weekly LGSR file into the working frame: header, then a strict typed read or a tolerant one.

- The file is ``transactions_YYYYWW.csv`` or the same gzip-compressed (``.csv.gz``; compression is
  recognised by its magic bytes, whatever the name says).
- The header must name all 22 LGSR columns (any order, any case; ``seg_1``/``seg_2`` accepted for
  ``CUST_PRICE_SENSITIVITY``/``CUST_LIFESTAGE``). A file that lacks any of them is not this format:
  :class:`LgsrFormatError` names the file and the missing columns.
- A row that cannot be parsed is kept, its reason recorded: an unparsable number, a missing field
  (short row, blank line), a row with too many fields, a value outside a closed code set.
- The loyalty-card fields (:data:`CARD_COLUMNS`) are read as text; see
  :mod:`retailsim_pipeline.prep.card_fields`.

Speed: the common case (a clean, well-formed file) is one strict typed ``read_csv``. Only when
polars cannot parse a file strictly (a non-numeric value in a numeric column, ragged lines) does it
fall back to reading every field as text, splitting lines itself, and locating the bad rows.

The working frame holds :data:`LINE_COL` (1-based line number; the header is line 1), the 22 LGSR
columns and the reason columns of :mod:`retailsim_pipeline.prep.rules`; the tolerant read adds the
raw line (``__raw``) and BASKET_ID's text (:data:`RAW_BASKET_ID`).
"""

import gzip
from pathlib import Path

import numpy as np
import polars as pl

from retailsim_pipeline.prep.errors import LgsrFormatError
from retailsim_pipeline.prep.rules import COLUMN_COL, REASON_COL, VALUE_COL, first_failure
from retailsim_pipeline.prep.schema import HEADER_ALIASES, LGSR_COLUMNS, TRANSACTION_SCHEMA

LINE_COL = "__line"
RAW_BASKET_ID = "__raw_basket_id"

#: The loyalty-card fields: read as text, ``""`` → null, segment codes mapped, then typed.
CARD_COLUMNS: tuple[str, ...] = ("CUST_CODE", "CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE")

#: Columns whose text can fail to parse, and what such a failure means (card fields apart).
_PARSED_KIND = {
    c: ("unparsable number" if t.is_numeric() else "unknown code")
    for c, t in TRANSACTION_SCHEMA.items()
    if (t.is_numeric() or isinstance(t, pl.Enum)) and c not in CARD_COLUMNS
}

GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def read_header(path: Path) -> list[str]:
    """Canonical column names of ``path``'s header (aliases resolved, upper case); raises
    :class:`LgsrFormatError`. A gzip-compressed file is read through gzip, whatever its name."""
    try:
        with (gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")) as fh:
            first = fh.readline()
    except (OSError, EOFError) as exc:
        raise LgsrFormatError(f"{path}: cannot be read ({exc})") from exc
    if not first.strip():
        raise LgsrFormatError(f"{path}: empty file, expected a header with the 22 LGSR columns")
    try:
        text = first.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise LgsrFormatError(f"{path}: line 1 is not UTF-8 text; not an LGSR transaction file") from exc
    names = [n.strip().strip('"').upper() for n in text.split(",")]
    names = [HEADER_ALIASES.get(n, n) for n in names]
    missing = [c for c in LGSR_COLUMNS if c not in names]
    if missing:
        raise LgsrFormatError(
            f"{path}: not an LGSR transaction file: header lacks column(s) {', '.join(missing)} "
            f"(found {len(names)} column(s): {', '.join(names[:8])}{', …' if len(names) > 8 else ''})"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LgsrFormatError(f"{path}: header repeats column(s) {', '.join(dupes)}")
    return names


def _read_schema(header: list[str], card_type: pl.DataType = pl.String()) -> dict[str, pl.DataType]:
    """The strict read's column types, in the file's column order (card fields as ``card_type``)."""
    return {name: card_type if name in CARD_COLUMNS else TRANSACTION_SCHEMA.get(name, pl.String())
            for name in header}


def _working_columns() -> list[pl.Expr]:
    """The working frame's columns out of a strict read: line, the 22 LGSR columns, empty reasons."""
    return [pl.col(LINE_COL).cast(pl.Int64), *[pl.col(c) for c in LGSR_COLUMNS],
            pl.lit(None, pl.String).alias(REASON_COL), pl.lit(None, pl.String).alias(COLUMN_COL),
            pl.lit(None, pl.String).alias(VALUE_COL)]


def typed_scan(path: Path, header: list[str]) -> pl.LazyFrame:
    """:func:`typed_read` as a lazy scan of the file's columns alone, so that many files are read in
    one query (``pl.collect_all``) and then made one working frame by :func:`working_frame`. Same
    parser and options, three differences: no short-line flag (the caller checks the file's last
    column, ``header[-1]``, for nulls as :func:`typed_read` does), no line numbers
    (:func:`working_frame` adds them: a row index in the scan itself costs ~25 % of the read), and the
    card fields come as ``Categorical`` rather than text (the same values, ``""`` included), so that
    their distinct values per file, and their typing, cost a pass over small integers.
    """
    return pl.scan_csv(path, has_header=True, new_columns=header, schema=typed_scan_schema(header), encoding="utf8")


def typed_scan_schema(header: list[str]) -> dict[str, pl.DataType]:
    """The columns of a :func:`typed_scan` of a file with this header."""
    return _read_schema(header, pl.Categorical())


def working_frame(frames: list[pl.DataFrame], tags: dict[str, pl.Series]) -> pl.DataFrame:
    """One working frame of many files' :func:`typed_scan` frames (at least one), in order: each
    file's rows keep their order and get their own line numbers (the header is line 1), and each
    file's entry of every ``tags`` series (one value per file) becomes a column at the end, e.g. the
    file's index in a batch.
    """
    heights = np.array([f.height for f in frames], dtype=np.int64)
    starts = np.repeat(np.cumsum(heights) - heights, heights)
    lines = np.arange(int(heights.sum()), dtype=np.int64) - starts + 2
    per_row = {name: pl.Series(name, np.repeat(tag.to_numpy(), heights), dtype=tag.dtype)
               for name, tag in tags.items()}
    return pl.concat(frames, how="vertical").with_columns(pl.Series(LINE_COL, lines)) \
        .select(_working_columns()).with_columns(**per_row)


def typed_read(path: Path, header: list[str]) -> tuple[pl.DataFrame, bool]:
    """Strict typed read and whether any line may be short.

    Raises ``polars.exceptions.ComputeError`` on anything it cannot parse. polars pads a short line
    (or a blank one) with nulls instead of failing; such a line leaves the file's last column
    empty, so any empty last field is reported and the caller takes the slow path, which counts
    every line's fields.
    """
    frame = pl.read_csv(path, has_header=True, new_columns=header, schema=_read_schema(header), encoding="utf8",
                        row_index_name=LINE_COL, row_index_offset=2)
    maybe_short = frame.get_column(header[-1]).has_nulls()
    return frame.select(_working_columns()), maybe_short


def tolerant_read(path: Path, header: list[str]) -> pl.DataFrame:
    """Slow path: split every line ourselves, type each field non-strictly and record why rows fail.

    Returns the same columns as :func:`typed_read` with ``__reason``/``__column``/``__value`` set for
    rows whose fields could not be parsed or whose field count is wrong.
    """
    n = len(header)
    lines = pl.read_csv(
        path, has_header=False, separator="\x1f", quote_char=None, skip_rows=1,
        schema={"__raw": pl.String()}, encoding="utf8-lossy",
    ).with_row_index(LINE_COL, offset=2).with_columns(pl.col(LINE_COL).cast(pl.Int64))
    raw = pl.col("__raw").str.strip_chars_end("\r")
    n_fields = raw.str.count_matches(",", literal=True) + 1
    fields = raw.str.split(",")
    parsed = lines.with_columns(
        n_fields.alias("__n_fields"),
        *[fields.list.get(i, null_on_oob=True).alias(f"__f{i}") for i in range(n)],
    )
    casts = []
    for i, name in enumerate(header):
        target = TRANSACTION_SCHEMA.get(name)
        if target is not None:
            src = pl.col(f"__f{i}").str.strip_chars('"')
            target = pl.String() if name in CARD_COLUMNS else target
            casts.append(pl.when(src != "").then(src).cast(target, strict=False).alias(name))
    typed = parsed.with_columns(*casts, pl.col(f"__f{header.index('BASKET_ID')}").alias(RAW_BASKET_ID))

    # Which numeric field failed to parse: raw text present, typed value null.
    reasons = [
        (pl.col("__raw").is_null() | (pl.col("__raw").str.strip_chars() == ""), "missing fields (blank line)",
         None, None),
        (pl.col("__n_fields") > n, f"too many fields (expected {n})", None, pl.col("__n_fields").cast(pl.String)),
        (pl.col("__n_fields") < n, f"missing fields (expected {n})", None, pl.col("__n_fields").cast(pl.String)),
    ]
    for i, name in enumerate(header):
        kind = _PARSED_KIND.get(name)
        if kind is not None:
            raw_i = pl.col(f"__f{i}")
            reasons.append(
                ((raw_i != "") & raw_i.is_not_null() & pl.col(name).is_null(), f"{kind} in {name}", name, raw_i)
            )
    return typed.with_columns(*first_failure(reasons)).select(
        LINE_COL, *LGSR_COLUMNS, REASON_COL, COLUMN_COL, VALUE_COL, "__raw", RAW_BASKET_ID
    )
