"""The world model (DESIGN §5; seed 000): context and product fusion, a Mamba encoder, a Transformer decoder, heads.

One forward pass reads a padded batch of baskets (the :class:`~retailsim_pipeline.model.batch.Batch`
contract) and returns logits of the products at the positions to predict, the decoder's hidden states (for the
contrastive loss) and the four auxiliary heads' logits. Shapes: ``B`` baskets, ``S`` the padded basket length,
``D`` = ``d_model``, ``V`` = ``n_products`` (vocabulary incl. PAD/MASK/UNK).

Padding is on the right (the Mamba block's requirement): real positions first, then PAD tokens with
``attention_mask`` False. Nothing at a padded position reaches a real position's output or the auxiliary heads.
"""

import math

import numpy as np
import torch
import torch.nn as nn

from retailsim_pipeline.config import AUX_CLASSES, AUX_HEADS, MASK, N_SPECIAL, PAD, UNK, ModelConfig
from retailsim_pipeline.model.mamba import Mamba

__all__ = [
    "MASK",
    "PAD",
    "UNK",
    "N_SPECIAL",
    "WorldModel",
    "count_parameters",
    "no_decay_parameter_names",
]

#: Features of a memory slot (WorldModel._slot_features) and the width of the context they are scored with.
N_SLOT_FEATURES = 12
SLOT_CONTEXT = 16
INIT_STD = 0.02  # GPT-2/BERT's init of linears and embeddings outside the Mamba blocks


class MambaEncoderLayer(nn.Module):
    """Pre-norm residual Mamba block: ``x + dropout(mixer(norm(x)))`` (mamba_ssm's ``Block`` layout)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
        self.mixer = Mamba(config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                           layer_idx=layer_idx)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]; causal along L."""
        return x + self.dropout(self.mixer(self.norm(x)))


class AuxHead(nn.Module):
    """Linear → GELU → Linear from the pooled vector [B, 2D] to one auxiliary task's classes."""

    def __init__(self, d_in: int, d_hidden: int, n_classes: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(d_hidden, n_classes))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


class WorldModel(nn.Module):
    """Hybrid Mamba–Transformer world model over baskets (DESIGN §5).

    Architecture (``D`` = d_model, ``V`` = n_products)
    ---------------------------------------------------
    1. **Context fusion** ``context_fusion``: [B, 400] → Linear → LayerNorm → GELU → [B, D].
    2. **Product fusion** ``product_fusion``: frozen ``product_table[token]`` (256) ‖ price (64) → Linear →
       [B, S, D], plus a trainable per-product residual ``product_residual[token]`` ([V, D], zero at init), then
       LayerNorm, plus a learned positional embedding ([max_basket_len + 1, D]: the extra slot is the position
       after a full basket, where ``evaluation.positions.completion_batch`` appends its MASK). At MASK
       positions the table row is replaced by a learned ``mask_embedding`` [256]; PAD positions are zeroed.
       *Why the residual table:* the frozen 256-d table (PPMI-SVD + hierarchy, fit on the train split) is a
       good prior, especially for rare products, but it cannot learn what co-occurrence does not show (brand,
       price tier, substitutes). A zero-initialised trainable residual per product lets the model learn those;
       weight decay keeps rarely seen products near their frozen features. It is also what brings the seed
       preset to the seed's ~23M parameters (below) with heads of the specified shape.
    3. **Mamba encoder**: the fused context is *prepended as a first token* (so the causal scan sees who/when/
       where before any product, and the decoder can cross-attend to it) *and added*, through
       ``context_to_sequence`` (Linear D → D), to every product position (a direct path that does not depend
       on the scan carrying the context through up to 50 steps of state decay). ``mamba_num_layers``
       pre-norm residual :class:`~retailsim_pipeline.model.mamba.Mamba` blocks, unidirectional as in the seed,
       then a LayerNorm. Padded positions are re-zeroed before every block.
    4. **Transformer decoder**: ``decoder_num_layers`` pre-norm ``nn.TransformerDecoderLayer`` (GELU,
       FFN ``ffn_mult·D``); tgt = the fused products (bidirectional self-attention over the basket's real
       positions), memory = the encoder output incl. the context token (never masked); final LayerNorm.
    5. **Heads**: masked-product head Linear(D, D) → GELU → LayerNorm → Linear(D, V), untied (an output
       layer tied to the frozen table would confine predictions to what the table already separates);
       auxiliary heads (:data:`~retailsim_pipeline.config.AUX_HEADS`) on pooled = masked mean of the decoder
       output over real positions ‖ fused context [B, 2D] → Linear(2D, D) → GELU → Linear(D, n_classes).
    6. **Two paths beside the head** (added to the product logits, gated per basket by the fused context):
       the *copy path* (:meth:`_add_history`) raises the products of the customer's point-in-time memory
       (their products of largest decayed share strictly before the basket) by log-count, share and presence; the
       *co-occurrence path* (:meth:`_add_cooccurrence`) raises the visible products' most co-occurring
       products. Together they contain the blend baseline (personal share + weight × co-occurrence), so the
       network only has to learn what the blend cannot: when a shopper explores, which staple this trip
       skips, what a mission adds.

    Trainable parameters of the ``seed`` preset (D 512, 4 + 2 layers, V 5003, FFN 2048, d_state 16):

    =============================  ===========
    context fusion (400→512, LN)       206,336
    product fusion (320→512, LN)       165,376
    product residual [5003, 512]     2,561,536
    mask emb. 256 + positions 51×512    26,368
    context → sequence (512→512)       262,656
    Mamba blocks 4 × 1,695,744       6,782,976
    encoder final LayerNorm              1,024
    decoder layers 2 × 4,204,032     8,408,064
    decoder final LayerNorm              1,024
    product head (512→512→5003)      2,830,219
    aux heads (1024→512→4/4/4/5)     2,107,921
    history gate (512→3)                 1,539
    co-occurrence gate (512→1)             513
    slot scorer (512→16; 28→64→1)       10,129
    **total**                       23,365,681
    =============================  ===========

    The frozen ``product_table`` [V, 256] and ``product_neighbours`` / ``product_neighbour_weights``
    [V, 100] are persistent buffers (saved in the state_dict, not parameters).
    """

    def __init__(self, config: ModelConfig, product_embeddings: torch.Tensor | np.ndarray | None = None,
                 product_neighbours: tuple[np.ndarray, np.ndarray] | None = None):
        super().__init__()
        self.config = config
        D, V = config.d_model, config.n_products  # d_model, vocabulary size
        self.n_positions = config.max_basket_len + 1  # + the slot a completion batch appends after 50 visible lines

        if product_embeddings is None:
            table = torch.zeros(V, config.product_dim)
        else:
            if isinstance(product_embeddings, np.ndarray):  # may be a read-only memmap of the cache: copy
                table = torch.from_numpy(np.array(product_embeddings, dtype=np.float32, copy=True))
            else:
                table = product_embeddings.detach().to(torch.float32).clone()
            if tuple(table.shape) != (V, config.product_dim):
                raise ValueError(
                    f"WorldModel: product_embeddings has shape {tuple(table.shape)}, expected "
                    f"(n_products={V}, product_dim={config.product_dim}); set ModelConfig.n_products and "
                    f"product_dim from the tensor cache the table comes from"
                )
        self.register_buffer("product_table", table, persistent=True)
        # Each product's most co-occurring products in train baskets (the cache's product_neighbours): frozen.
        K = config.cooccurrence_neighbours
        if product_neighbours is None:
            neighbours, weights = torch.zeros(V, K, dtype=torch.long), torch.zeros(V, K)
        else:
            neighbours = torch.as_tensor(np.asarray(product_neighbours[0]), dtype=torch.long)
            weights = torch.as_tensor(np.asarray(product_neighbours[1]), dtype=torch.float32)
            if tuple(neighbours.shape) != (V, K) or tuple(weights.shape) != (V, K):
                raise ValueError(f"WorldModel: product_neighbours have shapes {tuple(neighbours.shape)}, "
                                 f"{tuple(weights.shape)}, expected (n_products={V}, cooccurrence_neighbours={K})")
        self.register_buffer("product_neighbours", neighbours, persistent=True)
        self.register_buffer("product_neighbour_weights", weights, persistent=True)

        # 1. Context fusion
        self.context_fusion = nn.Sequential(nn.Linear(config.context_dim, D), nn.LayerNorm(D), nn.GELU())

        # 2. Product fusion
        self.mask_embedding = nn.Parameter(torch.zeros(config.product_dim))
        self.product_fusion = nn.Linear(config.product_dim + config.price_dim, D)
        self.product_residual = nn.Embedding(V, D, padding_idx=PAD)
        self.product_norm = nn.LayerNorm(D)
        self.position_embedding = nn.Embedding(self.n_positions, D)
        self.embedding_dropout = nn.Dropout(config.dropout)

        # 3. Mamba encoder
        self.context_to_sequence = nn.Linear(D, D)
        self.encoder_layers = nn.ModuleList(MambaEncoderLayer(config, i) for i in range(config.mamba_num_layers))
        self.encoder_norm = nn.LayerNorm(D)

        # 4. Transformer decoder (separately constructed layers: nn.TransformerDecoder deep-copies one layer,
        # which would start every layer's attention with the same weights).
        self.decoder_layers = nn.ModuleList(
            nn.TransformerDecoderLayer(D, config.n_heads, config.ffn_mult * D, config.dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.decoder_num_layers)
        )
        self.decoder_norm = nn.LayerNorm(D)

        # 5. Heads
        self.product_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Linear(D, V))
        self.aux_heads = nn.ModuleDict({name: AuxHead(2 * D, D, AUX_CLASSES[name], config.dropout)
                                        for name in AUX_HEADS})
        # Copy path to the customer's own products bought before the basket (see _add_history): three
        # gates per basket; co-occurrence path to the visible products' neighbours (_add_cooccurrence): one.
        self.history_gate = nn.Linear(D, 3)
        self.cooccurrence_gate = nn.Linear(D, 1)
        # Per-slot scorer of the copy path (see _slot_features): a small MLP over each memory slot's
        # features and a projection of the basket's context, added to the gated bonus; starts near zero
        # (normal(0, 0.02) weights, zero biases).
        H = config.history_slot_hidden
        if H > 0:
            self.slot_context = nn.Linear(D, SLOT_CONTEXT)
            self.slot_scorer = nn.Sequential(nn.Linear(N_SLOT_FEATURES + SLOT_CONTEXT, H), nn.GELU(),
                                             nn.Linear(H, 1))

        self._init_weights()

    def _init_weights(self) -> None:
        """normal(0, 0.02) for linears, attention projections and embeddings outside the Mamba blocks, zero
        biases; the product residual starts at zero (the model starts from the frozen table alone), the MASK
        embedding at normal(0, 0.02). Mamba's own initialisation (S4D A, dt ranges) is left untouched."""
        mamba_params = {id(p) for layer in self.encoder_layers for p in layer.mixer.parameters()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in mamba_params:
                nn.init.normal_(module.weight, std=INIT_STD)
                if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, std=INIT_STD)
                nn.init.zeros_(module.in_proj_bias)
        nn.init.normal_(self.position_embedding.weight, std=INIT_STD)
        nn.init.normal_(self.mask_embedding, std=INIT_STD)
        nn.init.zeros_(self.product_residual.weight)
        # Both paths start switched on (a shopper's own products get +1 logit per log-count, per unit of
        # share and a flat +1; the visible products' neighbours up to +1), as the blend baseline
        # suggests; the gates then learn per shopper and trip.
        for gate in (self.history_gate, self.cooccurrence_gate):
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, 1.0)

    # ----------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------

    def fuse_products(self, tokens: torch.Tensor, price: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, S] tokens, [B, S, 64] price, [B, S] mask -> [B, S, D] fused products, zero at PAD positions."""
        B, S = tokens.shape  # batch, basket length
        if S > self.n_positions:
            raise ValueError(f"WorldModel: basket length {S} exceeds max_basket_len + 1 = {self.n_positions}")
        rows = self.product_table[tokens]  # [B, S, 256]
        is_mask = (tokens == MASK).unsqueeze(-1)
        rows = torch.where(is_mask, self.mask_embedding.to(rows.dtype), rows)
        fused = self.product_fusion(torch.cat([rows, price.to(rows.dtype)], dim=-1))  # [B, S, D]
        fused = self.product_norm(fused + self.product_residual(tokens))
        fused = fused + self.position_embedding.weight[:S]
        fused = self.embedding_dropout(fused)
        return fused.masked_fill(~attention_mask.unsqueeze(-1), 0.0)

    def forward(self, tokens: torch.Tensor, price: torch.Tensor, context: torch.Tensor,
                attention_mask: torch.Tensor, predict_mask: torch.Tensor | None = None,
                history_tokens: torch.Tensor | None = None, history_counts: torch.Tensor | None = None,
                history_past: torch.Tensor | None = None, history_recency: torch.Tensor | None = None,
                history_decayed: torch.Tensor | None = None) -> dict:
        """One pass over a padded batch.

        tokens [B, S] int64 (PAD 0 on the right, MASK 1 where hidden), price [B, S, 64], context [B, 400],
        attention_mask [B, S] bool (True at real positions), predict_mask [B, S] bool or None;
        history_tokens / history_counts [B, K] and history_past [B]: the point-in-time memory (optional);
        history_recency / history_decayed [B, K]: its recency and decayed share (optional: zeros stand in).

        Returns a dict:
        ``product_logits``: [N_pred, V] at the positions of ``predict_mask`` in row-major order
        (``N_pred = predict_mask.sum()``), or [B, S, V] at every position when ``predict_mask`` is None;
        ``hidden``: [B, S, D] decoder output, zero at padding; ``aux``: {head: [B, n_classes]};
        ``context``: [B, D] fused context.
        """
        B, S = tokens.shape  # batch, basket length
        attention_mask = attention_mask.bool()
        keep = attention_mask.unsqueeze(-1)  # [B, S, 1]

        ctx = self.context_fusion(context)  # [B, D]
        products = self.fuse_products(tokens, price, attention_mask)  # [B, S, D]

        # Encoder: context token first, then the products with the context added to each.
        seq = (products + self.context_to_sequence(ctx).unsqueeze(1)).masked_fill(~keep, 0.0)
        x = torch.cat([ctx.unsqueeze(1), seq], dim=1)  # [B, 1 + S, D]
        keep_seq = torch.cat([keep.new_ones(B, 1, 1), keep], dim=1)  # [B, 1 + S, 1]
        for layer in self.encoder_layers:
            # Right padding cannot reach real positions through a causal scan; re-zeroing keeps the padded
            # inputs the Mamba block expects and the padded states bounded.
            x = layer(x.masked_fill(~keep_seq, 0.0))
        memory = self.encoder_norm(x)  # [B, 1 + S, D]

        # Decoder. A basket with no real position would leave its self-attention rows fully masked (NaN);
        # the batch contract rules that out, but unmasking position 0 of such rows keeps the output finite.
        tgt_padding = ~attention_mask
        tgt_padding[:, 0] &= attention_mask.any(dim=1)
        memory_padding = torch.cat([tgt_padding.new_zeros(B, 1), ~attention_mask], dim=1)  # context never masked
        h = products
        for layer in self.decoder_layers:
            h = layer(h, memory, tgt_key_padding_mask=tgt_padding, memory_key_padding_mask=memory_padding)
        hidden = self.decoder_norm(h).masked_fill(~keep, 0.0)  # [B, S, D]

        if predict_mask is None:
            product_logits = self.product_head(hidden)  # [B, S, V]
        else:
            product_logits = self.product_head(hidden[predict_mask.bool()])  # [N_pred, V]
        cooccurrence = self._cooccurrence_scores(tokens, attention_mask)  # [B, V] in [0, 1]
        if history_tokens is not None and history_counts is not None:
            product_logits = self._add_history(product_logits, ctx, predict_mask, history_tokens, history_counts,
                                               history_past, cooccurrence, history_recency, history_decayed)
        product_logits = self._add_cooccurrence(product_logits, ctx, predict_mask, cooccurrence)

        # Pooled: mean over real positions (padding is zero in `hidden`) ‖ fused context.
        lengths = attention_mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)  # [B, 1]
        pooled = torch.cat([hidden.sum(dim=1) / lengths, ctx.to(hidden.dtype)], dim=-1)  # [B, 2D]
        aux = {name: head(pooled) for name, head in self.aux_heads.items()}
        return {"product_logits": product_logits, "hidden": hidden, "aux": aux, "context": ctx}


    def _add_history(self, logits: torch.Tensor, ctx: torch.Tensor, predict_mask: torch.Tensor | None,
                     history_tokens: torch.Tensor, history_counts: torch.Tensor, history_past: torch.Tensor | None,
                     cooccurrence: torch.Tensor, history_recency: torch.Tensor | None = None,
                     history_decayed: torch.Tensor | None = None) -> torch.Tensor:
        """Copy path: raise the logits of the products the customer bought before this basket.

        bonus[b, k] = g₁(ctx_b) · log(1 + count) + g₂(ctx_b) · count / Σ counts + g₃(ctx_b) · [count > 0]
        + scorer(slot features[b, k] ‖ slot_context(ctx_b)), with the per-basket gates g =
        ``history_gate(ctx)`` (how much *this* shopper, on *this* trip, re-buys) and the per-slot scorer
        (off when ``history_slot_hidden`` is 0; features: :meth:`_slot_features`), scattered onto the
        vocabulary. history_tokens [B, K] int64 (PAD where empty), history_counts [B, K] float: the
        point-in-time memory; history_past [B]: the baskets it comes from; cooccurrence [B, V];
        history_recency / history_decayed [B, K]: baskets since each slot's last purchase, decayed share.
        """
        counts = history_counts.clamp(min=0).to(torch.float32)
        share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)  # [B, K]
        gates = self.history_gate(ctx).to(torch.float32)  # [B, 3]
        bonus = (gates[:, :1] * torch.log1p(counts) + gates[:, 1:2] * share
                 + gates[:, 2:3] * (counts > 0).to(torch.float32))  # [B, K]
        if self.config.history_slot_hidden > 0:
            features = self._slot_features(history_tokens, counts, share, history_past, cooccurrence,
                                           history_recency, history_decayed)  # [B, K, F]
            slot_ctx = self.slot_context(ctx).to(torch.float32)  # [B, C]
            x = torch.cat([features, slot_ctx.unsqueeze(1).expand(-1, features.shape[1], -1)], dim=-1)
            bonus = bonus + self.slot_scorer(x.to(self.slot_context.weight.dtype)).squeeze(-1).to(torch.float32)
        bonus = bonus.masked_fill(history_tokens < N_SPECIAL, 0.0).to(logits.dtype)
        return _scatter_per_basket(logits, predict_mask, history_tokens.clamp(min=0), bonus)

    @staticmethod
    def _slot_features(history_tokens: torch.Tensor, counts: torch.Tensor, share: torch.Tensor,
                       history_past: torch.Tensor | None, cooccurrence: torch.Tensor,
                       history_recency: torch.Tensor | None = None,
                       history_decayed: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K, N_SLOT_FEATURES] float32 features of each memory slot, all bounded:

        log(1 + count), share of the memory, re-buy rate count / past baskets (≤ 1) and its log (≥ −5),
        log(1 + past baskets) / 5, the slot's rank in the memory (0 = the largest decayed share),
        the slot's co-occurrence with the visible products (the co-occurrence path's score), presence;
        then recency: log(1 + baskets since the last purchase) / 5 and [bought in the previous basket];
        and the decayed share (TIFU-KNN's personal score) and its log, shifted to [0, 1] ((log + 7) / 7).
        ``history_past`` None (a caller without it): the largest count stands in, a lower bound;
        ``history_recency`` / ``history_decayed`` None: zeros (and no "previous basket" flag).
        """
        B, K = counts.shape
        if history_past is None:
            past = counts.amax(dim=1)
        else:
            past = history_past.to(torch.float32)
        past = past.clamp(min=1.0).unsqueeze(1)  # [B, 1]
        rate = (counts / past).clamp(max=1.0)  # [B, K]
        log_rate = torch.log(rate.clamp(min=math.exp(-5.0)))
        depth = (torch.log1p(past) / 5.0).expand(B, K)
        rank = (torch.arange(K, device=counts.device, dtype=torch.float32) / max(K - 1, 1)).expand(B, K)
        cooc = cooccurrence.gather(1, history_tokens.clamp(min=0))  # [B, K]
        presence = (counts > 0).to(torch.float32)
        if history_recency is None:
            recency, last = torch.zeros_like(counts), torch.zeros_like(counts)
        else:
            gap = history_recency.to(torch.float32).clamp(min=0.0)
            recency, last = torch.log1p(gap) / 5.0, (gap == 0).to(torch.float32) * presence
        decayed = torch.zeros_like(counts) if history_decayed is None else \
            history_decayed.to(torch.float32).clamp(0.0, 1.0) * presence
        log_decayed = (torch.log(decayed.clamp(min=math.exp(-7.0))) + 7.0) / 7.0 * presence
        return torch.stack([torch.log1p(counts), share, rate, log_rate, depth, rank, cooc, presence,
                            recency, last, decayed, log_decayed], dim=-1)

    def _cooccurrence_scores(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """sums[b, v] = Σ over basket b's visible products i (real, not MASK/PAD/UNK) of sim(i, v), over
        i's ``cooccurrence_neighbours`` most co-occurring products (the cache's ``product_neighbours``);
        each row divided by its max (the blend baseline's normalisation): [B, V] float32 in [0, 1].
        """
        B = tokens.shape[0]
        visible = (attention_mask & (tokens >= N_SPECIAL)).to(torch.float32)  # [B, S]
        index = self.product_neighbours[tokens].flatten(1)  # [B, S * K]
        weight = (self.product_neighbour_weights[tokens] * visible.unsqueeze(-1)).flatten(1)  # [B, S * K]
        sums = torch.zeros(B, self.config.n_products, device=tokens.device).scatter_add_(1, index, weight)
        sums[:, :N_SPECIAL] = 0.0
        return sums / sums.amax(dim=1, keepdim=True).clamp(min=1e-12)  # [B, V] in [0, 1]

    def _add_cooccurrence(self, logits: torch.Tensor, ctx: torch.Tensor, predict_mask: torch.Tensor | None,
                          sums: torch.Tensor) -> torch.Tensor:
        """Co-occurrence path: raise the logits of the visible products' neighbours, bonus = g(ctx_b) · sums
        (:meth:`_cooccurrence_scores`) with the per-basket gate g = ``cooccurrence_gate(ctx)``. Every
        predicted position of a basket shares its visible products, so the bonus is computed once per basket.
        """
        bonus = (self.cooccurrence_gate(ctx).to(torch.float32) * sums).to(logits.dtype)  # [B, V]
        if predict_mask is None:  # logits [B, S, V]
            return logits + bonus.unsqueeze(1)
        return logits + bonus[predict_mask.bool().nonzero()[:, 0]]


def _scatter_per_basket(logits: torch.Tensor, predict_mask: torch.Tensor | None, index: torch.Tensor,
                        bonus: torch.Tensor) -> torch.Tensor:
    """Add ``bonus`` [B, K] at vocabulary ``index`` [B, K] to the logits of every predicted position of
    each basket: logits [N_pred, V] (rows in ``predict_mask`` row-major order) or [B, S, V]."""
    if predict_mask is None:
        S = logits.shape[1]
        return logits.scatter_add(2, index[:, None, :].expand(-1, S, -1), bonus[:, None, :].expand(-1, S, -1))
    rows = predict_mask.bool().nonzero()[:, 0]  # basket of each predicted position
    return logits.scatter_add(1, index[rows], bonus[rows])


# --------------------------------------------------------------------------------------------------------
# Helpers for the trainer and for inference
# --------------------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the frozen product table is a buffer and not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters AdamW should not decay: norms, biases, Mamba's ``A_log`` and ``D``.

    Embeddings (positions, MASK, the product residual) do decay: decay keeps rarely seen products' residuals
    near zero, i.e. near their frozen features.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))
                   for p in m.parameters(recurse=False)}
    names = set()
    for name, p in model.named_parameters():
        if (id(p) in norm_params or name.endswith("bias") or getattr(p, "_no_weight_decay", False)
                or name.split(".")[-1] in ("A_log", "D")):
            names.add(name)
    return names
