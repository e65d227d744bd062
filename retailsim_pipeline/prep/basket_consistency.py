"""Basket consistency of a weekly LGSR file: one BASKET_ID is one trip.

Basket ids are unique per week across stores: lines of one BASKET_ID with different stores, dates
or customers are quarantined with that reason (a basket's lines need not be adjacent). Rows of
several files checked together are grouped by their file as well (``by``): a basket belongs to
its week's file.
"""

import polars as pl

#: Basket-level fields that must agree on every line of one BASKET_ID.
BASKET_KEYS: tuple[str, ...] = ("STORE_CODE", "SHOP_DATE", "CUST_CODE")


def basket_spread(accepted: pl.LazyFrame, by: tuple[str, ...] = ()) -> pl.LazyFrame:
    """Per BASKET_ID (and ``by``), how many distinct stores, dates and customers its lines carry (1 when sound)."""
    return accepted.group_by(*by, "BASKET_ID").agg(pl.col(c).n_unique().alias(c) for c in BASKET_KEYS)


def basket_conflicts(spread: pl.DataFrame, by: tuple[str, ...] = ()) -> pl.DataFrame:
    """The BASKET_IDs (with ``by``) whose lines disagree on store, date or customer, with the reason and column."""
    broken = spread.filter(pl.any_horizontal(pl.col(c) > 1 for c in BASKET_KEYS))
    if broken.is_empty():
        return broken.select(*by, "BASKET_ID")
    reason = pl.coalesce(
        pl.when(pl.col(c) > 1).then(pl.lit(f"BASKET_ID appears with different {c} values")) for c in BASKET_KEYS
    )
    column = pl.coalesce(pl.when(pl.col(c) > 1).then(pl.lit(c)) for c in BASKET_KEYS)
    return broken.select(*by, "BASKET_ID", reason.alias("__conflict"), column.alias("__conflict_col"))
