"""The tables fitted on the train split: vocabulary, product embeddings, customer tables."""

import numpy as np
import polars as pl

from retailsim_pipeline.config import MASK, PAD, UNK
from retailsim_pipeline.prep.fitting import build_customer_history, customer_product_counts
from retailsim_pipeline.prep.samples import read_samples


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


def test_customer_product_counts_are_the_samples_counts(cache, tiny_prepped):
    """The one customer × product count, on the cache's train CSR, equals a polars count of the samples."""
    train = cache.split("train")
    counts = customer_product_counts(train.customer_index, train.offsets, train.tokens,
                                     cache.customer_context.shape[0], cache.product_embeddings.shape[0])
    expected = (
        read_samples(tiny_prepped.samples, "train").filter(pl.col("cust_code").is_not_null())
        .select(pl.col("cust_code").cast(pl.String), pl.col("products").alias("PROD_CODE")).explode("PROD_CODE")
        .with_columns(pl.col("PROD_CODE").cast(pl.String))
        .group_by("cust_code", "PROD_CODE").len("n")
        .join(cache.customers().select("cust_code", "row"), on="cust_code")
        .join(cache.vocabulary().select("PROD_CODE", "token_id"), on="PROD_CODE")
    )
    dense = np.zeros(counts.shape, np.float32)
    dense[expected.get_column("row").to_numpy(), expected.get_column("token_id").to_numpy()] = \
        expected.get_column("n").to_numpy()
    assert counts.nnz == expected.height > 100
    assert np.array_equal(counts.toarray(), dense)
    assert not counts[0].toarray().any()  # anonymous lines belong to nobody
    # The cached customer memory is each row's top of these counts.
    hist_tokens, hist_counts = build_customer_history(counts, 32)
    assert np.array_equal(hist_tokens, cache["customer_history_tokens"])
    assert np.array_equal(hist_counts, cache["customer_history_counts"])
    row = int(np.argmax(dense.sum(axis=1)))
    assert hist_counts[row, 0] == dense[row].max()
