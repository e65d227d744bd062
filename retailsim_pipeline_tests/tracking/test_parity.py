"""The served model is the evaluated model: the registered pyfunc, asked as a client would ask it (the
visible products, the customer, the store and the time; no token ids, no context vectors), ranks every
hidden test position exactly where :func:`evaluation.evaluate` ranks it.

A tiny model is trained for a few real steps by the training entry point, which logs it to a real sqlite
MLflow store with its serving features; it is registered as ``challenger`` and loaded back through
``mlflow.pyfunc.load_model("models:/retailsim-world-model@challenger")``.
"""

import datetime as dt

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest

from retailsim_pipeline import tracking
from retailsim_pipeline.config import training_preset
from retailsim_pipeline.evaluation.evaluate import evaluate, prepare, rank_model
from retailsim_pipeline.evaluation.metrics import ranking_metrics
from retailsim_pipeline.training.run import run_training

K = 50


@pytest.fixture
def challenger(tracking_uri, tiny_serving, tmp_path):
    config = training_preset("tiny").model_copy(update={"max_steps": 30})
    summary = run_training({"config": config.model_dump(mode="json"), "cache_path": str(tiny_serving.cache.path),
                            "out_dir": str(tmp_path / "train"), "tracking": True, "tracking_uri": tracking_uri})
    tracking.register_world_model(summary["model_uri"], alias="challenger", tracking_uri=tracking_uri)
    module, _ = tracking.load_world_model("models:/retailsim-world-model@challenger", tracking_uri=tracking_uri)
    return module


def _client_requests(samples_dir, split_arrays, positions, rows) -> pd.DataFrame:
    """What a till knows about each basket of ``rows``: written here independently of the evaluation's
    own request builder, line by line from the samples."""
    frame = pl.read_parquet(samples_dir / "test.parquet")
    offsets = np.asarray(split_arrays.offsets)
    out = []
    for i in rows.tolist():
        r = frame.row(i, named=True)
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        keep = [j for j in range(hi - lo) if not positions.hidden[lo + j]]
        out.append({"customer_code": None if r["cust_code"] is None else str(r["cust_code"]),
                    "store_code": str(r["store_code"]),
                    "timestamp": dt.datetime.combine(r["date"], dt.time(int(r["hour"]))).isoformat(),
                    "products": [str(r["products"][j]) for j in keep],
                    "quantities": [int(r["quantity"][j]) for j in keep],
                    "spend": [float(r["spend"][j]) for j in keep],
                    "basket_id": int(r["basket_id"])})
    return pd.DataFrame(out)


def test_the_registered_model_ranks_every_position_where_the_evaluation_does(challenger, tiny_serving):
    cache, samples = tiny_serving.cache, tiny_serving.samples
    setup = prepare(cache, samples, split="test")
    p = setup.positions
    ranks, _ = rank_model(setup, challenger)
    result = evaluate(cache, samples, challenger, split="test")
    assert result["model"]["recall@10"] == pytest.approx(ranking_metrics(ranks)["recall@10"], abs=0)

    baskets = np.unique(p.sample)
    rows = baskets[:400]
    assert len(rows) >= 200, "the tiny test split should give a few hundred scored baskets"
    requests = _client_requests(samples, cache.split("test"), p, rows)
    served = mlflow.pyfunc.load_model("models:/retailsim-world-model@challenger")
    answer = served.predict(requests, params={"k": K})
    vocab = cache.vocabulary().get_column("PROD_CODE").cast(pl.String).to_list()

    scored = np.isin(p.sample, rows)
    assert ranks.n_ties[scored].max() == 0, "no ties among the scored targets, so ranks are exact"
    top = dict(zip(rows.tolist(), answer["top_k"]))
    hits10 = []
    for sample, target, n_greater in zip(p.sample[scored], p.target[scored], ranks.n_greater[scored]):
        served_list = list(top[int(sample)])
        code = vocab[int(target)]
        if n_greater < K:
            assert served_list.index(code) == n_greater  # the same rank, position by position
        else:
            assert code not in served_list
        hits10.append(code in served_list[:10])
    # …hence the same Recall@10 on these positions as the evaluation's own figure for them.
    assert np.mean(hits10) == pytest.approx(ranking_metrics(ranks.subset(scored))["recall@10"], abs=1e-12)
