"""TripStream: the trip context of time-ordered chunks equals the one-shot trip_features_all, bit for bit."""

import re

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from retailsim_pipeline.config import TRIP_WIDTH
from retailsim_pipeline.prep.features import TripStream, trip_features_all
from retailsim_pipeline.prep.fitting import home_stores
from retailsim_pipeline.prep.samples import SPLITS, scan_samples


@pytest.fixture(scope="module")
def frames(tiny_prepped) -> dict[str, pl.DataFrame]:
    return {s: scan_samples(tiny_prepped.samples, s).collect() for s in SPLITS}


@pytest.fixture(scope="module")
def home(frames) -> pl.DataFrame:
    return home_stores(frames["train"])


@pytest.fixture(scope="module")
def one_shot(frames, home) -> pl.DataFrame:
    return trip_features_all(frames, home)


def week_chunks(frames: dict[str, pl.DataFrame], weeks_per_chunk: int) -> list[pl.DataFrame]:
    """Chunks of ``weeks_per_chunk`` whole weeks of one split, train → validation → test, weeks ascending."""
    chunks = []
    for split in SPLITS:
        f = frames[split]
        weeks = f.get_column("week").unique().sort().to_list()
        for i in range(0, len(weeks), weeks_per_chunk):
            chunks.append(f.filter(pl.col("week").is_in(weeks[i:i + weeks_per_chunk])))
    return chunks


def stream(chunks: list[pl.DataFrame], home: pl.DataFrame) -> tuple[pl.DataFrame, TripStream]:
    trips = TripStream(home)
    return pl.concat([trips.step(c) for c in chunks]), trips


def assert_bit_identical(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Same names, order and dtypes, and the same float32 bits in every cell (not just == : -0.0, NaN)."""
    assert got.columns == want.columns and got.schema == want.schema
    assert got.width == 1 + TRIP_WIDTH and all(d == pl.Float32 for d in got.schema.dtypes()[1:])
    assert_frame_equal(got, want, check_exact=True)
    assert np.array_equal(got.drop("basket_id").to_numpy().view(np.uint32),
                          want.drop("basket_id").to_numpy().view(np.uint32))


def in_order_of(basket_ids: pl.Series, features: pl.DataFrame) -> pl.DataFrame:
    return basket_ids.to_frame().join(features, on="basket_id", how="left", maintain_order="left")


def spanning_customers(chunks: list[pl.DataFrame]) -> int:
    """Carded customers with baskets in more than one chunk: the ones whose history crosses a state."""
    per_chunk = pl.concat([c.select(pl.col("cust_code").cast(pl.String)).drop_nulls().unique() for c in chunks])
    return per_chunk.group_by("cust_code").len().filter(pl.col("len") > 1).height


@pytest.mark.parametrize("weeks_per_chunk", [1, 3, 1000], ids=["1-week", "3-weeks", "one-per-split"])
def test_chunked_stream_equals_the_one_shot_features_bit_for_bit(frames, home, one_shot, weeks_per_chunk):
    chunks = week_chunks(frames, weeks_per_chunk)
    assert len(chunks) >= len(SPLITS) and (weeks_per_chunk < 1000 or len(chunks) == len(SPLITS))
    assert spanning_customers(chunks) > 100  # the carried state is exercised, not only first chunks
    got, trips = stream(chunks, home)
    ids = pl.concat([c.get_column("basket_id") for c in chunks])
    assert got.get_column("basket_id").equals(ids)  # row i = chunk row i
    assert_bit_identical(got, in_order_of(ids, one_shot))
    # Anonymous baskets are in the data, zeroed, and leave no state: one row per carded customer.
    everyone = pl.concat([c.get_column("cust_code").cast(pl.String) for c in chunks])
    assert got.filter(pl.col("bucket_anonymous") == 1).height == everyone.null_count() > 0
    assert trips.state.height == everyone.drop_nulls().n_unique()
    assert trips.state.get_column("cust_code").is_unique().all()


def test_rows_in_any_order_within_a_chunk(frames, home, one_shot):
    chunks = [c.sample(fraction=1.0, shuffle=True, seed=i) for i, c in enumerate(week_chunks(frames, 2))]
    assert not chunks[0].get_column("basket_id").is_sorted()
    got, _ = stream(chunks, home)
    ids = pl.concat([c.get_column("basket_id") for c in chunks])
    assert got.get_column("basket_id").equals(ids)
    assert_bit_identical(got, in_order_of(ids, one_shot))


@pytest.mark.parametrize("weeks_per_chunk", [1, 3])
def test_grouped_by_the_customer_keys_the_same_bits(frames, home, one_shot, weeks_per_chunk):
    """With the SequenceState's customer keys (as the cache builder calls it) the rows are grouped by an
    integer, not by the codes: the same features bit for bit, the same state; rows shuffled in a chunk."""
    from retailsim_pipeline.prep.history import SequenceState

    chunks = [c.sample(fraction=1.0, shuffle=True, seed=i) for i, c in enumerate(week_chunks(frames, weeks_per_chunk))]
    sequence = SequenceState(pl.concat([c.get_column("cust_code").cast(pl.String) for c in chunks]))
    keyed, plain = TripStream(home), TripStream(home)
    got = []
    for c in chunks:
        key, _ = sequence.advance(c.select("basket_id", "cust_code", "date", "hour"))
        assert (key == 0).any() and (key > 0).any()
        got.append(keyed.step(c, key))
        plain.step(c)
    got = pl.concat(got)
    ids = pl.concat([c.get_column("basket_id") for c in chunks])
    assert got.get_column("basket_id").equals(ids)
    assert_bit_identical(got, in_order_of(ids, one_shot))
    assert_frame_equal(keyed.state.drop("__key").sort("cust_code"), plain.state.drop("__key").sort("cust_code"),
                       check_exact=True)
    assert keyed.state.get_column("__key").null_count() == 0 and plain.state.get_column("__key").null_count() == plain.state.height
    later = chunks[0].with_columns(pl.col("date") + pl.duration(days=10_000))  # after everything: in time order
    fresh_keys, _ = SequenceState(later.get_column("cust_code").cast(pl.String)).advance(
        later.select("basket_id", "cust_code", "date", "hour"))
    with pytest.raises(ValueError, match="give them with every chunk or with none"):
        plain.step(later, fresh_keys)  # keys now, none before: refused rather than mis-grouped


def synthetic_baskets(template: pl.DataFrame) -> pl.DataFrame:
    """Customer A: 300 baskets over 150 days with spends 0.1, 0.2, 0.3 …; customer B: a few; and
    anonymous baskets. Every other column copies one real carded basket (the dtypes of the samples)."""
    n = 360
    i = np.arange(n)
    cust = np.where(i < 300, "A", np.where(i < 340, "B", None))
    day = np.where(i < 300, i // 2, (i - 300) * 3 % 150)
    spend = [[round(0.1 * (k % 9 + 1), 1), round(0.01 * k + 0.3, 2), 0.7] for k in range(n)]
    row = template.filter(pl.col("cust_code").is_not_null()).head(1)
    return (pl.concat([row] * n)
            .with_columns(
                pl.Series("basket_id", 10_000_000 + i, pl.Int64),
                pl.Series("date", np.datetime64("2006-04-02") + day.astype("timedelta64[D]"), pl.Date),
                pl.Series("hour", 8 + i % 2 * 9, pl.Int8),
                pl.Series("cust_code", cust, pl.String),
                pl.Series("spend", spend, pl.List(pl.Float64)),
                pl.Series("n_lines", i % 5 + 1, pl.UInt32),
            ))


def test_float32_association_matters_and_the_carried_sums_keep_the_bits(frames, home):
    baskets = synthetic_baskets(frames["train"])
    one_shot = trip_features_all({"all": baskets}, home)
    edges = np.array(["2006-04-03", "2006-04-10", "2006-06-01", "2006-07-20"], dtype="datetime64[D]")
    chunk_of = pl.Series(np.searchsorted(edges, baskets.get_column("date").to_numpy(), side="right"))
    chunks = [baskets.filter(chunk_of == k).sample(fraction=1.0, shuffle=True, seed=k) for k in range(len(edges) + 1)]
    assert sum((c.get_column("cust_code") == "A").any() for c in chunks) == 5  # A spans every chunk

    # The data is sensitive: polars sums float32 spends in a float64 accumulator; a state rounded to
    # float32 at each chunk boundary changes the float32 past spend of some of A's baskets.
    a = (baskets.with_columns(chunk_of.alias("chunk")).filter(pl.col("cust_code") == "A")
         .sort("date", "hour", "basket_id"))
    spends = a.get_column("spend").list.sum().cast(pl.Float32).to_numpy().astype(np.float64)
    exact = np.cumsum(spends)
    rounded_state = exact.copy()
    for start in np.flatnonzero(np.diff(a.get_column("chunk").to_numpy())) + 1:
        carry = np.float64(np.float32(rounded_state[start - 1]))
        rounded_state[start:] = np.cumsum(np.r_[carry, spends[start:]])[1:]
    assert (rounded_state.astype(np.float32) != exact.astype(np.float32)).sum() > 5

    got, trips = stream(chunks, home)
    ids = pl.concat([c.get_column("basket_id") for c in chunks])
    assert_bit_identical(got, in_order_of(ids, one_shot))
    past_spend = got.join(a.select("basket_id"), on="basket_id", how="semi").get_column("past_mean_spend")
    assert past_spend.n_unique() > 250  # the spend history really moves
    state = trips.state.filter(pl.col("cust_code") == "A")
    assert state.get_column("__ind_spend").item() == exact[-1]  # the float64 accumulator, not a rounding
    assert state.get_column("__ind_trips").item() == 300.0
    assert trips.state.height == 2  # A and B; the anonymous baskets carry nothing


def test_a_chunk_earlier_than_a_customers_earlier_chunk_is_refused_by_name(frames, home):
    week9, week10 = (frames["train"].filter(pl.col("week") == w).with_columns(pl.col("cust_code").cast(pl.String))
                     for w in (200609, 200610))
    trips = TripStream(home)
    trips.step(week10)
    state = trips.state
    cust = week9.join(week10, on="cust_code", how="semi").get_column("cust_code").min()  # first in the message
    first = week9.filter(pl.col("cust_code") == cust).get_column("date").min()
    last = week10.filter(pl.col("cust_code") == cust).get_column("date").max()
    with pytest.raises(ValueError, match=rf"customer {re.escape(cust)}'s basket \d+ of {first} .* of {last} .*came "
                                         r"in an earlier chunk.*Feed the chunks in time order"):
        trips.step(week9)
    assert trips.state.equals(state)  # a refused chunk changes nothing
    with pytest.raises(ValueError, match="came in an earlier chunk"):
        trips.step(week10)  # the same baskets again: not after themselves
