"""The tables fitted on the train split: vocabulary, product embeddings, customer profile."""

import numpy as np
import polars as pl
import pytest

from retailsim_pipeline.config import MASK, PAD, UNK, CacheConfig
from retailsim_pipeline.prep.samples import SPLITS, read_samples
from retailsim_pipeline.prep.schema import LIFESTAGE_CODES, PRICE_SENSITIVITY_CODES


def test_vocabulary_is_train_products_by_frequency(cache, tiny_prepped):
    vocab = cache.vocabulary()
    assert vocab.get_column("token_id").to_list()[:3] == [PAD, MASK, UNK]
    assert vocab.get_column("token_id").to_list() == list(range(vocab.height))
    train = read_samples(tiny_prepped.samples, "train")
    counts = train.select(pl.col("products").explode().cast(pl.String)).to_series().value_counts()
    assert vocab.height == 3 + counts.height
    real = vocab.slice(3)
    assert real.get_column("train_count").is_sorted(descending=True)
    assert real.get_column("PROD_CODE_10").null_count() == 0  # hierarchy joined for every product
    # Tokens decode back to the sample's products (train: never UNK).
    a = cache.split("train")
    codes = vocab.get_column("PROD_CODE").to_numpy()
    first = train.row(0, named=True)["products"]
    assert list(codes[a.tokens[a.offsets[0]:a.offsets[1]]]) == first
    assert UNK not in set(np.asarray(a.tokens).tolist())


def test_product_embeddings_encode_planted_complements(cache, tiny_raw):
    """The generator plants complementary products bought together: their embeddings must be close."""
    emb = np.asarray(cache.product_embeddings)
    assert np.isfinite(emb).all()
    assert not emb[PAD].any() and not emb[MASK].any() and emb[UNK].any()
    token = dict(cache.vocabulary().select("PROD_CODE", "token_id").iter_rows())
    truth = pl.read_parquet(tiny_raw.ground_truth / "products.parquet")
    strong = truth.filter(pl.col("complement_prob") > 0.3)
    pairs = np.array([(token[a], token[b]) for a, b in strong.select("PROD_CODE", "complement").iter_rows()
                      if a in token and b in token and a != b])
    assert len(pairs) >= 10
    unit = emb[:, :192] / np.maximum(np.linalg.norm(emb[:, :192], axis=1, keepdims=True), 1e-9)
    cos_pairs = np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], axis=1).mean()
    rng = np.random.default_rng(0)
    r1, r2 = rng.integers(3, emb.shape[0], 2000), rng.integers(3, emb.shape[0], 2000)
    cos_rand = np.sum(unit[r1] * unit[r2], axis=1).mean()
    assert cos_pairs > cos_rand + 0.1, (cos_pairs, cos_rand)


def test_customer_context_is_the_profile_of_train_customers(cache, tiny_prepped):
    """[C, 32]: the card's price sensitivity and lifestage, the home store's format, known/unknown flags;
    nothing of what (or when) the customer bought (that is point-in-time, prep/history.py)."""
    ctx, customers = np.asarray(cache.customer_context), cache.customers()
    assert ctx.shape == (customers.height + 1, CacheConfig().customer_profile_dim) == (ctx.shape[0], 32)
    train = read_samples(tiny_prepped.samples, "train").filter(pl.col("cust_code").is_not_null())
    assert customers.height == train.get_column("cust_code").n_unique()
    n_ps, n_ls = len(PRICE_SENSITIVITY_CODES) + 1, len(LIFESTAGE_CODES) + 1
    known = n_ps + n_ls + 4
    assert ctx[0, known] == 0 and ctx[0, known + 1] == 1  # row 0: anonymous or unknown
    assert (ctx[1:, known] == 1).all() and (ctx[1:, known + 1] == 0).all()
    for block in ((0, n_ps), (n_ps, n_ps + n_ls), (n_ps + n_ls, known)):  # one-hots (home format: one of 4)
        assert (ctx[1:, block[0]:block[1]].sum(axis=1) == 1).all(), block
    assert not ctx[:, known + 2:].any()  # zero padding
    # A customer's card, as of their last train basket, is their row's price-sensitivity one-hot.
    card = (train.group_by(pl.col("cust_code").cast(pl.String)).agg(pl.col("cust_price_sensitivity").last()
                                                                     .cast(pl.String))
            .join(customers.select("cust_code", "row"), on="cust_code"))
    for code, row, ps in card.select("cust_code", "row", "cust_price_sensitivity").iter_rows():
        assert ctx[row, PRICE_SENSITIVITY_CODES.index(ps) if ps else n_ps - 1] == 1, code
    # Customers first seen after train are row 0 in validation/test.
    for split in SPLITS[1:]:
        a = cache.split(split)
        codes = read_samples(tiny_prepped.samples, split).get_column("cust_code").cast(pl.String)
        unseen = (codes.is_not_null() & ~codes.is_in(customers.get_column("cust_code").implode())).to_numpy()
        assert (np.asarray(a.customer_index)[unseen] == 0).all()


def _neighbours_by_definition(dense: np.ndarray, present: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k present entries, largest first, ties by smaller column: sorted in plain Python."""
    n = dense.shape[0]
    tokens, weights = np.full((n, k), PAD, dtype=np.int32), np.zeros((n, k), dtype=np.float32)
    for i in range(n):
        best = sorted((-dense[i, j], j) for j in np.flatnonzero(present[i]))[:k]
        for slot, (v, j) in enumerate(best):
            tokens[i, slot], weights[i, slot] = j, -v
    return tokens, weights


def test_product_neighbours_are_each_rows_top_k_ties_by_token_in_any_block_size():
    import scipy.sparse as sp

    from retailsim_pipeline.prep.fitting import build_product_neighbours

    rng = np.random.default_rng(7)
    for trial in range(40):
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        present = rng.random((n, n)) < rng.uniform(0.0, 1.0)
        dense = np.where(present, rng.integers(1, 4, (n, n)).astype(float), 0.0)  # few values: many ties
        similarity = sp.csr_matrix(dense)
        want = _neighbours_by_definition(dense, present, k)
        got = build_product_neighbours(similarity, k, block_rows=int(rng.integers(1, 9)))
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"trial {trial}: tokens")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"trial {trial}: weights")


def test_whole_split_counts_by_chunks_equal_one_pass(cache, monkeypatch):
    """Co-occurrence and train counts read a split a few lines at a time: any chunking gives the same
    numbers (integer counts), including chunks of a single basket."""
    import retailsim_pipeline.prep.fitting as fitting
    from retailsim_pipeline.evaluation.baselines import train_counts
    from retailsim_pipeline.prep.embeddings import cooccurrence_counts

    train = cache.split("train")
    v = int(cache.product_embeddings.shape[0])
    whole = fitting.similarity_from_counts(cooccurrence_counts(train.offsets, train.tokens, v)).toarray()
    want_counts = np.bincount(np.asarray(train.tokens, dtype=np.int64), minlength=v).astype(np.float64)
    want_counts[:3] = 0.0
    ranges = list(fitting.basket_ranges(train.offsets, max_lines=7))
    assert ranges[0][0] == 0 and ranges[-1][1] == len(train) and len(ranges) > 1
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    lines = [int(train.offsets[hi] - train.offsets[lo]) for lo, hi in ranges]
    assert all(n <= 7 or hi - lo == 1 for n, (lo, hi) in zip(lines, ranges))
    monkeypatch.setattr(fitting, "COUNT_CHUNK_LINES", 7)
    np.testing.assert_array_equal(fitting.cooccurrence_similarity(train.offsets, train.tokens, v).toarray(), whole)
    np.testing.assert_array_equal(train_counts(train, v), want_counts)


@pytest.mark.parametrize("dense", [True, False])
def test_cooccurrence_sum_of_chunks_is_the_counts_of_all_baskets(dense, monkeypatch):
    """CooccurrenceSum (dense or sparse) over chunks of baskets: the very CSR of cooccurrence_counts of
    all of them, structure and values, canonical."""
    import retailsim_pipeline.prep.embeddings as embeddings

    monkeypatch.setattr(embeddings, "COOC_DENSE_MAX_BYTES", 1 << 30 if dense else 0)
    rng = np.random.default_rng(11)
    v = 40
    lengths = rng.integers(0, 9, 300)
    offsets = np.r_[0, np.cumsum(lengths)]
    tokens = rng.integers(0, v, int(offsets[-1])).astype(np.int32)  # specials and repeats too
    whole = embeddings.cooccurrence_counts(offsets, tokens, v)
    total = embeddings.CooccurrenceSum(v)
    assert (total._dense is not None) == dense
    for lo, hi in [(0, 1), (1, 120), (120, 120), (120, 300)]:
        off = offsets[lo:hi + 1]
        total.add(off - off[0], tokens[off[0]:off[-1]])
    got = total.csr()
    assert got.has_canonical_format and whole.has_canonical_format
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name), err_msg=name)
    sets = np.zeros((len(lengths), v))  # [n, V] which products each basket holds (specials not)
    for b in range(len(lengths)):
        sets[b, tokens[offsets[b]:offsets[b + 1]]] = 1.0
    sets[:, :3] = 0.0
    np.testing.assert_array_equal(whole.toarray(), sets.T @ sets)  # the definition: baskets holding both
