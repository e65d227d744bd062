"""A champion is re-scored through its own vocabulary and features, not the new cache's token ids.

Token ids follow train frequency, so a retrain on data whose frequencies differ reorders the vocabulary.
Here cache B is built from the tiny samples with the rarest train products' baskets repeated until
those products lead the vocabulary (same products, new order). A model trained for cache A, re-scored on
B's evaluation positions, must rank every position exactly as A's own evaluation does; fed B's token
ids instead (the old behaviour) it would be scoring other products.
"""

import json
import shutil

import numpy as np
import polars as pl
import pytest

from retailsim_pipeline.evaluation.evaluate import prepare, rank_model, rank_served, rescore_model
from retailsim_pipeline.evaluation.metrics import ranking_metrics
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.cache_build import build_tensor_cache
from retailsim_pipeline.prep.requests import ServingFeatures
from retailsim_pipeline.tracking.serving import ServedModel
from retailsim_pipeline_tests.tracking.world_models import tiny_model


@pytest.fixture(scope="module")
def reordered(tiny_prepped, tmp_path_factory):
    """Cache B: the tiny samples with every train basket holding one of the 15 rarest products repeated 40×."""
    root = tmp_path_factory.mktemp("reordered")
    samples = root / "samples"
    shutil.copytree(tiny_prepped.samples, samples)
    train = pl.read_parquet(samples / "train.parquet")
    counts = train.select(pl.col("products").explode().cast(pl.String)).to_series().value_counts()
    rare = counts.sort("count", "products").head(15).get_column("products").to_list()
    holders = train.filter(pl.col("products").cast(pl.List(pl.String)).list.eval(pl.element().is_in(rare)).list.any())
    copies = [holders.with_columns(pl.col("basket_id") + (i + 1) * 10 ** 12) for i in range(40)]
    pl.concat([train, *copies]).write_parquet(samples / "train.parquet")
    manifest = json.loads((samples / "_samples.json").read_text())
    manifest["data_version"] = f"{manifest['data_version']}-reordered"
    (samples / "_samples.json").write_text(json.dumps(manifest))
    build_tensor_cache(samples, root / "cache")
    return TensorCache.latest(root / "cache"), samples


def test_the_champion_is_rescored_with_its_own_vocabulary(tiny_prepped, reordered):
    cache_a = TensorCache.latest(tiny_prepped.cache)
    cache_b, samples_b = reordered
    vocab_a = cache_a.vocabulary().get_column("PROD_CODE").to_list()
    vocab_b = cache_b.vocabulary().get_column("PROD_CODE").to_list()
    assert sorted(vocab_a) == sorted(vocab_b) and vocab_a != vocab_b  # the same products, reordered
    moved = sum(a != b for a, b in zip(vocab_a, vocab_b))
    assert moved > len(vocab_a) // 10

    champion = tiny_model(0, cache_a)
    served = ServedModel(champion, vocab_a, ServingFeatures.from_cache(cache_a, tiny_prepped.samples))
    own, _ = rank_model(prepare(cache_a, tiny_prepped.samples, split="test"), champion)  # A's own evaluation
    setup_b = prepare(cache_b, samples_b, split="test")
    rescored = rank_served(setup_b, champion, served.features)
    for field in ("n_greater", "n_ties", "n_candidates"):
        assert np.array_equal(getattr(rescored, field), getattr(own, field)), field
    assert rescore_model(setup_b, served) == ranking_metrics(own)

    # What scoring the champion with B's token ids gives instead: other products, another figure.
    naive, _ = rank_model(setup_b, champion)
    assert not np.array_equal(naive.n_greater, own.n_greater)
    assert ranking_metrics(naive)["recall@10"] != ranking_metrics(own)["recall@10"]
