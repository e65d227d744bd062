"""Tiny world models and their vocabulary, for the tests that log, register and serve them."""

import torch

from retailsim_pipeline.config import MODEL_PRESETS
from retailsim_pipeline.model.world_model import WorldModel

N_PRODUCTS = 20  # vocabulary = 3 specials + 20 products
VOCABULARY = [f"PRD09{i:05d}" for i in range(N_PRODUCTS)]


def tiny_model(seed: int) -> WorldModel:
    """A ``tiny`` preset model over :data:`VOCABULARY` whose scores clearly differ per product and per seed."""
    torch.manual_seed(seed)
    config = MODEL_PRESETS["tiny"].model_copy(update={"n_products": 3 + N_PRODUCTS})
    table = torch.randn(config.n_products, config.product_dim)
    model = WorldModel(config, product_embeddings=table)
    # Untrained heads rank nearly at random; perturb every weight so scores clearly differ per product.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()
