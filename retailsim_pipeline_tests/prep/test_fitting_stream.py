"""Fitting the train tables from chunks of weeks equals the one-shot fit, bit for bit."""

import gc
import weakref
from dataclasses import fields

import numpy as np
import polars as pl
import pytest

from retailsim_pipeline.config import CacheConfig
from retailsim_pipeline.prep.fitting import (
    FittedTables,
    basket_csr,
    build_product_log_price,
    fit_train_tables,
    fit_train_tables_streamed,
    median_from_value_counts,
    price_value_counts,
    product_log_price_from_counts,
)
from retailsim_pipeline.prep.samples import PRODUCTS_FILE, scan_samples


@pytest.fixture(scope="module")
def split(tiny_prepped):
    """The tiny train split's scan, its sorted weeks, the products, and the one-shot fit."""
    scan = scan_samples(tiny_prepped.samples, "train")
    products = pl.read_parquet(tiny_prepped.samples / PRODUCTS_FILE)
    weeks = sorted(scan.select(pl.col("week").unique()).collect().to_series().to_list())
    return scan, weeks, products, fit_train_tables(scan.collect(), products, CacheConfig())


def _week_chunks(scan: pl.LazyFrame, week_groups: list[list[int]]):
    """A fresh iterator over the chunks of ``week_groups``, each read from disk when asked for."""
    return lambda: (scan.filter(pl.col("week").is_in(group)).collect() for group in week_groups)


def _assert_same_tables(streamed: FittedTables, one_shot: FittedTables) -> None:
    for f in fields(FittedTables):
        if f.name == "train_csr":
            continue
        a, b = getattr(streamed, f.name), getattr(one_shot, f.name)
        if isinstance(b, pl.DataFrame):
            assert a.equals(b), f.name
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, f.name
            assert np.array_equal(a, b) and a.tobytes() == b.tobytes(), f.name  # bit for bit, floats included


@pytest.mark.parametrize("cut", ["1 week", "2 weeks", "unequal, with an empty chunk"])
def test_streamed_fit_equals_the_one_shot_fit(split, cut):
    scan, weeks, products, one_shot = split
    assert len(weeks) >= 5  # enough weeks for every cut to have several chunks
    groups = {
        "1 week": [[w] for w in weeks],
        "2 weeks": [weeks[i: i + 2] for i in range(0, len(weeks), 2)],
        "unequal, with an empty chunk": [weeks[:1], weeks[1:4], [-1], weeks[4:]],
    }[cut]
    streamed = fit_train_tables_streamed(_week_chunks(scan, groups), products, CacheConfig())
    _assert_same_tables(streamed, one_shot)
    assert streamed.train_csr is None  # the streamed fit never holds the split's lines


def test_one_shot_fit_hands_back_the_train_csr(split):
    scan, _, _, one_shot = split
    expected = basket_csr(scan.collect(), one_shot.vocabulary)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(one_shot.train_csr, expected, strict=True))


def test_chunks_are_read_twice_one_at_a_time(split):
    """``train_chunks`` is called once per pass, and no pass keeps the chunks it has read."""
    scan, weeks, products, one_shot = split
    calls, alive = [], []

    def chunks():
        calls.append(len(calls))
        for w in weeks:
            gc.collect()
            # The caller still holds the chunk just handed out; every earlier one must be gone.
            alive.append(sum(ref() is not None for ref in refs[:-1]))
            chunk = scan.filter(pl.col("week") == w).collect()
            refs.append(weakref.ref(chunk))
            yield chunk
        refs.clear()

    refs: list[weakref.ref] = []
    streamed = fit_train_tables_streamed(chunks, products, CacheConfig())
    assert calls == [0, 1]
    assert len(alive) == 2 * len(weeks) and not any(alive)
    _assert_same_tables(streamed, one_shot)


def test_an_iterator_that_is_not_fresh_is_refused(split):
    scan, weeks, products, _ = split
    once = _week_chunks(scan, [[w] for w in weeks])()  # one generator handed out twice: empty the second time
    with pytest.raises(ValueError, match="fresh iterator"):
        fit_train_tables_streamed(lambda: once, products, CacheConfig())
    with pytest.raises(ValueError, match="no chunk"):
        fit_train_tables_streamed(lambda: iter([]), products, CacheConfig())


def _random_groups(rng: np.random.Generator, n_groups: int, distinct: int) -> tuple[np.ndarray, np.ndarray]:
    """Group ids and values: group sizes 1…12 (odd and even), values from ``distinct`` log prices (ties)."""
    sizes = rng.integers(1, 13, n_groups)
    group = np.repeat(np.arange(n_groups), sizes)
    prices = np.log(rng.integers(1, 5000, distinct) / 100.0)
    return group, prices[rng.integers(0, distinct, len(group))]


@pytest.mark.parametrize("distinct", [3, 40, 100_000])
def test_median_from_value_counts_is_polars_and_numpy_median(distinct):
    rng = np.random.default_rng(distinct)
    group, value = _random_groups(rng, 3000, distinct)
    counts = (pl.DataFrame({"g": group, "v": value}).group_by("g", "v").len("n").sort("g", "v"))
    g = counts.get_column("g").to_numpy()
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    v, n = counts.get_column("v").to_numpy(), counts.get_column("n").to_numpy()
    like_polars = median_from_value_counts(v, n, starts)
    expected = pl.DataFrame({"g": group, "v": value}).group_by("g").agg(pl.col("v").median()).sort("g")
    assert np.array_equal(like_polars, expected.get_column("v").to_numpy())
    like_numpy = median_from_value_counts(v, n, starts, like="numpy")
    assert np.array_equal(like_numpy, [np.median(value[group == i]) for i in range(group.max() + 1)])
    if distinct > 1000:  # the two conventions really differ on these values: each was checked against its own
        assert not np.array_equal(like_polars, like_numpy)
    whole = median_from_value_counts(*[np.sort(value), np.ones(len(value), np.int64)], np.zeros(1, np.int64),
                                     like="numpy")
    assert whole[0] == np.median(value)


@pytest.mark.parametrize("n_lines", [1, 2, 5_000, 5_001])
def test_product_log_price_from_chunks_is_the_median_of_the_lines(n_lines):
    """Value counts summed over chunks give the median polars (per token) and numpy (all lines) take."""
    rng = np.random.default_rng(n_lines)
    vocab_size = 60
    tokens = rng.integers(3, 50, n_lines).astype(np.int32)  # tokens 0-2 and 50-59 have no line
    unit = rng.integers(0, 800, n_lines) / rng.integers(1, 4, n_lines) / 100.0  # ties; some below £0.001
    cuts = np.sort(rng.integers(0, n_lines + 1, 4))
    parts = [price_value_counts(t, u) for t, u in zip(np.split(tokens, cuts), np.split(unit, cuts), strict=True)]
    summed = pl.concat(parts).group_by("token", "log_price").agg(pl.col("lines").sum())
    log_unit = np.log(np.maximum(unit, 1e-3))
    per_token = pl.DataFrame({"t": tokens, "p": log_unit}).group_by("t").agg(pl.col("p").median())
    expected = np.full(vocab_size, np.median(log_unit), np.float32)
    expected[per_token.get_column("t").to_numpy()] = per_token.get_column("p").to_numpy()
    assert np.array_equal(product_log_price_from_counts(summed, vocab_size), expected)
    assert np.array_equal(build_product_log_price(tokens, unit, vocab_size), expected)
