"""The pure feature functions (shared by the cache builder, the batch assembly and serving)."""

import numpy as np
import pytest

from retailsim_pipeline.prep.features import price_features, temporal_features


def test_price_and_temporal_features():
    ratio = np.array([0.0, -0.3, 0.3, 0.0], dtype=np.float32)
    price = np.array([0.5, 0.5, 0.5, 2.0], dtype=np.float32)
    f = price_features(ratio, price)
    assert f.shape == (4, 64) and np.all(np.abs(f) <= 1.0)
    assert len({tuple(np.round(r, 5)) for r in f}) == 4
    t = temporal_features(np.array([0, 10]), np.array([100, 200]), np.array([4, 7]), np.array([1, 4]),
                          np.array([9, 18]), 10.0)
    assert t.shape == (2, 64)
    assert t[0, 14 + 0] == 1.0 and t[1, 14 + 3] == 1.0  # weekday one-hot (1 = Sunday)
    assert t[0, 23] == 1.0 and t[1, 23] == 0.0  # weekend flag
    assert t[0, 24 + 9] == 1.0 and t[1, 24 + 18] == 1.0  # hour one-hot
    assert t[1, 62] == pytest.approx(1.0)  # trend
