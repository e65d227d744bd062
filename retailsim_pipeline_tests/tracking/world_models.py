"""Tiny world models over the tiny data's tensor cache, their serving features, and client requests,
for the tests that log, register and serve them."""

import datetime as dt

import pandas as pd
import polars as pl
import torch

from retailsim_pipeline.config import training_preset
from retailsim_pipeline.model.world_model import WorldModel
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.training.trainer import build_model


def tiny_model(seed: int, cache: TensorCache) -> WorldModel:
    """A ``tiny`` preset model sized to ``cache`` whose scores clearly differ per product and per seed."""
    torch.manual_seed(seed)
    model = build_model(training_preset("tiny"), cache)
    # Untrained heads rank nearly at random; perturb every weight so scores clearly differ per product.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def client_requests(samples_dir, n: int = 3, split: str = "test", products: int = 3) -> pd.DataFrame:
    """The first ``n`` baskets of ``split`` as a client sends them: customer, store, ISO time and the
    first ``products`` product codes with their quantities and spend."""
    frame = pl.read_parquet(samples_dir / f"{split}.parquet").head(n)
    rows = []
    for r in frame.iter_rows(named=True):
        rows.append({
            "customer_code": None if r["cust_code"] is None else str(r["cust_code"]),
            "store_code": str(r["store_code"]),
            "timestamp": dt.datetime.combine(r["date"], dt.time(int(r["hour"]))).isoformat(),
            "products": [str(c) for c in r["products"][:products]],
            "quantities": [int(q) for q in r["quantity"][:products]],
            "spend": [float(s) for s in r["spend"][:products]],
        })
    return pd.DataFrame(rows)
