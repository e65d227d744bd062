"""Serving features: client requests become exactly the cache's inputs, point in time, and bad input is named."""

import datetime as dt

import numpy as np
import polars as pl
import pytest

from retailsim_pipeline.config import N_SPECIAL, UNK
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.requests import FILES, REQUEST_SPLIT, ServingFeatures

#: The per-basket arrays a request must reproduce (``customer_key`` and ``labels`` are not inputs).
INPUT_ARRAYS = ("customer_index", "store_index", "temporal", "trip", "history_tokens", "history_counts",
                "past_baskets", "week", "tokens", "offsets", "line_log_price_ratio")
MEMORY = ("history_tokens", "history_counts", "past_baskets", "trip")
MAX_LEN = 50  # the cache's basket cut


@pytest.fixture(scope="module")
def cache(tiny_prepped) -> TensorCache:
    return TensorCache.latest(tiny_prepped.cache)


@pytest.fixture(scope="module")
def features(cache, tiny_prepped) -> ServingFeatures:
    return ServingFeatures.from_cache(cache, tiny_prepped.samples)


@pytest.fixture(scope="module")
def test_split(tiny_prepped) -> pl.DataFrame:
    return pl.read_parquet(tiny_prepped.samples / "test.parquet")


def client_requests(samples: pl.DataFrame, *, basket_id: bool = True) -> pl.DataFrame:
    """What a till would send for these logged baskets: codes, ISO text time, the lines (first 50)."""
    frame = samples.select(
        pl.col("cust_code").cast(pl.String).alias("customer_code"),
        pl.col("store_code").cast(pl.String),
        pl.format("{}T{}:00:00", pl.col("date"), pl.col("hour").cast(pl.String).str.zfill(2)).alias("timestamp"),
        pl.col("products").list.head(MAX_LEN).cast(pl.List(pl.String)),
        pl.col("spend").list.head(MAX_LEN).cast(pl.List(pl.Float64)),
        pl.col("quantity").list.head(MAX_LEN).cast(pl.List(pl.Int64)).alias("quantities"),
        "basket_id",
    )
    return frame if basket_id else frame.drop("basket_id")


def arrays_of(cache: TensorCache, split: str) -> dict[str, np.ndarray]:
    a = cache.split(split)
    return {name: np.asarray(getattr(a, name)) for name in INPUT_ARRAYS}


def rows_of(arrays: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """One basket's arrays (its lines for the CSR ones)."""
    lo, hi = arrays["offsets"][i], arrays["offsets"][i + 1]
    out = {k: v[i] for k, v in arrays.items() if k not in ("offsets", "tokens", "line_log_price_ratio")}
    return out | {"tokens": arrays["tokens"][lo:hi], "line_log_price_ratio": arrays["line_log_price_ratio"][lo:hi]}


def assert_same_rows(got: dict, want: dict, names=None) -> None:
    for name in names or got:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def served(features: ServingFeatures, requests) -> dict[str, np.ndarray]:
    return arrays_of(features.request_cache(requests), REQUEST_SPLIT)


def a_customer(features: ServingFeatures, min_baskets: int = 3) -> tuple[str, pl.DataFrame]:
    """A train-profiled customer with at least ``min_baskets`` logged baskets (their log, in time order)."""
    known = set(features.customers.get_column("cust_code").cast(pl.String).to_list())
    log = (features.baskets.with_columns(pl.col("cust_code").cast(pl.String))
           .filter(pl.col("cust_code").is_in(list(known))).sort("date", "hour", "basket_id"))
    counts = log.group_by("cust_code").len().filter(pl.col("len") >= min_baskets).sort("len", "cust_code",
                                                                                          descending=True)
    assert counts.height, "the tiny data should have a customer with several baskets"
    code = counts.get_column("cust_code")[0]
    return code, log.filter(pl.col("cust_code") == code)


def known_products(features: ServingFeatures, products) -> list[str]:
    vocab = set(features.product_codes[N_SPECIAL:])
    known = [p for p in products if p in vocab]
    assert known
    return known


def request(code, store, when: dt.datetime, products, **extra) -> dict:
    return {"customer_code": code, "store_code": store, "timestamp": when.isoformat(), "products": products, **extra}


# ---------------------------------------------------------------------- parity with the cache


def test_requests_of_logged_baskets_get_the_cache_arrays_exactly(cache, features, test_split):
    want = arrays_of(cache, "test")
    got = served(features, client_requests(test_split))
    assert len(got["offsets"]) == len(want["offsets"]) == test_split.height + 1
    assert_same_rows(got, want)
    # Not a vacuous match: the split has remembered customers, anonymous shoppers and priced lines.
    assert (want["past_baskets"] > 0).any() and (want["customer_index"] == 0).any()
    assert (want["history_counts"] > 0).any() and (want["line_log_price_ratio"] != 0).any()


def test_without_basket_id_a_request_comes_before_its_hours_logged_baskets(cache, tiny_prepped, features, test_split):
    """The rule: a request without the till's id comes before every logged basket of its customer's hour.
    So it equals the cache's basket unless the customer logged an earlier basket in that same hour, which
    then is *not* part of its history: one past basket fewer for each."""
    want = arrays_of(cache, "test")
    got = served(features, client_requests(test_split, basket_id=False))
    everything = pl.concat([pl.read_parquet(tiny_prepped.samples / f"{s}.parquet",
                                            columns=["basket_id", "cust_code", "date", "hour"])
                            for s in ("train", "validation", "test")])
    same_hour_before = (
        test_split.select("basket_id", "cust_code", "date", "hour").with_row_index("row")
        .join(everything, on=["cust_code", "date", "hour"], suffix="_other")  # inner: anonymous rows drop out
        .group_by("row").agg((pl.col("basket_id_other") < pl.col("basket_id")).sum().alias("n"))
    )
    earlier = np.zeros(test_split.height, dtype=np.int64)
    earlier[same_hour_before.get_column("row").to_numpy()] = same_hour_before.get_column("n").to_numpy()
    plain = np.flatnonzero(earlier == 0)
    assert len(plain) > test_split.height // 2
    for name in INPUT_ARRAYS:
        if name in MEMORY or name in ("offsets", "tokens", "line_log_price_ratio"):
            np.testing.assert_array_equal(got[name][plain], want[name][plain], err_msg=name)
        else:  # nothing but the memory depends on the order within the hour
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for i in plain:
        assert_same_rows(rows_of(got, i), rows_of(want, i), ["tokens", "line_log_price_ratio"])
    shifted = np.flatnonzero(earlier > 0)
    if len(shifted):  # the tiny data has a few customers with two baskets in one hour
        np.testing.assert_array_equal(got["past_baskets"][shifted], want["past_baskets"][shifted] - earlier[shifted])
        assert (got["history_counts"][shifted].sum(1) < want["history_counts"][shifted].sum(1)).all()


# ---------------------------------------------------------------------- point in time


def test_requests_of_one_customer_never_become_each_others_history(features):
    code, log = a_customer(features)
    store = log.get_column("store_code").cast(pl.String)[0]
    hours = log.select(pl.col("date").cast(pl.Datetime).dt.offset_by(pl.format("{}h", pl.col("hour")))).to_series()
    k = int((hours > hours[0]).arg_max())  # the first basket of a later hour than the first one
    assert hours[k] > hours[0]
    # At the hour of basket k, without a basket id: after baskets 0 … k - 1, before k (module docstring).
    early = request(code, store, hours[k], known_products(features, log.row(0, named=True)["products"])[:3])
    late = request(code, store, hours[-1] + dt.timedelta(days=2),
                   known_products(features, log.row(-1, named=True)["products"])[:2])
    alone = [served(features, [r]) for r in (early, late)]
    together = served(features, [early, late])
    backwards = served(features, [late, early])
    for i, j in ((0, 1), (1, 0)):
        assert_same_rows(rows_of(together, i), rows_of(alone[i], 0))
        assert_same_rows(rows_of(backwards, j), rows_of(alone[i], 0))
    # Each counts exactly its customer's logged baskets strictly before it (the late one: all of them).
    assert 0 < together["past_baskets"][0] == k < together["past_baskets"][1] == log.height


def test_a_request_before_every_basket_of_its_customer_has_an_empty_memory(features):
    code, log = a_customer(features)
    first = log.row(0, named=True)
    before = dt.datetime.combine(first["date"], dt.time(0)) - dt.timedelta(days=1)
    got = served(features, [request(code, first["store_code"], before, first["products"][:3])])
    assert got["past_baskets"][0] == 0 and (got["history_counts"][0] == 0).all()
    assert got["customer_index"][0] > 0  # still the known customer, just nothing before this time
    later = before + dt.timedelta(days=400)
    after = served(features, [request(code, first["store_code"], later, first["products"][:3])])
    assert after["past_baskets"][0] == log.height and after["history_counts"][0].sum() > 0


# ---------------------------------------------------------------------- unknown and missing values


def test_unknown_customer_anonymous_store_and_products(features):
    code, log = a_customer(features)
    row = log.row(-1, named=True)
    when = dt.datetime.combine(row["date"], dt.time(row["hour"])) + dt.timedelta(days=1)
    products = known_products(features, row["products"])[:3]
    store = row["store_code"]
    known = served(features, [request(code, store, when, products)])
    assert known["customer_index"][0] > 0 and known["past_baskets"][0] > 0 and known["store_index"][0] > 0
    for who in ("NOT_A_CUSTOMER", None):
        got = served(features, [request(who, store, when, products)])
        assert got["customer_index"][0] == 0 and got["past_baskets"][0] == 0 and (got["history_counts"][0] == 0).all()
        assert_same_rows(got, known, ["store_index", "tokens", "temporal", "week"])
    no_column = served(features, [{k: v for k, v in request(code, store, when, products).items()
                                   if k != "customer_code"}])
    assert_same_rows(no_column, served(features, [request(None, store, when, products)]))

    unknown_store = served(features, [request(code, "NOT_A_STORE", when, products)])
    assert unknown_store["store_index"][0] == 0 and unknown_store["customer_index"][0] == known["customer_index"][0]

    mixed = ["NOT_A_PRODUCT", products[0], "ALSO_NOT_ONE"]
    got = served(features, [request(code, store, when, mixed), request(code, store, when, products)])
    vocab = features.product_codes
    assert [vocab[t] if t >= N_SPECIAL else t for t in got["tokens"][:3]] == [UNK, products[0], UNK]
    np.testing.assert_array_equal(features.count_unknown([request(code, store, when, mixed),
                                                         request(code, store, when, products),
                                                         request(code, store, when, [])]), [2, 0, 0])


def test_missing_spend_gives_a_neutral_price_and_quantities_default_to_one(features, test_split):
    vocab = features.product_codes[N_SPECIAL:]
    row = test_split.filter(pl.col("products").list.head(3).cast(pl.List(pl.String)).list.eval(
        pl.element().is_in(vocab)).list.all() & (pl.col("n_lines") >= 3)).row(0, named=True)
    base = {"customer_code": row["cust_code"], "store_code": row["store_code"],
            "timestamp": dt.datetime.combine(row["date"], dt.time(row["hour"])), "products": row["products"][:3]}
    spend = [s * 1.7 for s in row["spend"][:3]]  # off the median, so a given spend moves the ratio
    given = features.request_cache([{**base, "spend": spend}]).split(REQUEST_SPLIT)
    assert (np.asarray(given.line_log_price_ratio) != 0).all()
    for without in ({**base}, {**base, "spend": None}, {**base, "spend": [None, spend[1], None]}):
        got = features.request_cache([without]).split(REQUEST_SPLIT)
        ratio = np.asarray(got.line_log_price_ratio)
        missing = [0, 1, 2] if without.get("spend") is None else [0, 2]
        assert (ratio[missing] == 0).all()
        np.testing.assert_array_equal(np.delete(ratio, missing), np.delete(np.asarray(given.line_log_price_ratio),
                                                                            missing))
        np.testing.assert_array_equal(np.asarray(got.line_quantity), [1, 1, 1])
    quantities = features.request_cache([{**base, "quantities": [3, None, 2]}]).split(REQUEST_SPLIT)
    np.testing.assert_array_equal(np.asarray(quantities.line_quantity), [3, 1, 2])


# ---------------------------------------------------------------------- bad input


GOOD = {"customer_code": None, "store_code": "S", "timestamp": "2006-06-19T10:00:00", "products": ["A", "B"]}


@pytest.mark.parametrize("change, match", [
    ({"products": "PRD0900001"}, r"row 1, column 'products'"),
    ({"products": 7}, r"row 1, column 'products'"),
    ({"products": None}, r"row 1, column 'products'"),
    ({"spend": [1.0]}, r"row 1, column 'spend': 1 values for 2 products"),
    ({"spend": 3.5}, r"row 1, column 'spend'"),
    ({"spend": "12"}, r"row 1, column 'spend'"),
    ({"quantities": [1, 1, 1]}, r"row 1, column 'quantities'"),
    ({"timestamp": "next tuesday"}, r"row 1, column 'timestamp'"),
    ({"timestamp": None}, r"row 1, column 'timestamp'"),
    ({"store_code": None}, r"row 1, column 'store_code'"),
    ({"basket_id": 4}, r"row 0, column 'basket_id': 4 appears more than once"),
    ({"coupon": "X"}, r"unknown column\(s\) \['coupon'\]"),
])
def test_bad_requests_name_the_row_and_column(features, change, match):
    rows = [{**GOOD, "basket_id": 4}, {**GOOD, "basket_id": 5, **change}]
    features.request_cache([rows[0], {**GOOD, "basket_id": 5}])  # the good rows pass
    with pytest.raises(ValueError, match=match):
        features.request_cache(rows)


@pytest.mark.parametrize("column", ["store_code", "timestamp", "products"])
def test_a_missing_required_column_is_named(features, column):
    rows = [{k: v for k, v in GOOD.items() if k != column}] * 2
    with pytest.raises(ValueError, match=rf"missing column\(s\) \['{column}'\]"):
        features.request_cache(rows)


def test_bad_polars_columns_are_named(features):
    frame = pl.DataFrame({"store_code": ["S", "S"], "timestamp": ["2006-06-19T10:00:00"] * 2,
                          "products": [["A"], ["B", "C"]]})
    with pytest.raises(ValueError, match=r"row 0, column 'products'"):
        features.normalize(frame.with_columns(pl.lit("A").alias("products")))
    with pytest.raises(ValueError, match=r"row 1, column 'spend': 1 values for 2 products"):
        features.normalize(frame.with_columns(pl.Series("spend", [[1.0], [2.0]])))
    with pytest.raises(ValueError, match=r"row 0, column 'spend'"):
        features.normalize(frame.with_columns(pl.Series("spend", [1.0, 2.0])))
    with pytest.raises(ValueError, match=r"column 'timestamp'"):
        features.normalize(frame.with_columns(pl.lit(5).alias("timestamp")))


# ---------------------------------------------------------------------- files and input types


def test_save_load_round_trip_in_plain_files(features, test_split, tmp_path):
    requests = client_requests(test_split.head(60))
    written = features.save(tmp_path / "features")
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == sorted(FILES) == sorted(written)
    assert {p.suffix for p in (tmp_path / "features").iterdir()} == {".json", ".parquet", ".safetensors"}
    for path in (tmp_path / "features").iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"
    loaded = ServingFeatures.load(tmp_path / "features")
    assert loaded.product_codes == features.product_codes
    assert_same_rows(served(loaded, requests), served(features, requests))


def test_pandas_frames_with_array_cells_read_like_polars_and_dicts(features, test_split):
    requests = client_requests(test_split.head(80))
    assert requests.get_column("customer_code").null_count() > 0  # anonymous rows go through pandas too
    want = served(features, requests)
    frame = requests.with_columns(pl.col("timestamp").str.to_datetime()).to_pandas()
    assert isinstance(frame["products"].iloc[0], np.ndarray) and isinstance(frame["spend"].iloc[0], np.ndarray)
    assert_same_rows(served(features, frame), want)
    assert_same_rows(served(features, requests.to_dicts()), want)
    assert_same_rows(served(features, requests.to_pandas()), want)  # ISO text time in pandas too


def test_a_timestamps_utc_offset_is_dropped_not_applied(tiny_prepped):
    """Store data has no time zone: '09:00+02:00' is 9 o'clock at the store, as '09:00' is."""
    from retailsim_pipeline.prep.cache import TensorCache
    from retailsim_pipeline.prep.requests import ServingFeatures

    features = ServingFeatures.from_cache(TensorCache.latest(tiny_prepped.cache), tiny_prepped.samples)
    base = {"store_code": "1", "products": []}
    frame = features.normalize([{**base, "timestamp": t} for t in
                                ("2007-03-01T09:00:00+02:00", "2007-03-01T09:00:00Z", "2007-03-01T09:00")])
    assert frame.get_column("hour").to_list() == [9, 9, 9]
