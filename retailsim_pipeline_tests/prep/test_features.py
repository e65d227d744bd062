"""The pure feature functions (shared by the cache builder, the batch assembly and serving)."""

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from retailsim_pipeline.config import TEMPORAL_WIDTH, TRIP_WIDTH, CacheConfig
from retailsim_pipeline.prep.features import price_features, temporal_features, trip_features_all
from retailsim_pipeline.prep.fitting import home_stores
from retailsim_pipeline.prep.samples import SPLITS, read_samples


def test_price_and_temporal_features():
    ratio = np.array([0.0, -0.3, 0.3, 0.0], dtype=np.float32)
    price = np.array([0.5, 0.5, 0.5, 2.0], dtype=np.float32)
    f = price_features(ratio, price, 64)
    assert f.shape == (4, 64) and np.all(np.abs(f) <= 1.0)
    assert len({tuple(np.round(r, 5)) for r in f}) == 4
    t = temporal_features(np.array([0, 10]), np.array([100, 200]), np.array([4, 7]), np.array([1, 4]),
                          np.array([9, 18]), 10.0)
    assert t.shape == (2, 64)
    assert t[0, 14 + 0] == 1.0 and t[1, 14 + 3] == 1.0  # weekday one-hot (1 = Sunday)
    assert t[0, 23] == 1.0 and t[1, 23] == 0.0  # weekend flag
    assert t[0, 24 + 9] == 1.0 and t[1, 24 + 18] == 1.0  # hour one-hot
    assert t[1, 62] == pytest.approx(1.0)  # trend


def test_price_width_is_the_setting():
    ratio, price = np.array([0.1, -0.2], np.float32), np.array([0.5, 1.5], np.float32)
    narrow, wide = price_features(ratio, price, 16), price_features(ratio, price, 64)
    assert narrow.shape == (2, 16) and wide.shape == (2, 64)
    assert np.array_equal(narrow[:, :4], wide[:, :4])  # the same lowest frequencies
    with pytest.raises(ValueError, match="multiple of 4"):
        price_features(ratio, price, 30)


def test_fixed_widths_are_the_definitions_and_the_config_refuses_others(tiny_prepped):
    frames = {s: read_samples(tiny_prepped.samples, s) for s in SPLITS}
    trip = trip_features_all(frames, home_stores(frames["train"]))
    assert trip.width == 1 + TRIP_WIDTH == 1 + CacheConfig().trip_dim
    t = temporal_features(np.array([3]), np.array([40]), np.array([2]), np.array([5]), np.array([13]), 10.0)
    assert t.shape == (1, TEMPORAL_WIDTH) == (1, CacheConfig().temporal_dim)
    with pytest.raises(ValidationError, match="temporal_dim = 32: the temporal features have exactly 64"):
        CacheConfig(temporal_dim=32)
    with pytest.raises(ValidationError, match="trip_dim = 50: the trip features have exactly 48"):
        CacheConfig(trip_dim=50)
    with pytest.raises(ValidationError, match="price_dim = 30: must be a multiple of 4"):
        CacheConfig(price_dim=30)
    with pytest.raises(ValidationError, match="customer_history_dim = 160: .* only product_dim = 128"):
        CacheConfig(product_dim=128)


def test_a_baskets_own_spend_does_not_reach_its_trip_history_even_in_the_last_bit(tiny_prepped):
    """Each customer's last basket gets other spends: its trip features stay bit-identical. (An
    exclusive sum written as "inclusive sum - own value" fails this: (a + b) - b != a in float32.)"""
    frames = {s: read_samples(tiny_prepped.samples, s) for s in SPLITS}
    home = home_stores(frames["train"])
    everyone = pl.concat([f.select("basket_id", pl.col("cust_code").cast(pl.String), "date", "hour")
                          for f in frames.values()])
    last = (everyone.filter(pl.col("cust_code").is_not_null()).sort("cust_code", "date", "hour", "basket_id")
            .group_by("cust_code", maintain_order=True).last().get_column("basket_id"))
    hit = pl.col("basket_id").is_in(last.implode())
    changed = {s: f.with_columns(pl.when(hit).then(pl.col("spend").list.eval(pl.element() * 3.7 + 0.013))
                                 .otherwise(pl.col("spend")).alias("spend")) for s, f in frames.items()}
    before = trip_features_all(frames, home).filter(hit).sort("basket_id")
    after = trip_features_all(changed, home).filter(hit).sort("basket_id")
    assert before.height == last.len() > 100
    assert before.equals(after)
