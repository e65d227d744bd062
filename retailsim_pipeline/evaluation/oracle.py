"""The oracle ceiling on generated data: the generator's own probabilities, in the model's token space.

Only possible on data from ``retailsim generate``: its ``ground_truth/`` sidecar holds each basket's
latent mission and focus and each customer's preferences. Nothing here is ever a feature.
"""

from pathlib import Path

import numpy as np
import polars as pl
import torch

from retailsim_pipeline.config import N_SPECIAL
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.ground_truth import BasketContext, load_world, oracle_item_scores


class OracleScorer:
    """``score(sample, visible_offsets, visible_tokens) -> [n, V]`` like the baselines, for one split."""

    def __init__(self, cache: TensorCache, split: str, ground_truth_dir: Path):
        ground_truth_dir = Path(ground_truth_dir)
        self.world = load_world(ground_truth_dir)
        products = pl.read_parquet(ground_truth_dir / "products.parquet", columns=["PROD_CODE"])
        index_of = {code: i for i, code in enumerate(products.get_column("PROD_CODE").to_list())}
        codes = cache.vocabulary().get_column("PROD_CODE").to_list()
        self.vocab = len(codes)
        # token → generator product index (-1 for special tokens and products the world does not know)
        self.product_of_token = np.array([index_of.get(c, -1) if t >= N_SPECIAL else -1
                                          for t, c in enumerate(codes)], dtype=np.int64)
        self.real_tokens = np.flatnonzero(self.product_of_token >= 0)
        arrays = cache.split(split)
        ids = pl.DataFrame({"BASKET_ID": np.asarray(arrays.basket_id)})
        latent = pl.concat([pl.read_parquet(f) for f in sorted(ground_truth_dir.glob("baskets_*.parquet"))])
        joined = ids.join(latent, on="BASKET_ID", how="left", maintain_order="left")
        if joined.get_column("mission").null_count():
            raise ValueError(f"{ground_truth_dir}: the ground truth does not cover every {split} basket "
                             "(was the data generated with another seed or preset?)")
        self.context = BasketContext(
            customer=joined.get_column("customer_index").to_numpy().astype(np.int64),
            store=joined.get_column("store_index").to_numpy().astype(np.int64),
            week=joined.get_column("week_index").to_numpy().astype(np.int64),
            mission=joined.get_column("mission").to_numpy().astype(np.int64),
            focus=joined.get_column("focus").to_numpy().astype(np.int64),
        )

    def score(self, sample: np.ndarray, visible_offsets: np.ndarray, visible_tokens: np.ndarray) -> torch.Tensor:
        prod = self.product_of_token[visible_tokens]
        keep = prod >= 0
        row = np.repeat(np.arange(len(sample)), np.diff(visible_offsets))
        offsets = np.zeros(len(sample) + 1, dtype=np.int64)
        np.cumsum(np.bincount(row[keep], minlength=len(sample)), out=offsets[1:])
        scores = oracle_item_scores(self.world, self.context.take(np.asarray(sample)), (offsets, prod[keep]))
        out = np.full((len(sample), self.vocab), -np.inf, dtype=np.float32)
        out[:, self.real_tokens] = scores[:, self.product_of_token[self.real_tokens]]
        return torch.from_numpy(out)
