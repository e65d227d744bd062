import dataclasses
import math
"""The world model: shapes, padding and MASK semantics, gradients, overfitting, size, state_dict, inference."""

import time

import pytest
import torch

from retailsim_pipeline.config import AUX_CLASSES, AUX_HEADS, MODEL_PRESETS, TrainingConfig
from retailsim_pipeline.model.losses import WorldModelLoss
from retailsim_pipeline.model.world_model import (
    MASK,
    N_SPECIAL,
    PAD,
    UNK,
    WorldModel,
    count_parameters,
    no_decay_parameter_names,
)
from retailsim_pipeline.model.batch import IGNORE_INDEX, Batch

V = 40  # tiny vocabulary: 3 specials + 37 products
TINY = MODEL_PRESETS["tiny"].model_copy(update={"n_products": V})


def make_batch(B: int = 5, S: int = 7, seed: int = 0, n_products: int = V, mask_prob: float = 0.3) -> Batch:
    """A padded batch built by hand: random lengths 1..S (one basket of length S), some positions masked."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    attention_mask = torch.arange(S)[None, :] < lengths[:, None]
    original = torch.randint(N_SPECIAL, n_products, (B, S), generator=g).masked_fill(~attention_mask, PAD)
    chosen = (torch.rand(B, S, generator=g) < mask_prob) & attention_mask
    chosen[0, 1] = True  # at least one position to predict
    tokens = original.masked_fill(chosen, MASK)
    targets = original.masked_fill(~chosen, IGNORE_INDEX)
    price = torch.randn(B, S, 64, generator=g).masked_fill(~(attention_mask & ~chosen)[..., None], 0.0)
    context = torch.randn(B, 400, generator=g)
    labels = torch.stack([torch.randint(0, AUX_CLASSES[h], (B,), generator=g) for h in AUX_HEADS], dim=1)
    history_tokens = torch.randint(N_SPECIAL, n_products, (B, 4), generator=g)
    history_tokens[-1] = PAD  # an anonymous shopper: empty memory
    history_counts = torch.randint(1, 5, (B, 4), generator=g).float().masked_fill(history_tokens == PAD, 0.0)
    history_past = history_counts.amax(dim=1) + torch.randint(0, 6, (B,), generator=g).float()
    history_past[-1] = 0.0
    history_recency = torch.randint(0, 3, (B, 4), generator=g).float().masked_fill(history_tokens == PAD, 0.0)
    history_decayed = torch.rand(B, 4, generator=g).clamp(min=1e-4).masked_fill(history_tokens == PAD, 0.0)
    return Batch(tokens=tokens, targets=targets, attention_mask=attention_mask, price=price, context=context,
                 labels=labels, index=torch.arange(B), history_tokens=history_tokens, history_counts=history_counts,
                 history_past=history_past, history_recency=history_recency, history_decayed=history_decayed)


def make_model(config=TINY, seed: int = 0) -> WorldModel:
    """A model with a random frozen table and random product neighbours (every path live)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    table = torch.randn(config.n_products, config.product_dim, generator=g)
    V, K = config.n_products, config.cooccurrence_neighbours
    neighbours = torch.randint(N_SPECIAL, V, (V, K), generator=g)
    weights = torch.rand(V, K, generator=g)
    return WorldModel(config, product_embeddings=table, product_neighbours=(neighbours.numpy(), weights.numpy()))


def run(model: WorldModel, batch: Batch, predict: bool = True) -> dict:
    return model(**batch.model_inputs(), predict_mask=batch.predict_mask if predict else None)


def test_history_copy_path_raises_the_shoppers_own_products():
    model, batch = make_model(), make_batch(B=5, S=7, seed=4)
    model.eval()
    with torch.no_grad():
        model.slot_scorer[-1].weight.zero_()  # the gated part alone (the scorer: the next test)
        plain = model(batch.tokens, batch.price, batch.context, batch.attention_mask,
                      predict_mask=batch.predict_mask)["product_logits"]
        with_history = run(model, batch)["product_logits"]
    rows = batch.predict_mask.nonzero()[:, 0]
    diff = with_history - plain  # [N_pred, V]
    for i, b in enumerate(rows.tolist()):
        own = {t: c for t, c in zip(batch.history_tokens[b].tolist(), batch.history_counts[b].tolist()) if t != PAD}
        total = sum(own.values())
        for t, c in own.items():  # initial gates: +1 per log(1 + count), +1 per unit of share, +1 for presence
            assert diff[i, t].item() == pytest.approx(math.log1p(c) + c / total + 1.0, rel=1e-4)
        others = [t for t in range(diff.shape[1]) if t not in own]
        assert torch.all(diff[i, others] == 0)
    full = run(model, batch, predict=False)["product_logits"]  # [B, S, V] path agrees
    assert torch.allclose(full[batch.predict_mask], with_history, atol=1e-5)


def test_slot_scorer_reads_each_slots_features_and_touches_only_the_memory():
    """The per-slot features, by brute force; the scorer's bonus lands on the shopper's own products only,
    and it does change them once its weights are not (near) zero."""
    model, batch = make_model(), make_batch(B=5, S=7, seed=4)
    model.eval()
    counts = batch.history_counts
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)
    cooc = model._cooccurrence_scores(batch.tokens, batch.attention_mask)
    features = model._slot_features(batch.history_tokens, counts, share, batch.history_past, cooc,
                                    batch.history_recency, batch.history_decayed)
    K = counts.shape[1]
    for b in range(len(batch)):
        n = max(batch.history_past[b].item(), 1.0)
        for k in range(K):
            c, t = counts[b, k].item(), batch.history_tokens[b, k].item()
            rate = min(c / n, 1.0)
            gap, decayed = batch.history_recency[b, k].item(), batch.history_decayed[b, k].item()
            expected = [math.log1p(c), share[b, k].item(), rate, math.log(max(rate, math.exp(-5.0))),
                        math.log1p(n) / 5.0, k / (K - 1), cooc[b, t].item() if t >= N_SPECIAL else cooc[b, 0].item(),
                        float(c > 0), math.log1p(gap) / 5.0, float(gap == 0 and c > 0), decayed,
                        (math.log(max(decayed, math.exp(-7.0))) + 7.0) / 7.0 if c > 0 else 0.0]
            assert features[b, k].tolist() == pytest.approx(expected, abs=1e-6), (b, k)
    with torch.no_grad():
        off = run(model, batch)["product_logits"]
        for p in model.slot_scorer.parameters():
            p.add_(0.5)
        on = run(model, batch)["product_logits"]
    rows = batch.predict_mask.nonzero()[:, 0]
    diff = on - off
    for i, b in enumerate(rows.tolist()):
        own = [t for t in batch.history_tokens[b].tolist() if t != PAD]
        others = [t for t in range(diff.shape[1]) if t not in own]
        assert torch.all(diff[i, others] == 0)
        assert all(diff[i, t].abs().item() > 1e-3 for t in own)


def test_cooccurrence_path_raises_the_visible_products_neighbours():
    """At initialisation (gate 1) the path adds, at every predicted position of a basket, the visible
    products' neighbour similarities summed and divided by the basket's max: computed here by brute force."""
    K = 3
    config = TINY.model_copy(update={"cooccurrence_neighbours": K})
    g = torch.Generator().manual_seed(7)
    neighbours = torch.randint(N_SPECIAL, V, (V, K), generator=g)
    neighbours[:, -1] = PAD  # a padded slot (weight 0)
    weights = torch.rand(V, K, generator=g).masked_fill(neighbours == PAD, 0.0)
    weights[:N_SPECIAL] = 0.0
    torch.manual_seed(0)
    table = torch.randn(V, config.product_dim, generator=torch.Generator().manual_seed(1))
    with_path = WorldModel(config, product_embeddings=table, product_neighbours=(neighbours.numpy(), weights.numpy()))
    without = WorldModel(config, product_embeddings=table)
    without.load_state_dict({k: v for k, v in with_path.state_dict().items() if not k.startswith("product_neighbour")},
                            strict=False)
    batch = make_batch(B=4, S=6, seed=5)
    with_path.eval(), without.eval()
    with torch.no_grad():
        diff = run(with_path, batch)["product_logits"] - run(without, batch)["product_logits"]  # [N_pred, V]
    rows = batch.predict_mask.nonzero()[:, 0].tolist()
    for i, b in enumerate(rows):
        sums = torch.zeros(V)
        for t, real in zip(batch.tokens[b].tolist(), batch.attention_mask[b].tolist()):
            if real and t >= N_SPECIAL:  # visible: not PAD, not MASK
                for n, w in zip(neighbours[t].tolist(), weights[t].tolist()):
                    sums[n] += w
        sums[:N_SPECIAL] = 0.0
        expected = sums / sums.max() if sums.max() > 0 else sums
        assert torch.allclose(diff[i], expected, atol=1e-5)
    assert (diff.abs().sum(dim=1) > 0).all()


def test_the_cache_vocabulary_puts_the_special_tokens_at_their_ids():
    """The model masks ids below N_SPECIAL; the cache's vocabulary must hold PAD/MASK/UNK exactly there."""
    import polars as pl

    from retailsim_pipeline.config import SPECIAL_CODES
    from retailsim_pipeline.prep.fitting import build_vocabulary

    train = pl.LazyFrame({"products": [["B", "A"], ["A"]]})
    products = pl.DataFrame({"PROD_CODE": ["A", "B"], "first_week": [1, 1], "last_week": [2, 2]})
    vocab = build_vocabulary(train, products)
    codes = dict(zip(vocab["token_id"].to_list(), vocab["PROD_CODE"].to_list()))
    assert [codes[PAD], codes[MASK], codes[UNK]] == list(SPECIAL_CODES)
    assert min(t for t, c in codes.items() if c not in SPECIAL_CODES) == N_SPECIAL
    assert codes[N_SPECIAL] == "A"  # the most frequent train product comes first


def test_output_shapes_for_a_padded_batch():
    model, batch = make_model(), make_batch()
    B, S = batch.tokens.shape
    out = run(model, batch)
    n_pred = int(batch.predict_mask.sum())
    assert 0 < n_pred < int(batch.attention_mask.sum())
    assert out["product_logits"].shape == (n_pred, V)
    assert out["hidden"].shape == (B, S, TINY.d_model)
    assert set(out["aux"]) == set(AUX_HEADS)
    for name, logits in out["aux"].items():
        assert logits.shape == (B, AUX_CLASSES[name])
    assert torch.isfinite(out["product_logits"]).all() and torch.isfinite(out["hidden"]).all()
    assert (out["hidden"][~batch.attention_mask] == 0).all()
    assert run(model, batch, predict=False)["product_logits"].shape == (B, S, V)


def test_predict_mask_selects_the_same_rows_as_full_logits():
    model, batch = make_model(), make_batch()
    model.eval()
    with torch.no_grad():
        selected = run(model, batch)["product_logits"]
        full = run(model, batch, predict=False)["product_logits"]
    torch.testing.assert_close(selected, full[batch.predict_mask], rtol=1e-5, atol=1e-6)


def test_padding_does_not_reach_real_positions():
    model, batch = make_model(), make_batch()
    model.eval()
    pad = ~batch.attention_mask
    assert pad.any()
    g = torch.Generator().manual_seed(7)
    tokens = torch.where(pad, torch.randint(N_SPECIAL, V, batch.tokens.shape, generator=g), batch.tokens)
    price = torch.where(pad[..., None], torch.randn(batch.price.shape, generator=g), batch.price)
    with torch.no_grad():
        a = run(model, batch)
        b = model(**{**batch.model_inputs(), "tokens": tokens, "price": price}, predict_mask=batch.predict_mask)
    real = batch.attention_mask
    torch.testing.assert_close(a["hidden"][real], b["hidden"][real], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["product_logits"], b["product_logits"], rtol=0, atol=1e-6)
    for name in AUX_HEADS:
        torch.testing.assert_close(a["aux"][name], b["aux"][name], rtol=0, atol=1e-6)


def test_padding_does_not_change_a_basket_padded_further():
    """The same baskets padded to S and to S + 3 give the same outputs at their real positions."""
    model, batch = make_model(), make_batch()
    model.eval()
    extra = 3
    B, S = batch.tokens.shape
    tokens = torch.cat([batch.tokens, torch.full((B, extra), 17)], dim=1)  # garbage under the padding
    price = torch.cat([batch.price, torch.randn(B, extra, 64)], dim=1)
    mask = torch.cat([batch.attention_mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    predict = torch.cat([batch.predict_mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = run(model, batch)
        b = model(**{**batch.model_inputs(), "tokens": tokens, "price": price, "attention_mask": mask},
                  predict_mask=predict)
    torch.testing.assert_close(a["product_logits"], b["product_logits"], rtol=1e-5, atol=1e-5)
    for name in AUX_HEADS:
        torch.testing.assert_close(a["aux"][name], b["aux"][name], rtol=1e-5, atol=1e-5)


def test_mask_positions_use_the_mask_embedding_not_the_table():
    model, batch = make_model(), make_batch()
    model.eval()
    with torch.no_grad():
        before = run(model, batch)
        # Whatever the table holds for MASK, or which product hides under the MASK, is never read.
        model.product_table[MASK] = torch.randn(TINY.product_dim)
        targets = torch.where(batch.predict_mask, (batch.targets + 5 - N_SPECIAL) % (V - N_SPECIAL) + N_SPECIAL,
                              batch.targets)
        after = run(model, Batch(**{**batch.__dict__, "targets": targets}))
        torch.testing.assert_close(before["product_logits"], after["product_logits"], rtol=0, atol=0)
        # ...whereas the learned MASK embedding is.
        model.mask_embedding.add_(1.0)
        changed = run(model, batch)
    assert not torch.allclose(before["product_logits"], changed["product_logits"], atol=1e-4)


def test_every_parameter_gets_a_finite_nonzero_gradient():
    model, batch = make_model(), make_batch(B=6, S=7, seed=3)
    model.train()
    loss_fn = WorldModelLoss(TrainingConfig(model=TINY))
    total, parts = loss_fn(run(model, batch), batch, "main")
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert model.product_table.grad is None and not model.product_table.requires_grad


def test_tiny_model_overfits_one_batch():
    model, batch = make_model(seed=1), make_batch(B=8, S=7, seed=11)
    batch = dataclasses.replace(batch, history_tokens=None, history_counts=None)  # random memories: noise here
    loss_fn = WorldModelLoss(TrainingConfig(model=TINY))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(400):
        total, parts = loss_fn(run(model, batch), batch, "warmup")
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
        if losses[-1] < 0.01 * losses[0]:
            break
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    model.eval()
    with torch.no_grad():
        predicted = run(model, batch)["product_logits"].argmax(dim=-1)
    assert torch.equal(predicted, batch.targets[batch.predict_mask])


def test_seed_preset_has_about_23m_parameters():
    with torch.device("meta"):
        model = WorldModel(MODEL_PRESETS["seed"])
    n = count_parameters(model)
    assert 0.9 * 23e6 <= n <= 1.1 * 23e6, n
    assert n == 23_365_681  # the breakdown in WorldModel's docstring
    assert "product_table" in dict(model.named_buffers())
    assert "product_table" not in dict(model.named_parameters())
    assert {"product_neighbours", "product_neighbour_weights"} <= set(dict(model.named_buffers()))


def test_no_decay_groups():
    model = make_model()
    names = no_decay_parameter_names(model)
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert "encoder_layers.0.mixer.A_log" in names and "encoder_layers.0.mixer.D" in names
    assert "encoder_layers.0.norm.weight" in names and "decoder_norm.weight" in names
    assert "product_head.0.bias" in names and "encoder_layers.0.mixer.dt_proj.bias" in names
    for decayed in ("product_head.0.weight", "encoder_layers.0.mixer.in_proj.weight", "position_embedding.weight",
                    "product_residual.weight", "mask_embedding", "decoder_layers.0.self_attn.in_proj_weight"):
        assert decayed not in names, decayed


def test_mamba_initialisation_is_left_alone():
    """The model-wide init must not touch Mamba's S4D A, its dt bias or its skip D."""
    model = make_model()
    mixer = model.encoder_layers[0].mixer
    A = torch.arange(1, TINY.d_state + 1, dtype=torch.float32).repeat(mixer.d_inner, 1)
    torch.testing.assert_close(mixer.A_log, torch.log(A))
    assert (mixer.D == 1).all()
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-4 * 0.99).all() and (dt <= 0.1 * 1.01).all()


def test_state_dict_round_trip(tmp_path):
    model, batch = make_model(), make_batch()
    model.eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    restored = WorldModel(TINY)  # no table: it comes back with the state_dict
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.eval()
    with torch.no_grad():
        a, b = run(model, batch), run(restored, batch)
    assert torch.equal(a["product_logits"], b["product_logits"])
    for name in AUX_HEADS:
        assert torch.equal(a["aux"][name], b["aux"][name])


def test_product_table_from_a_read_only_numpy_array():
    import numpy as np

    table = np.random.default_rng(0).standard_normal((V, TINY.product_dim)).astype(np.float32)
    table.setflags(write=False)  # as the cache's memory-mapped array
    model = WorldModel(TINY, product_embeddings=table)
    assert torch.equal(model.product_table, torch.from_numpy(table.copy()))
    assert not model.product_table.requires_grad


def test_product_table_shape_is_checked():
    with pytest.raises(ValueError, match="n_products"):
        WorldModel(TINY, product_embeddings=torch.zeros(V + 1, TINY.product_dim))


def test_demo_preset_step_time_on_cpu():
    """Not a benchmark: guards against an accidental [B, S, V] materialisation or a slow path in the loop."""
    config = MODEL_PRESETS["demo"].model_copy(update={"n_products": 1003})
    model = make_model(config)
    batch = make_batch(B=64, S=20, seed=5, n_products=1003, mask_prob=0.15)
    loss_fn = WorldModelLoss(TrainingConfig(model=config))
    start = time.perf_counter()
    total, _ = loss_fn(run(model, batch), batch, "main")
    total.backward()
    assert time.perf_counter() - start < 10.0
