"""Feature functions of the tensor cache: pure functions of arrays and frames, nothing fitted.

Shared by the cache builder (:mod:`~retailsim_pipeline.prep.cache_build`), the batch assembly
(price features are computed per batch, not stored) and, later, the serving code; none reads a file
or a fitted table beyond what it is handed.

* :func:`price_features` — Fourier code of a line's price, [..., price_dim].
* :func:`temporal_features` — when the basket happens, [N, 64].
* :func:`trip_features` — what is known about the trip before its basket is filled, [N, 48]; its
  history counts the customer's baskets strictly before the basket, in any split, so nothing at or
  after the basket reaches its features (:func:`~retailsim_pipeline.prep.cache_checks.check_leakage`
  perturbs a basket and everything after it to verify it). :class:`TripStream` computes the same,
  bit for bit, from time-ordered chunks of baskets with memory bounded by the number of customers.
* :func:`history_vector` — the mean product embedding of a point-in-time memory
  (:mod:`~retailsim_pipeline.prep.history`), [N, d].
"""

import numpy as np
import polars as pl

from retailsim_pipeline.config import TEMPORAL_WIDTH, TRIP_WIDTH
from retailsim_pipeline.prep.samples import LABELS
from retailsim_pipeline.prep.schema import (
    FIRST_WEEK,
    LABEL_CODES,
    LIFESTAGE_CODES,
    PRICE_SENSITIVITY_CODES,
    STORE_FORMAT_CODES,
    WEEKS_PER_YEAR,
)

def price_features(log_ratio: np.ndarray, log_price: np.ndarray, dim: int) -> np.ndarray:
    """Fourier encoding of a line's price: [..., dim] float32 (``dim``: ``CacheConfig.price_dim``, the
    cache manifest's ``widths["price"]``; a multiple of 4).

    First half: the log of the unit price relative to the product's train median (promotions,
    store price levels); second half: the product's log median price (budget vs premium). Each is
    encoded as sin/cos at ``dim // 4`` geometric frequencies, so nearby prices get nearby codes.
    """
    if dim < 4 or dim % 4:
        raise ValueError(f"price feature width {dim} is not a positive multiple of 4")
    quarter = dim // 4
    freqs_ratio = (2.0 ** np.arange(quarter, dtype=np.float32)) * np.float32(np.pi / 4)  # ratio in ~[-2, 2]
    freqs_price = (2.0 ** np.arange(quarter, dtype=np.float32)) * np.float32(np.pi / 16)  # log £ in ~[-3, 4]
    r = np.asarray(log_ratio, dtype=np.float32)[..., None] * freqs_ratio
    p = np.asarray(log_price, dtype=np.float32)[..., None] * freqs_price
    return np.concatenate([np.sin(r), np.cos(r), np.sin(p), np.cos(p)], axis=-1).astype(np.float32)


def temporal_features(
    week_idx: np.ndarray, day_of_year: np.ndarray, month: np.ndarray, weekday: np.ndarray, hour: np.ndarray,
    trend_scale: float,
) -> np.ndarray:
    """When the basket happens: [N, TEMPORAL_WIDTH = 64] float32.

    day of year sin/cos k = 1..4 (8) · fiscal week of year sin/cos k = 1..3 (6) · weekday one-hot (7)
    + sin/cos (2) · weekend flag (1) · hour one-hot (24) + sin/cos (2) · month one-hot (12) ·
    trend = weeks since 200607 / ``trend_scale`` and its square (2).
    """
    n = len(week_idx)
    out = np.zeros((n, TEMPORAL_WIDTH), dtype=np.float32)
    doy = 2 * np.pi * np.asarray(day_of_year, np.float32) / 365.25
    woy = 2 * np.pi * ((np.asarray(week_idx) + 6) % 52).astype(np.float32) / 52
    col = 0
    for k in range(1, 5):
        out[:, col], out[:, col + 1] = np.sin(k * doy), np.cos(k * doy)
        col += 2
    for k in range(1, 4):
        out[:, col], out[:, col + 1] = np.sin(k * woy), np.cos(k * woy)
        col += 2
    wd = np.asarray(weekday, np.int64)
    out[np.arange(n), col + wd - 1] = 1.0
    col += 7
    ang = 2 * np.pi * (wd - 1) / 7
    out[:, col], out[:, col + 1] = np.sin(ang), np.cos(ang)
    out[:, col + 2] = (wd == 1) | (wd == 7)
    col += 3
    hr = np.asarray(hour, np.int64)
    out[np.arange(n), col + hr] = 1.0
    col += 24
    ang = 2 * np.pi * hr / 24
    out[:, col], out[:, col + 1] = np.sin(ang), np.cos(ang)
    col += 2
    out[np.arange(n), col + np.asarray(month, np.int64) - 1] = 1.0
    col += 12
    trend = np.asarray(week_idx, np.float32) / max(trend_scale, 1.0)
    out[:, col], out[:, col + 1] = trend, trend**2
    assert col + 2 == TEMPORAL_WIDTH, col + 2
    return out



def history_vector(tokens: np.ndarray, counts: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """The count-weighted mean embedding of each memory: [N, d] float32 (zero for an empty memory).

    ``tokens`` [N, K] and ``counts`` [N, K] are point-in-time memories
    (:func:`~retailsim_pipeline.prep.history.point_in_time_memory`; PAD slots have count 0),
    ``embeddings`` [V, d] the product table's first ``d`` columns. What this shopper has bought until
    now, in the product space: the customer's history part of the context vector.
    """
    weights = np.asarray(counts, dtype=np.float32)  # [N, K]
    total = weights.sum(axis=1, keepdims=True)  # [N, 1]
    summed = np.einsum("nk,nkd->nd", weights, np.asarray(embeddings, dtype=np.float32)[np.asarray(tokens)])
    return (summed / np.maximum(total, 1.0)).astype(np.float32)


def week_index_expr(week: pl.Expr) -> pl.Expr:
    """Vectorized :func:`schema.week_index`: weeks since 200607."""
    w = week.cast(pl.Int64)
    return (w // 100 - FIRST_WEEK // 100) * WEEKS_PER_YEAR + w % 100 - FIRST_WEEK % 100


def one_hot_exprs(col: str, codes: tuple[str, ...], prefix: str) -> list[pl.Expr]:
    """One float column per code; works on Enum columns (compared without building strings) and String."""
    return [(pl.col(col) == c).fill_null(False).cast(pl.Float32).alias(f"{prefix}_{c}") for c in codes]


_TRIP_HISTORY_LABELS = {
    "basket_type": LABEL_CODES["BASKET_TYPE"],
    "basket_dominant_mission": LABEL_CODES["BASKET_DOMINANT_MISSION"],
    "basket_size": LABEL_CODES["BASKET_SIZE"],
    "basket_price_sensitivity": LABEL_CODES["BASKET_PRICE_SENSITIVITY"],
}


#: The order of a customer's baskets (:func:`~retailsim_pipeline.prep.history.customer_sequence`'s).
_TIME_ORDER = ("date", "hour", "basket_id")
#: What a basket adds to its customer's history: one Float64 column each, summed over past baskets.
_INCREMENTS = (
    *(f"__ind_{label}_{code}" for label, codes in _TRIP_HISTORY_LABELS.items() for code in codes),
    "__ind_trips", "__ind_lines", "__ind_spend",
)


def _trip_inputs(frame: pl.DataFrame) -> pl.DataFrame:
    """The columns of a basket-samples frame the trip context reads; customer and store codes as String
    (comparable across frames and with ``home_store``)."""
    return frame.select(
        "basket_id", "cust_code", "store_code", "store_format", "date", "hour", "weekday", "n_lines", "spend",
        "cust_price_sensitivity", "cust_lifestage", *LABELS,
    ).with_columns(pl.col("cust_code").cast(pl.String), pl.col("store_code").cast(pl.String))


def _with_increments(samples: pl.DataFrame) -> pl.DataFrame:
    """``samples`` + the :data:`_INCREMENTS` columns of each basket (Float64).

    Float64 because the running sums accumulate in float64 (as polars' float32 ``cum_sum`` does
    internally) and a carried state (:class:`TripStream`) must hold the accumulator, not its float32
    rounding. The basket's spend is rounded to float32 first, as the features have always summed it.
    """
    return samples.with_columns(
        *[(pl.col(label) == code).fill_null(False).cast(pl.Float64).alias(f"__ind_{label}_{code}")
          for label, codes in _TRIP_HISTORY_LABELS.items() for code in codes],
        pl.lit(1.0, pl.Float64).alias("__ind_trips"),
        pl.col("n_lines").cast(pl.Float64).alias("__ind_lines"),
        pl.col("spend").list.sum().cast(pl.Float32).cast(pl.Float64).alias("__ind_spend"),
    )


def _with_history(df: pl.DataFrame, by: str = "cust_code") -> pl.DataFrame:
    """Per-customer running sums of a frame sorted by customer (column ``by``: ``cust_code``, or an integer
    key with one value per customer, null where ``cust_code`` is), then :data:`_TIME_ORDER`.

    Adds ``__cum_*`` (Float64, inclusive: this basket and every earlier row of its customer),
    ``__past_*`` (Float32, exclusive: strictly before this basket) for every :data:`_INCREMENTS`
    column, and ``__last_date`` (the previous row's date, null for a customer's first row). A row may
    be a carried state (:class:`TripStream`): its increments are then the sums of everything before
    the frame. An anonymous row (null ``cust_code``, sorted last) is a run of its own: its sums are
    never read (:func:`_trip_columns` zeroes them), and one run of every anonymous basket would make
    the spend's step-major sum take one step per anonymous basket.
    """
    n = df.height
    cust = df.get_column(by)
    starts = (cust.ne_missing(cust.shift(1)) | cust.is_null()).fill_null(True).to_numpy()
    starts[:1] = True  # the first row begins a run
    run_start = np.flatnonzero(starts)
    run_length = np.diff(np.r_[run_start, n])
    cums, pasts = {}, {}
    for c in _INCREMENTS:
        values = df.get_column(c).to_numpy().astype(np.float64, copy=False)  # [n]
        if c == "__ind_spend":
            # Not an integer: its sums need the per-run sequential additions.
            cum = _segmented_cumsum(values[:, None], starts)[:, 0]
        else:
            # A count, exact in float64 below 2^53: a running sum over the whole frame minus the sum before
            # each run equals the per-run sum bit for bit (one contiguous column at a time: ~2x a 2-D block).
            running = np.cumsum(values)
            cum = running - np.repeat(np.r_[0.0, running[run_start[1:] - 1]], run_length) if n else running
        # Exclusive sums shifted from the inclusive ones, not "inclusive sum - own value": in floating
        # point (a + b) - b is not a, so the own spend would leak into the last bits.
        past = np.empty(n, dtype=np.float32)
        past[1:] = cum[:-1]
        past[starts] = 0.0
        cums[c.replace("__ind_", "__cum_")], pasts[c.replace("__ind_", "__past_")] = cum, past
    date = df.get_column("date")
    return df.with_columns(
        *[pl.Series(name, values) for name, values in cums.items()],
        *[pl.Series(name, values) for name, values in pasts.items()],
        pl.when(pl.Series(starts)).then(None).otherwise(date.shift(1)).alias("__last_date") if n else
        date.alias("__last_date"),
    )


def _segmented_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Inclusive running sums of ``values`` [n, c] within runs of rows (a run begins where ``starts``),
    each row added to the previous row's sum in order — the very additions of a sequential float64
    ``cum_sum`` per run, so the sums are bit-identical to it.

    Vectorized over runs, with slices only: the rows are laid out step-major (the first row of every
    run, then the second row of every run at least 2 long, ...) with the runs longest first, so the
    runs still going at step r are a prefix of those at step r - 1, and step r is one slice added to
    the head of the previous step's slice."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if not n:
        return values.copy()
    index = np.arange(n)
    run_start = np.flatnonzero(starts)
    length = np.diff(np.r_[run_start, n])
    by_length = np.argsort(-length, kind="stable")  # runs, longest first
    # Step-major order: for step r, the r-th row of each run longer than r, runs in by_length order.
    rank_of_run = np.empty(len(length), dtype=np.int64)
    rank_of_run[by_length] = np.arange(len(length))
    run = np.cumsum(starts) - 1  # [n] the row's run
    position = index - run_start[run]
    alive = np.bincount(position, minlength=int(length.max()))  # runs still going at each step
    step_start = np.r_[0, np.cumsum(alive)[:-1]]
    layout = np.empty(n, dtype=np.int64)
    layout[step_start[position] + rank_of_run[run]] = index  # layout slot -> row
    out = values[layout]
    for r in range(1, len(alive)):
        a, prev = step_start[r], step_start[r - 1]
        out[a:a + alive[r]] += out[prev:prev + alive[r]]
    result = np.empty_like(out)
    result[layout] = out
    return result


def _trip_columns(df: pl.DataFrame, home_store: pl.DataFrame, *keep: str) -> pl.DataFrame:
    """``basket_id`` + the TRIP_WIDTH trip columns (+ ``keep``) of a :func:`_with_history` frame, in its
    row order."""
    carded = pl.col("cust_code").is_not_null()
    n_past = pl.col("__past_trips")
    safe = pl.max_horizontal(n_past, pl.lit(1.0))
    hist_cols = [(pl.col(f"__past_{label}_{code}") / safe).alias(f"past_{label}_{code}")
                 for label, codes in _TRIP_HISTORY_LABELS.items() for code in codes]
    days = (pl.col("date") - pl.col("__last_date")).dt.total_days().cast(pl.Float32)
    hour = pl.col("hour")
    weekday = pl.col("weekday")
    # Anonymous baskets share the null key, so their cumulative sums are meaningless: zero them.
    history = [
        *hist_cols,
        pl.when(days.is_not_null()).then(days.log1p()).otherwise(0.0).alias("log_days_since_last"),
        days.is_not_null().cast(pl.Float32).alias("has_previous"),
        n_past.log1p().alias("log_past_trips"),
        (pl.col("__past_lines") / safe).log1p().alias("past_mean_lines"),
        (pl.col("__past_spend") / safe).log1p().alias("past_mean_spend"),
    ]
    history = [pl.when(carded).then(f).otherwise(0.0).cast(pl.Float32).alias(f.meta.output_name())
               for f in history]
    context = [
        (~carded).cast(pl.Float32).alias("bucket_anonymous"),
        (carded & (n_past == 0)).cast(pl.Float32).alias("bucket_0"),
        (carded & n_past.is_between(1, 2)).cast(pl.Float32).alias("bucket_1_2"),
        (carded & n_past.is_between(3, 9)).cast(pl.Float32).alias("bucket_3_9"),
        (carded & (n_past >= 10)).cast(pl.Float32).alias("bucket_10p"),
        carded.cast(pl.Float32).alias("carded"),
        *one_hot_exprs("cust_price_sensitivity", PRICE_SENSITIVITY_CODES, "card_ps"),
        *one_hot_exprs("cust_lifestage", LIFESTAGE_CODES, "card_ls"),
        *one_hot_exprs("store_format", STORE_FORMAT_CODES, "store_format"),
        (pl.col("store_code") == pl.col("home_store")).fill_null(False).cast(pl.Float32).alias("at_home_store"),
        (hour < 11).cast(pl.Float32).alias("hour_morning"),
        hour.is_between(11, 13).cast(pl.Float32).alias("hour_lunch"),
        hour.is_between(14, 16).cast(pl.Float32).alias("hour_afternoon"),
        (hour >= 17).cast(pl.Float32).alias("hour_evening"),
        ((weekday == 1) | (weekday == 7)).cast(pl.Float32).alias("weekend"),
    ]
    out = (df.join(home_store, on="cust_code", how="left", maintain_order="left")
           .select("basket_id", *history, *context, *keep))
    assert out.width == 1 + TRIP_WIDTH + len(keep), out.width
    return out


def trip_features(samples: pl.DataFrame, home_store: pl.DataFrame) -> pl.DataFrame:
    """What is known about a trip before its basket is filled: ``basket_id`` + TRIP_WIDTH = 48 float32
    columns, one row per basket, sorted by customer (anonymous last), then date, hour, basket id.

    ``samples`` holds the baskets of every split (columns of ``basket_samples``, ``cust_code`` and
    ``store_code`` as String); ``home_store`` is cust_code, home_store (String). A customer's history
    comes from their baskets strictly before this one in any split (by date, hour, basket id: the
    order of :func:`~retailsim_pipeline.prep.history.customer_sequence`), never from the basket itself
    or a later one. :class:`TripStream` computes the same columns, bit for bit, a chunk of time at a time.

    past mix of basket_type (4), dominant mission (5), size (3), price sensitivity (4) · log1p days
    since the last trip, has-previous flag, log1p past trips (3) · cold-start bucket one-hot:
    anonymous, 0, 1–2, 3–9, 10+ trips (5) · carded flag + price-sensitivity (4) and lifestage (7)
    one-hots of the card (12) · store format one-hot (4) + at-home-store flag (1) · hour bucket:
    < 11, 11–14, 14–17, ≥ 17 (4) · weekend flag (1) · past mean lines and spend per trip, log1p (2).
    """
    df = _with_increments(samples).sort("cust_code", *_TIME_ORDER, nulls_last=True)
    return _trip_columns(_with_history(df), home_store)


def trip_features_all(frames: dict[str, pl.DataFrame], home: pl.DataFrame) -> pl.DataFrame:
    """:func:`trip_features` of every basket of every split (history from every split, as of each basket)."""
    return trip_features(pl.concat([_trip_inputs(f) for f in frames.values()]), home)


class TripStream:
    """:func:`trip_features` computed a chunk of baskets at a time, with memory bounded by the customers.

    Feed :meth:`step` the baskets in time order: each chunk's baskets (rows in any order) come after
    every basket of the same customer in the chunks before it (whole weeks of one split per chunk,
    train weeks first, then validation, then test, satisfies this). Concatenated, the outputs equal
    :func:`trip_features_all` of all the baskets, row for row and bit for bit.

    The state carried between chunks is one row per carded customer seen so far (:attr:`state`): the
    last basket's date, hour and basket id, and the inclusive (float64 accumulator) sums of every
    history increment. A chunk is computed with each returning customer's state prepended as a
    pseudo-row that sorts before their baskets, through the very expressions of :func:`trip_features`:
    the running sums then add the same numbers in the same order as the one-shot computation (float
    addition is not associative, so adding a chunk's subtotal to the state would not be
    bit-identical). Anonymous baskets (null ``cust_code``) have no history and carry no state.
    """

    def __init__(self, home_store: pl.DataFrame):
        """``home_store``: cust_code, home_store (String), as :func:`trip_features` takes it."""
        self.home_store = home_store
        self._state = pl.DataFrame(
            schema={"cust_code": pl.String, "date": pl.Date, "hour": pl.Int8, "basket_id": pl.Int64,
                    **dict.fromkeys(_INCREMENTS, pl.Float64), "__key": pl.Int32}
        )

    @property
    def state(self) -> pl.DataFrame:
        """One row per carded customer seen so far: cust_code, their last basket's date, hour and
        basket_id, the inclusive float64 sums of the ``__ind_*`` increments up to it, and ``__key`` (the
        customer key given to :meth:`step`, null without one)."""
        return self._state

    def step(self, chunk: pl.DataFrame, customer_key: np.ndarray | None = None) -> pl.DataFrame:
        """The trip context of ``chunk``'s baskets: ``basket_id`` + the TRIP_WIDTH float32 columns of
        :func:`trip_features`, row i for chunk row i, history including every earlier chunk.

        ``chunk`` has the columns of a basket-samples frame (``cust_code`` Categorical or String).
        ``customer_key`` [n], if the caller has it: one positive integer per customer, the same in every
        chunk, 0 for an anonymous basket (:class:`~.history.SequenceState`'s keys); the baskets are then
        grouped by sorting integers instead of strings (the same arrays, faster). Give it with
        every chunk or with none.
        Raises ValueError, state unchanged, when a customer's basket is not after their last basket of
        an earlier chunk.
        """
        rows = (_with_increments(_trip_inputs(chunk)).with_columns(pl.int_range(pl.len()).alias("__row"))
                .drop("spend", "n_lines", *LABELS))  # read by the increments only: not sorted along (a list)
        by = "cust_code"
        if customer_key is not None:
            key = pl.Series("__key", np.asarray(customer_key), dtype=pl.Int32)
            rows, by = rows.with_columns(pl.when(key > 0).then(key).alias("__key")), "__key"
        carried = self._state.join(rows.select("cust_code").unique(), on="cust_code", how="semi")
        if by == "__key" and carried.get_column("__key").null_count():
            raise ValueError("TripStream: customer keys given with this chunk but not with an earlier one of the "
                             "same customers: give them with every chunk or with none")
        self._check_time_order(rows, carried)
        df = _with_history(pl.concat([carried, rows], how="diagonal").sort(by, *_TIME_ORDER, nulls_last=True),
                           by)
        last = df.filter(pl.col(by).is_not_null() & pl.col(by).is_last_distinct()).select(
            "cust_code", *_TIME_ORDER, *[pl.col(c.replace("__ind_", "__cum_")).alias(c) for c in _INCREMENTS],
            "__key",  # from the state's rows (null without keys) and the chunk's
        )
        self._state = pl.concat([self._state.join(last, on="cust_code", how="anti"), last], rechunk=True)
        real = df.filter(pl.col("__row").is_not_null())
        return _trip_columns(real, self.home_store, "__row").sort("__row").drop("__row")

    @staticmethod
    def _check_time_order(rows: pl.DataFrame, carried: pl.DataFrame) -> None:
        """Raise ValueError naming the first basket of ``rows`` at or before its customer's last basket
        in ``carried`` (the state of the chunk's returning customers)."""
        before = carried.select("cust_code", *[pl.col(c).alias(f"{c}_before") for c in _TIME_ORDER])
        date, hour, basket = (pl.col(c) for c in _TIME_ORDER)
        date0, hour0, basket0 = (pl.col(f"{c}_before") for c in _TIME_ORDER)
        not_after = (date < date0) | ((date == date0) & ((hour < hour0) | ((hour == hour0) & (basket <= basket0))))
        late = (rows.select("cust_code", *_TIME_ORDER).join(before, on="cust_code")
                .filter(not_after).sort("cust_code", *_TIME_ORDER))
        if late.height:
            cust, d, h, b, d0, h0, b0 = late.row(0)
            raise ValueError(
                f"TripStream: customer {cust}'s basket {b} of {d} {h}h is in this chunk, but their basket {b0} "
                f"of {d0} {h0}h came in an earlier chunk ({late.height} basket(s) of "
                f"{late.get_column('cust_code').n_unique()} customer(s) not after their earlier chunks). "
                "Feed the chunks in time order: weeks ascending, train, then validation, then test."
            )
