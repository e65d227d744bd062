"""The data contract of the dunnhumby "Let's Get Sort-of-Real" (LGSR) transaction files.

One CSV per shop week, ``transactions_YYYYWW.csv`` (or the same gzip-compressed as
``transactions_YYYYWW.csv.gz``), one row per product line of a basket, with the 22 columns of
:data:`LGSR_COLUMNS`. This module is the single home of that contract: the generator writes it,
the validator enforces it, and nothing else hard-codes a column name.

The copies that circulate publicly differ from the documented format, and the contract accepts
them as they are (measured on every file of ``shared/lgsr_real``):

- header names in any case and any column order; ``seg_1``/``seg_2`` for the two customer
  segment columns (:data:`HEADER_ALIASES`);
- the segment values *coded* (:data:`SEGMENT_CODE_ALIASES`): a file uses either the coded family
  or the documented codes, never both; the typed output always holds the documented codes;
- ``""`` (a quoted empty string) is an empty field: anonymous shoppers' card fields, and a carded
  customer without a lifestage;
- a basket's lines scattered inside the file (nothing may assume adjacency).

Shop weeks are fiscal weeks of 52 per year, consecutive Mondays: week ``200607`` starts on Monday
2006-04-10, ``200652`` is followed by ``200701``. ``SHOP_WEEKDAY`` counts from 1 = Sunday.
``XX`` means "unknown" and is a real value, not an error.
"""

import datetime as dt
import re
from pathlib import Path

import polars as pl

#: The 22 columns of an LGSR transaction file, in file order.
LGSR_COLUMNS: tuple[str, ...] = (
    "SHOP_WEEK",
    "SHOP_DATE",
    "SHOP_WEEKDAY",
    "SHOP_HOUR",
    "QUANTITY",
    "SPEND",
    "PROD_CODE",
    "PROD_CODE_10",
    "PROD_CODE_20",
    "PROD_CODE_30",
    "PROD_CODE_40",
    "CUST_CODE",
    "CUST_PRICE_SENSITIVITY",
    "CUST_LIFESTAGE",
    "BASKET_ID",
    "BASKET_SIZE",
    "BASKET_PRICE_SENSITIVITY",
    "BASKET_TYPE",
    "BASKET_DOMINANT_MISSION",
    "STORE_CODE",
    "STORE_FORMAT",
    "STORE_REGION",
)

#: Some copies of the dataset name the two customer segment columns ``seg_1`` / ``seg_2``. Header names
#: are matched case-insensitively (keys here are upper case), so ``shop_week`` is ``SHOP_WEEK``.
HEADER_ALIASES: dict[str, str] = {
    "SEG_1": "CUST_PRICE_SENSITIVITY",
    "SEG_2": "CUST_LIFESTAGE",
}

#: The coded segment values of the published ``seg_1``/``seg_2`` copy → the documented codes.
#:
#: Evidence: week 200607 circulates twice, once with ``seg_1``/``seg_2`` and coded values
#: (``ArthurLeroudier/Advanced-ML-project``, ``data/csvfiles/``) and once with the documented header
#: and codes (``badampetasrikar/users``, after a spreadsheet round trip that rounded BASKET_ID but
#: kept every other field; it lacks the first row). Matching the two copies row by row (line n+1 of
#: the coded copy = line n of the documented one, 25,240 rows) maps each coded value to exactly one
#: documented value: seg_1 AZ→LA, BG→UM, CT→MM, DY→XX; seg_2 AT→YA, BU→OT, CZ→OA, DI→YF, EQ→OF,
#: FN→PE. No seg_2 code for XX occurs in the 94 published weeks. The test
#: ``test_real_data.py::test_segment_mapping_matches_documented_copy`` repeats that comparison.
SEGMENT_CODE_ALIASES: dict[str, dict[str, str]] = {
    "CUST_PRICE_SENSITIVITY": {"AZ": "LA", "BG": "UM", "CT": "MM", "DY": "XX"},
    "CUST_LIFESTAGE": {"AT": "YA", "BU": "OT", "CZ": "OA", "DI": "YF", "EQ": "OF", "FN": "PE"},
}

#: The identifier columns: a spreadsheet round trip turns their long numbers into ``9.94E+14``.
ID_COLUMNS: tuple[str, ...] = (
    "BASKET_ID", "PROD_CODE", "PROD_CODE_10", "PROD_CODE_20", "PROD_CODE_30", "PROD_CODE_40", "CUST_CODE",
    "STORE_CODE",
)

#: Closed code sets. The order of each tuple is the class order of the matching label head.
PRICE_SENSITIVITY_CODES: tuple[str, ...] = ("LA", "MM", "UM", "XX")
LIFESTAGE_CODES: tuple[str, ...] = ("YA", "OA", "YF", "OF", "PE", "OT", "XX")
BASKET_SIZE_CODES: tuple[str, ...] = ("S", "M", "L")
BASKET_TYPE_CODES: tuple[str, ...] = ("Small Shop", "Top Up", "Full Shop", "XX")
DOMINANT_MISSION_CODES: tuple[str, ...] = ("Fresh", "Grocery", "Mixed", "Nonfood", "XX")
STORE_FORMAT_CODES: tuple[str, ...] = ("LS", "MS", "SS", "XLS")

#: Columns whose value must come from a closed set (None allowed where the column is nullable).
CODE_SETS: dict[str, tuple[str, ...]] = {
    "CUST_PRICE_SENSITIVITY": PRICE_SENSITIVITY_CODES,
    "CUST_LIFESTAGE": LIFESTAGE_CODES,
    "BASKET_SIZE": BASKET_SIZE_CODES,
    "BASKET_PRICE_SENSITIVITY": PRICE_SENSITIVITY_CODES,
    "BASKET_TYPE": BASKET_TYPE_CODES,
    "BASKET_DOMINANT_MISSION": DOMINANT_MISSION_CODES,
    "STORE_FORMAT": STORE_FORMAT_CODES,
}

#: Typed schema of a validated transaction row (the parquet written by ``raw_transactions``).
#: Closed code sets are ``Enum`` (a value outside the set cannot even be parsed), identifiers are
#: ``Categorical`` (dictionary-encoded: ~5k products, ~500k customers for hundreds of millions of rows).
TRANSACTION_SCHEMA: dict[str, pl.DataType] = {
    "SHOP_WEEK": pl.Int32(),
    "SHOP_DATE": pl.Int32(),
    "SHOP_WEEKDAY": pl.Int8(),
    "SHOP_HOUR": pl.Int8(),
    "QUANTITY": pl.Int32(),
    "SPEND": pl.Float64(),
    "PROD_CODE": pl.Categorical(),
    "PROD_CODE_10": pl.Categorical(),
    "PROD_CODE_20": pl.Categorical(),
    "PROD_CODE_30": pl.Categorical(),
    "PROD_CODE_40": pl.Categorical(),
    "CUST_CODE": pl.Categorical(),
    "CUST_PRICE_SENSITIVITY": pl.Enum(PRICE_SENSITIVITY_CODES),
    "CUST_LIFESTAGE": pl.Enum(LIFESTAGE_CODES),
    "BASKET_ID": pl.Int64(),
    "BASKET_SIZE": pl.Enum(BASKET_SIZE_CODES),
    "BASKET_PRICE_SENSITIVITY": pl.Enum(PRICE_SENSITIVITY_CODES),
    "BASKET_TYPE": pl.Enum(BASKET_TYPE_CODES),
    "BASKET_DOMINANT_MISSION": pl.Enum(DOMINANT_MISSION_CODES),
    "STORE_CODE": pl.Categorical(),
    "STORE_FORMAT": pl.Enum(STORE_FORMAT_CODES),
    "STORE_REGION": pl.Categorical(),
}
assert tuple(TRANSACTION_SCHEMA) == LGSR_COLUMNS

#: Identifier formats of the real dataset (anchored regular expressions).
ID_PATTERNS: dict[str, str] = {
    "PROD_CODE": r"^PRD\d{7}$",
    "PROD_CODE_10": r"^CL\d{5}$",
    "PROD_CODE_20": r"^DEP\d{5}$",
    "PROD_CODE_30": r"^G\d{5}$",
    "PROD_CODE_40": r"^D\d{5}$",
    "CUST_CODE": r"^CUST\d{10}$",
    "STORE_CODE": r"^STORE\d{5}$",
    "STORE_REGION": r"^[ENSW]\d{2}$",
}

#: Columns that may be empty: the loyalty-card fields of anonymous shoppers.
NULLABLE_COLUMNS: frozenset[str] = frozenset(
    {"CUST_CODE", "CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE"}
)

#: The four basket labels, in the order of the auxiliary heads.
LABEL_COLUMNS: tuple[str, ...] = (
    "BASKET_SIZE",
    "BASKET_PRICE_SENSITIVITY",
    "BASKET_TYPE",
    "BASKET_DOMINANT_MISSION",
)
LABEL_CODES: dict[str, tuple[str, ...]] = {c: CODE_SETS[c] for c in LABEL_COLUMNS}

FIRST_WEEK = 200607
FIRST_WEEK_MONDAY = dt.date(2006, 4, 10)
WEEKS_PER_YEAR = 52

_FILE_RE = re.compile(r"^transactions_(\d{6})\.csv(\.gz)?$")
#: The weekly file names a raw folder may hold (``.csv`` or gzip-compressed ``.csv.gz``).
RAW_FILE_GLOBS: tuple[str, ...] = ("transactions_*.csv", "transactions_*.csv.gz")


def week_code(week_index: int) -> int:
    """Shop week code ``YYYYWW`` of the ``week_index``-th week (0 → 200607, 45 → 200652, 46 → 200701)."""
    n = FIRST_WEEK % 100 - 1 + week_index
    return (FIRST_WEEK // 100 + n // WEEKS_PER_YEAR) * 100 + n % WEEKS_PER_YEAR + 1


def week_index(code: int) -> int:
    """Inverse of :func:`week_code`: 200607 → 0."""
    year, ww = divmod(int(code), 100)
    return (year - FIRST_WEEK // 100) * WEEKS_PER_YEAR + ww - FIRST_WEEK % 100


def week_monday(code: int) -> dt.date:
    """Monday on which shop week ``code`` starts."""
    return FIRST_WEEK_MONDAY + dt.timedelta(weeks=week_index(code))


def lgsr_weekday(date: dt.date) -> int:
    """LGSR weekday of ``date``: 1 = Sunday … 7 = Saturday."""
    return date.isoweekday() % 7 + 1


def weekly_file_name(code: int) -> str:
    return f"transactions_{code}.csv"


def week_of_file(name: str) -> int | None:
    """Week code of a weekly file name, or None when the name is not ``transactions_YYYYWW.csv[.gz]``."""
    m = _FILE_RE.match(name)
    return int(m.group(1)) if m else None


def file_stem(path) -> str:
    """``transactions_200607`` for ``transactions_200607.csv`` and ``transactions_200607.csv.gz``."""
    name = Path(path).name
    for suffix in (".csv.gz", ".csv", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


class RawFileError(ValueError):
    """A file of the raw folder that may not be ingested (a week present twice, a symbolic link)."""


class DuplicateWeekError(RawFileError):
    """A week is present in the raw folder twice (``.csv`` and ``.csv.gz``)."""


def week_is_plausible(code: int, today: dt.date | None = None) -> bool:
    """A real LGSR shop week: ``YYYYWW`` with WW in 1..52, from 200607 on, starting no later than today."""
    code = int(code)
    if not 1 <= code % 100 <= WEEKS_PER_YEAR or code < FIRST_WEEK:
        return False
    return week_monday(code) <= (today or dt.date.today())


def unsafe_raw_files(raw_dir) -> list[Path]:
    """Weekly-file names in ``raw_dir`` that are not regular files (symbolic links, folders, devices).

    Raw files must be regular files inside ``raw/``: a link could point anywhere on the machine.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return []
    return sorted(p for pattern in RAW_FILE_GLOBS for p in raw_dir.glob(pattern)
                  if week_of_file(p.name) is not None and (p.is_symlink() or not p.is_file()))


def unsafe_file_message(path: Path) -> str:
    kind = "a symbolic link" if path.is_symlink() else "not a regular file"
    return f"{path}: {kind}; raw weekly files must be regular files inside raw/ (copy the file there instead)"


def scan_raw_files(raw_dir) -> tuple[dict[int, Path], dict[int, list[Path]]]:
    """The weekly files of ``raw_dir`` by week, and the weeks present more than once (both names).

    A week must be one file: ``transactions_200607.csv`` *or* ``transactions_200607.csv.gz``.
    """
    raw_dir = Path(raw_dir)
    found: dict[int, list[Path]] = {}
    if raw_dir.is_dir():
        for pattern in RAW_FILE_GLOBS:
            for path in raw_dir.glob(pattern):
                week = week_of_file(path.name)
                if week is not None and not path.is_symlink() and path.is_file():
                    found.setdefault(week, []).append(path)
    files = {w: ps[0] for w, ps in sorted(found.items()) if len(ps) == 1}
    duplicates = {w: sorted(ps) for w, ps in sorted(found.items()) if len(ps) > 1}
    return files, duplicates


def duplicate_week_message(week: int, paths: list[Path]) -> str:
    return (f"week {week} is present twice in {paths[0].parent}: {' and '.join(p.name for p in paths)}; "
            "keep one of them (a .csv.gz is read like its .csv)")


def raw_weekly_files(raw_dir) -> dict[int, Path]:
    """The weekly files of ``raw_dir`` by week; :class:`DuplicateWeekError` names a week present twice,
    :class:`RawFileError` a weekly-file name that is a symbolic link or not a regular file."""
    unsafe = unsafe_raw_files(raw_dir)
    if unsafe:
        raise RawFileError("; ".join(unsafe_file_message(p) for p in unsafe))
    files, duplicates = scan_raw_files(raw_dir)
    if duplicates:
        raise DuplicateWeekError("; ".join(duplicate_week_message(w, ps) for w, ps in duplicates.items()))
    return files


def raw_file_of_week(raw_dir, week: int) -> Path:
    """The one raw file of ``week`` (``.csv`` or ``.csv.gz``); FileNotFoundError / DuplicateWeekError, and
    RawFileError for a symbolic link or anything but a regular file."""
    raw_dir = Path(raw_dir)
    candidates = (raw_dir / weekly_file_name(week), raw_dir / (weekly_file_name(week) + ".gz"))
    unsafe = [p for p in candidates if p.is_symlink() or (p.exists() and not p.is_file())]
    if unsafe:  # refused before anything follows the link (a hash would read its target)
        raise RawFileError("; ".join(unsafe_file_message(p) for p in unsafe))
    paths = [p for p in candidates if p.exists()]
    if len(paths) > 1:
        raise DuplicateWeekError(duplicate_week_message(week, paths))
    if not paths:
        raise FileNotFoundError(f"{raw_dir / weekly_file_name(week)}: the weekly file of week {week} is gone "
                                "(neither .csv nor .csv.gz); re-add it or delete the partition")
    return paths[0]
