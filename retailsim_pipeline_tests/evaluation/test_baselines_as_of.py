"""The baselines read the customers' history *as of* each scored basket (issue 11): every basket of the
same customer strictly before it, in any split, and nothing at or after it. Checked on the tiny cache
against brute force from the samples' own dates (not the cache's customer_key / past_baskets)."""

import dataclasses

import numpy as np
import polars as pl
import pytest

from retailsim_pipeline.config import N_SPECIAL
from retailsim_pipeline.evaluation.baselines import (
    PersonalFrequencyScorer,
    PopularityScorer,
    _below_one,
    as_of_history,
    train_counts,
)
from retailsim_pipeline.evaluation.strong_baselines import BlendScorer, TifuKnnScorer
from retailsim_pipeline.prep.cache import SplitArrays, TensorCache
from retailsim_pipeline.prep.history import AsOfHistory

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def cache(tiny_prepped) -> TensorCache:
    return TensorCache.latest(tiny_prepped.cache)


@pytest.fixture(scope="module")
def vocab(cache) -> int:
    return len(cache.product_log_price)


@pytest.fixture(scope="module")
def baskets(cache, tiny_prepped) -> pl.DataFrame:
    """Every basket of every split: split, row (in the cache), cust_code, date, hour, basket_id, and
    ``time`` — its rank in (date, hour, basket_id) order over all splits."""
    frames = []
    for split in SPLITS:
        frame = pl.read_parquet(tiny_prepped.samples / f"{split}.parquet",
                                columns=["basket_id", "cust_code", "date", "hour"])
        assert np.array_equal(frame.get_column("basket_id").to_numpy(), np.asarray(cache.split(split).basket_id))
        frames.append(frame.with_columns(pl.lit(split).alias("split"), pl.int_range(pl.len()).alias("row"),
                                         pl.col("cust_code").cast(pl.String)))
    every = pl.concat(frames)
    return every.with_columns(pl.struct("date", "hour", "basket_id").rank("ordinal").alias("time"))


def _lines(cache, split: str, row: int) -> np.ndarray:
    arrays = cache.split(split)
    tokens = np.asarray(arrays.tokens[arrays.offsets[row]:arrays.offsets[row + 1]], dtype=np.int64)
    return tokens[tokens >= N_SPECIAL]


def _earlier(baskets: pl.DataFrame, split: str, row: int) -> pl.DataFrame:
    """The same customer's baskets strictly before basket ``row`` of ``split``, oldest first."""
    me = baskets.filter((pl.col("split") == split) & (pl.col("row") == row)).row(0, named=True)
    assert me["cust_code"] is not None
    return baskets.filter((pl.col("cust_code") == me["cust_code"]) & (pl.col("time") < me["time"])).sort("time")


def _brute_counts(cache, baskets, split: str, row: int, vocab: int) -> np.ndarray:
    counts = np.zeros(vocab)
    for s, r in _earlier(baskets, split, row).select("split", "row").iter_rows():
        np.add.at(counts, _lines(cache, s, r), 1.0)
    return counts


def _no_visible(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(n + 1, np.int64), np.zeros(0, np.int64)


def _rows_with_history(arrays: SplitArrays, *, least: int, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` rows of carded baskets with at least ``least`` earlier baskets."""
    rows = np.flatnonzero((np.asarray(arrays.customer_key) > 0) & (np.asarray(arrays.past_baskets) >= least))
    assert len(rows) > 0
    return np.sort(np.random.default_rng(seed).choice(rows, min(n, len(rows)), replace=False))


@pytest.mark.parametrize("split", ["validation", "test"])
def test_personal_frequency_counts_every_earlier_basket_of_any_split(cache, baskets, vocab, split):
    """(a) A scored basket's own counts = a brute-force count over its customer's baskets, in every
    split, strictly before it by the samples' (date, hour, basket_id)."""
    scored, train = cache.split(split), cache.split("train")
    scorer = PersonalFrequencyScorer(train, scored, vocab, history=as_of_history(cache, through=split))
    rows = _rows_with_history(scored, least=1, n=25)
    got = scorer.score(rows, *_no_visible(len(rows))).numpy()
    fallback = _below_one(train_counts(train, vocab))
    splits_seen = set()
    for i, row in enumerate(rows):
        splits_seen |= set(_earlier(baskets, split, row).get_column("split"))
        want = _brute_counts(cache, baskets, split, row, vocab)
        assert want.sum() > 0
        np.testing.assert_array_equal(got[i], (want + fallback).astype(np.float32))
    assert {"train", split} <= splits_seen  # histories reach into train and into the scored split itself


def test_second_test_basket_sees_the_first(cache, baskets, vocab):
    """(b) As-of moves within the split: a customer's next test basket counts the previous test
    basket's lines (the train-only history of the old baselines never did)."""
    test = cache.split("test")
    key, past = np.asarray(test.customer_key), np.asarray(test.past_baskets)
    where = {(k, p): r for r, (k, p) in enumerate(zip(key.tolist(), past.tolist())) if k > 0}
    pairs = [(r1, where[(k, p + 1)]) for (k, p), r1 in where.items() if (k, p + 1) in where]
    assert len(pairs) >= 3
    pairs = pairs[:20]
    first, second = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    scorer = PersonalFrequencyScorer(cache.split("train"), test, vocab, history=as_of_history(cache))
    before, after = scorer.own_counts(first), scorer.own_counts(second)
    for i, (r1, r2) in enumerate(pairs):
        lines = np.bincount(_lines(cache, "test", r1), minlength=vocab)
        assert lines.sum() > 0
        np.testing.assert_array_equal(after[i] - before[i], lines)  # exactly the first basket's lines
        assert _earlier(baskets, "test", r2).select("split", "row").rows()[-1] == ("test", r1)  # r2's latest
    # The blend's own share and TIFU's own vector see those products too.
    blend = BlendScorer(cache.split("train"), test, vocab, history=scorer.history)
    tifu = TifuKnnScorer(cache.split("train"), test, vocab, history=scorer.history, k=5, decay=0.5)
    latest = tifu.own(second)
    for i, (r1, _) in enumerate(pairs):
        bought = np.unique(_lines(cache, "test", r1))
        assert (blend.own_share(second)[i, bought] > 0).all()
        assert (latest[i, bought] >= 0.5 - 1e-12).all()  # the latest basket weighs 1 of 1 + 0.5 + 0.25 + …


def test_anonymous_and_first_baskets_get_popularity_only(cache, vocab):
    """(c) No earlier basket (anonymous, or the customer's first): popularity alone, for every baseline."""
    test, train = cache.split("test"), cache.split("train")
    key, past = np.asarray(test.customer_key), np.asarray(test.past_baskets)
    anonymous = np.flatnonzero(key == 0)[:30]
    first = np.flatnonzero((key > 0) & (past == 0))[:30]
    assert len(anonymous) > 0
    rows = np.concatenate([anonymous, first])
    history = as_of_history(cache)
    popularity = PopularityScorer(train, vocab).score(rows, *_no_visible(len(rows))).numpy()
    personal = PersonalFrequencyScorer(train, test, vocab, history=history).score(rows, *_no_visible(len(rows)))
    np.testing.assert_array_equal(personal.numpy(), np.broadcast_to(_below_one(train_counts(train, vocab))
                                                                    .astype(np.float32), personal.shape))
    order = np.argsort(-popularity[0, N_SPECIAL:], kind="stable")
    for scorer in (BlendScorer(train, test, vocab, history=history, w_cooc=0.0, w_pop=0.0),
                   TifuKnnScorer(train, test, vocab, history=history, k=5, alpha=1.0)):
        got = scorer.score(rows, *_no_visible(len(rows))).numpy()
        for row in got:
            np.testing.assert_array_equal(np.argsort(-row[N_SPECIAL:], kind="stable"), order)


def test_tifu_own_vector_is_the_decayed_mean_of_earlier_baskets(cache, baskets, vocab):
    """(d) TIFU-KNN's own vector of a basket = Σ decay^age × (product set of an earlier basket) / Σ
    decay^age over its customer's earlier baskets, brute force from the samples' dates."""
    test = cache.split("test")
    decay = 0.8
    scorer = TifuKnnScorer(cache.split("train"), test, vocab, history=as_of_history(cache), decay=decay, k=5)
    rows = _rows_with_history(test, least=3, n=5, seed=1)
    got = scorer.own(rows)
    for i, row in enumerate(rows):
        earlier = _earlier(baskets, "test", row).select("split", "row").rows()
        want, total = np.zeros(vocab), 0.0
        for age, (s, r) in enumerate(reversed(earlier)):  # age 0 = the latest
            products = np.unique(_lines(cache, s, r))
            want[products] += decay ** age
            total += decay ** age
        np.testing.assert_allclose(got[i], want / total, rtol=1e-12, atol=1e-15)


def _perturbed(arrays: SplitArrays, rows: np.ndarray, vocab: int, seed: int) -> SplitArrays:
    """``arrays`` with the tokens of ``rows`` replaced by random products (same lengths)."""
    tokens = np.array(arrays.tokens)
    offsets = np.asarray(arrays.offsets)
    lines = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows]) if len(rows) else np.zeros(0, int)
    tokens[lines] = np.random.default_rng(seed).integers(N_SPECIAL, vocab, len(lines))
    return dataclasses.replace(arrays, tokens=tokens)


def _all_scores(train, scored, vocab, history, rows, visible) -> dict[str, np.ndarray]:
    scorers = {"personal_frequency": PersonalFrequencyScorer(train, scored, vocab, history=history),
               "blend": BlendScorer(train, scored, vocab, history=history, w_cooc=0.1, w_pop=0.01),
               "tifu_knn": TifuKnnScorer(train, scored, vocab, history=history, decay=0.9, k=10, alpha=0.7)}
    return {name: s.score(rows, *visible).numpy() for name, s in scorers.items()}


def test_nothing_at_or_after_the_basket_changes_its_scores(cache, vocab):
    """(e) Rewriting the products of the scored baskets themselves, of their customers' later baskets
    and of every other customer's test basket leaves every baseline's scores of those baskets
    unchanged; rewriting their customers' (earlier) validation baskets does change them."""
    train, validation, test = (cache.split(s) for s in SPLITS)
    rows = _rows_with_history(test, least=2, n=60, seed=2)
    key, past = np.asarray(test.customer_key, dtype=np.int64), np.asarray(test.past_baskets, dtype=np.int64)
    rows = rows[np.unique(key[rows], return_index=True)[1]]  # one scored basket per customer
    assert len(rows) >= 10
    visible = (np.arange(len(rows) + 1, dtype=np.int64), np.full(len(rows), N_SPECIAL, np.int64))  # one item each
    original = _all_scores(train, test, vocab, AsOfHistory([train, validation, test], vocab), rows, visible)

    # Per scored customer, the scored basket and everything after it; every test basket of anyone else.
    scored_past = dict(zip(key[rows].tolist(), past[rows].tolist()))
    own_later = np.array([scored_past.get(k, 1 << 30) <= p for k, p in zip(key.tolist(), past.tolist())])
    not_mine = ~np.isin(key, key[rows]) | (key == 0)
    later = np.flatnonzero(own_later | not_mine)
    assert np.isin(rows, later).all()
    changed = _perturbed(test, later, vocab, seed=3)
    assert not np.array_equal(np.asarray(changed.tokens), np.asarray(test.tokens))
    after = _all_scores(train, changed, vocab, AsOfHistory([train, validation, changed], vocab), rows, visible)
    for name in original:
        np.testing.assert_array_equal(after[name], original[name], err_msg=name)

    # Control: rewriting the customers' validation baskets (earlier) moves their scores.
    earlier = np.flatnonzero(np.isin(np.asarray(validation.customer_key), key[rows]) &
                             (np.asarray(validation.customer_key) > 0))
    assert len(earlier) > 0
    moved_validation = _perturbed(validation, earlier, vocab, seed=4)
    moved = _all_scores(train, test, vocab, AsOfHistory([train, moved_validation, test], vocab), rows, visible)
    for name in original:
        assert not np.array_equal(moved[name], original[name]), name


def test_a_history_missing_a_split_before_the_scored_one_is_refused(cache, vocab):
    test = cache.split("test")
    with pytest.raises(ValueError, match="as-of history"):
        PersonalFrequencyScorer(cache.split("train"), test, vocab, history=as_of_history(cache, through="validation"))
