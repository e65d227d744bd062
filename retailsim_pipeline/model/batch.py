"""The batch the world model consumes: the model's input contract, shared by batch assembly
(``training.batches``), the model, its losses, evaluation and tracking. It lives with the model so that
nothing below training has to import training."""

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A batch of B baskets padded to S = the longest basket in the batch (≤ 50).

    tokens          [B, S] int64   input token ids: PAD = 0 at padding, MASK = 1 at masked positions
                                   (or a random/kept token, BERT-style), else the product's id
    targets         [B, S] int64   the original token id where the position is to be predicted,
                                   ``IGNORE_INDEX`` (-100) elsewhere
    attention_mask  [B, S] bool    True at real (non-padding) positions
    price           [B, S, 64] f32 price features; zero at padding and at positions to predict
    context         [B, 400] f32   customer 192 (history vector 160 | profile 32) | temporal 64 | store 96 |
                                   trip 48
    labels          [B, 4] int64   class ids of basket_size, price_sensitivity, mission_type, mission_focus
    index           [B] int64      row of each basket in its split (joins back to basket ids)
    history_tokens  [B, K] int64   the point-in-time memory: the products of the customer's baskets strictly
                                   before this basket, in any split (PAD-filled; None if not given)
    history_counts  [B, K] f32     their line counts before this basket (0 at PAD; nothing of the basket
                                   itself, in any split)
    history_past    [B] f32        the customer's baskets strictly before this one (0: a first visit or an
                                   anonymous shopper), the denominator of the memory's re-buy rates
    history_recency [B, K] f32     baskets of the customer since the slot's product was last bought
                                   (0 = the previous basket; 0 at PAD)
    history_decayed [B, K] f32     the slot's decayed share of the earlier baskets holding it, in (0, 1]
                                   (TIFU-KNN's personal vector at the cache's memory_decay; 0 at PAD)
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor
    price: torch.Tensor
    context: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    history_tokens: torch.Tensor | None = None
    history_counts: torch.Tensor | None = None
    history_past: torch.Tensor | None = None
    history_recency: torch.Tensor | None = None
    history_decayed: torch.Tensor | None = None

    @property
    def predict_mask(self) -> torch.Tensor:
        """[B, S] bool: positions whose product is to be predicted."""
        return self.targets != IGNORE_INDEX

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: None if getattr(self, f.name) is None
                        else getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).pin_memory()
                        for f in fields(self)})

    def model_inputs(self) -> dict:
        """Keyword arguments of ``WorldModel.forward`` (besides ``predict_mask``)."""
        return {"tokens": self.tokens, "price": self.price, "context": self.context,
                "attention_mask": self.attention_mask, "history_tokens": self.history_tokens,
                "history_counts": self.history_counts, "history_past": self.history_past,
                "history_recency": self.history_recency, "history_decayed": self.history_decayed}

    def __len__(self) -> int:
        return self.tokens.shape[0]
