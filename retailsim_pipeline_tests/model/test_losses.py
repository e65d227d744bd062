"""The losses against hand-computed values and torch's own cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from retailsim_pipeline.config import AUX_CLASSES, AUX_HEADS, LossWeights, TrainingConfig
from retailsim_pipeline.model.losses import (
    LOSS_PARTS,
    WorldModelLoss,
    aux_losses,
    exclude_visible,
    focal_loss,
    info_nce,
)
from retailsim_pipeline.model.batch import IGNORE_INDEX, Batch


# ------------------------------------------------------------------------------------------------------------
# focal_loss
# ------------------------------------------------------------------------------------------------------------


def test_focal_with_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 11, generator=g) * 3
    targets = torch.randint(0, 11, (32,), generator=g)
    assert torch.equal(focal_loss(logits, targets, gamma=0.0), F.cross_entropy(logits, targets))
    assert torch.equal(focal_loss(logits, targets, gamma=0.0, reduction="none"),
                       F.cross_entropy(logits, targets, reduction="none"))
    # The general formula agrees too (γ → 0 through the gamma != 0 code path).
    torch.testing.assert_close(focal_loss(logits, targets, gamma=1e-12), F.cross_entropy(logits, targets))


def test_focal_hand_computed_two_classes():
    # logits (0, ln 3): softmax (1/4, 3/4).
    #   target 1: p_t = 3/4, loss = -(1/4)^2 · ln(3/4) = 0.0625 · 0.2876821 = 0.01798013
    #   target 0: p_t = 1/4, loss = -(3/4)^2 · ln(1/4) = 0.5625 · 1.3862944 = 0.77979058
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    targets = torch.tensor([1, 0])
    per_row = focal_loss(logits, targets, gamma=2.0, reduction="none")
    torch.testing.assert_close(per_row, torch.tensor([0.01798013, 0.77979058]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(focal_loss(logits, targets, gamma=2.0), torch.tensor((0.01798013 + 0.77979058) / 2))
    torch.testing.assert_close(focal_loss(logits, targets, gamma=2.0, reduction="sum"),
                               torch.tensor(0.01798013 + 0.77979058))


def test_focal_is_at_most_cross_entropy_and_fp32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=g) * 4
    targets = torch.randint(0, 50, (64,), generator=g)
    ce = F.cross_entropy(logits, targets, reduction="none")
    focal = focal_loss(logits, targets, gamma=2.0, reduction="none")
    assert (focal <= ce + 1e-7).all() and (focal >= 0).all()
    assert (focal < ce).any()
    bf16 = focal_loss(logits.bfloat16(), targets, gamma=2.0)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, focal.mean(), rtol=2e-2, atol=2e-2)


def test_focal_ignores_ignore_index_and_handles_no_targets():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 5, generator=g, requires_grad=True)
    targets = torch.tensor([0, IGNORE_INDEX, 3, 4, IGNORE_INDEX, 1])
    keep = targets != IGNORE_INDEX
    torch.testing.assert_close(focal_loss(logits, targets, gamma=2.0),
                               focal_loss(logits[keep], targets[keep], gamma=2.0))
    empty = focal_loss(logits, torch.full((6,), IGNORE_INDEX), gamma=2.0)
    assert empty.item() == 0.0
    empty.backward()
    assert logits.grad is not None and (logits.grad == 0).all()


# ------------------------------------------------------------------------------------------------------------
# info_nce
# ------------------------------------------------------------------------------------------------------------


def two_baskets(first: list[list[float]], second: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.tensor([first, second])  # [2, 2, d]
    return hidden, torch.ones(2, 2, dtype=torch.bool)


def test_info_nce_hand_made_case():
    tau = 0.07
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # Each basket's two vectors point the same way, the baskets are orthogonal: every anchor's positive has
    # similarity 1, its two negatives 0 → loss = -log(e^{1/τ} / (e^{1/τ} + 2)) = log(1 + 2 e^{-1/τ}) ≈ 1.2e-6,
    # the loss's infimum being 0.
    aligned = info_nce(*two_baskets([e1, e1], [e2, e2]), temperature=tau)
    torch.testing.assert_close(aligned, torch.tensor(math.log1p(2 * math.exp(-1 / tau))))
    assert aligned < 1e-5
    # Swapped assignment: each basket holds one e1 and one e2, so the positive is orthogonal and a negative is
    # identical → loss = -log(1 / (1 + e^{1/τ} + 1)) = log(2 + e^{1/τ}) ≈ 14.29.
    swapped = info_nce(*two_baskets([e1, e2], [e1, e2]), temperature=tau)
    torch.testing.assert_close(swapped, torch.tensor(math.log(2 + math.exp(1 / tau))))
    assert swapped > 14.0


def test_info_nce_general_formula_and_scale_invariance():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 2, 3, generator=g)
    mask = torch.ones(2, 2, dtype=torch.bool)
    z = F.normalize(hidden.reshape(4, 3), dim=-1)
    sim = z @ z.t() / 0.5
    expected = []
    for i in range(4):
        pos = i ^ 1  # the other product of the same basket
        others = [j for j in range(4) if j != i]
        expected.append(-(sim[i, pos] - torch.logsumexp(sim[i, others], dim=0)))
    torch.testing.assert_close(info_nce(hidden, mask, temperature=0.5), torch.stack(expected).mean())
    torch.testing.assert_close(info_nce(hidden * 7.0, mask, temperature=0.5), info_nce(hidden, mask, 0.5))


def test_info_nce_ignores_padding():
    tau = 0.1
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    hidden, mask = two_baskets([e1, e1], [e2, e2])
    padded = torch.cat([hidden, torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]]) * 100], dim=1)  # garbage padding
    padded_mask = torch.cat([mask, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(info_nce(padded, padded_mask, temperature=tau), info_nce(hidden, mask, temperature=tau))


def test_info_nce_single_product_baskets_have_no_anchor():
    hidden = torch.randn(3, 4, 8, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, 0] = True  # three baskets of one product: negatives for each other, but nobody has a positive
    loss = info_nce(hidden, mask)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and (hidden.grad == 0).all()
    # One two-product basket among them: only its two products are anchors, the singletons are negatives.
    mask[1, 1] = True
    h = hidden.detach()
    z = F.normalize(torch.stack([h[0, 0], h[1, 0], h[1, 1], h[2, 0]]), dim=-1)
    sim = z @ z.t() / 0.07
    anchor_1 = -(sim[1, 2] - torch.logsumexp(sim[1, [0, 2, 3]], dim=0))
    anchor_2 = -(sim[2, 1] - torch.logsumexp(sim[2, [0, 1, 3]], dim=0))
    torch.testing.assert_close(info_nce(h, mask), (anchor_1 + anchor_2) / 2)


def test_info_nce_subsamples_deterministically():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(16, 12, 8, generator=g)
    mask = torch.arange(12)[None] < torch.randint(1, 13, (16, 1), generator=g)
    a = info_nce(hidden, mask, max_per_basket=4, generator=torch.Generator().manual_seed(9))
    b = info_nce(hidden, mask, max_per_basket=4, generator=torch.Generator().manual_seed(9))
    c = info_nce(hidden, mask, max_per_basket=4, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # With max_per_basket ≥ S every real position is used, whatever the draw.
    full_a = info_nce(hidden, mask, max_per_basket=12, generator=torch.Generator().manual_seed(1))
    full_b = info_nce(hidden, mask, max_per_basket=12, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(full_a, full_b)


# ------------------------------------------------------------------------------------------------------------
# aux_losses and WorldModelLoss
# ------------------------------------------------------------------------------------------------------------


def fake_outputs_and_batch(seed: int = 0, B: int = 6, S: int = 5, V: int = 13, d: int = 8):
    """Model-shaped outputs (leaf tensors with grad) and a matching batch, built by hand."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 2, 4, 5])[:B]
    attention_mask = torch.arange(S)[None] < lengths[:, None]
    predict = attention_mask & (torch.rand(B, S, generator=g) < 0.4)
    predict[0, 0] = True
    targets = torch.randint(3, V, (B, S), generator=g).masked_fill(~predict, IGNORE_INDEX)
    labels = torch.stack([torch.randint(0, AUX_CLASSES[h], (B,), generator=g) for h in AUX_HEADS], dim=1)
    batch = Batch(tokens=torch.zeros(B, S, dtype=torch.long), targets=targets, attention_mask=attention_mask,
                  price=torch.zeros(B, S, 64), context=torch.zeros(B, 400), labels=labels, index=torch.arange(B))
    outputs = {
        "product_logits": torch.randn(int(predict.sum()), V, generator=g).requires_grad_(),
        "hidden": torch.randn(B, S, d, generator=g).requires_grad_(),
        "aux": {h: torch.randn(B, AUX_CLASSES[h], generator=g).requires_grad_() for h in AUX_HEADS},
    }
    return outputs, batch


def test_aux_losses_are_cross_entropies_per_column():
    outputs, batch = fake_outputs_and_batch()
    losses = aux_losses(outputs["aux"], batch.labels)
    assert list(losses) == list(AUX_HEADS)
    for i, h in enumerate(AUX_HEADS):
        assert torch.equal(losses[h], F.cross_entropy(outputs["aux"][h], batch.labels[:, i]))


def test_the_softmax_excludes_the_baskets_visible_products():
    """Each predicted position competes only with products not in view: its basket's real, unpredicted
    tokens get -inf; its own and the other predicted positions' tokens, other baskets' products and an
    answer that is also visible (two lines of one product) are untouched. Switchable by the config."""
    V = 10
    tokens = torch.tensor([[4, 1, 5, 6, 0], [7, 8, 8, 1, 0]])  # MASK = 1, PAD = 0
    attention_mask = tokens != 0
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[0, 1], targets[0, 3] = 9, 6  # basket 0: a MASKed position and a kept-unchanged one
    targets[1, 3] = 8  # basket 1: the answer 8 is also visible on two other lines
    batch = Batch(tokens=tokens, targets=targets, attention_mask=attention_mask, price=torch.zeros(2, 5, 64),
                  context=torch.zeros(2, 400), labels=torch.zeros(2, 4, dtype=torch.long), index=torch.arange(2))
    logits = torch.zeros(3, V)
    out = exclude_visible(logits, batch)
    inf = float("-inf")
    assert out[0].tolist() == [inf, 0, 0, 0, inf, inf, 0, 0, 0, 0]  # 4 and 5 visible; 6 is predicted, not visible
    assert out[1].tolist() == out[0].tolist()
    assert out[2].tolist() == [inf, 0, 0, 0, 0, 0, 0, inf, 0, 0]  # 7 visible; 8 is the answer: kept
    outputs = {"product_logits": torch.zeros(3, V, requires_grad=True), "hidden": torch.zeros(2, 5, 8),
               "aux": {h: torch.zeros(2, AUX_CLASSES[h]) for h in AUX_HEADS}}
    on, _ = WorldModelLoss(TrainingConfig())(outputs, batch, "warmup")
    off, _ = WorldModelLoss(TrainingConfig(exclude_visible=False))(outputs, batch, "warmup")
    assert torch.isfinite(on) and on < off  # fewer competitors for the same answers


def test_warmup_trains_the_focal_loss_only():
    outputs, batch = fake_outputs_and_batch()
    loss_fn = WorldModelLoss(TrainingConfig())
    total, parts = loss_fn(outputs, batch, "warmup")
    focal = focal_loss(exclude_visible(outputs["product_logits"], batch), batch.targets[batch.predict_mask], gamma=2.0)
    assert torch.equal(total, focal)
    assert set(parts) == {*LOSS_PARTS, "total"}
    assert all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in parts.values())
    assert parts["contrastive"] > 0 and all(parts[h] > 0 for h in AUX_HEADS)
    total.backward()
    assert outputs["product_logits"].grad is not None
    assert outputs["hidden"].grad is None and all(outputs["aux"][h].grad is None for h in AUX_HEADS)


@pytest.mark.parametrize("phase", ["main", "finetune"])
def test_main_total_is_the_weighted_sum_of_parts(phase):
    outputs, batch = fake_outputs_and_batch(seed=1)
    weights = LossWeights(focal=0.5, contrastive=0.25, basket_size=0.1, price_sensitivity=0.07,
                          mission_type=0.05, mission_focus=0.03)
    loss_fn = WorldModelLoss(TrainingConfig(gamma=1.5, temperature=0.2, loss_weights=weights))
    gen = torch.Generator().manual_seed(0)
    total, parts = loss_fn(outputs, batch, phase, generator=gen)
    focal = focal_loss(exclude_visible(outputs["product_logits"], batch), batch.targets[batch.predict_mask], gamma=1.5)
    contrastive = info_nce(outputs["hidden"], batch.attention_mask, temperature=0.2,
                           generator=torch.Generator().manual_seed(0))
    aux = aux_losses(outputs["aux"], batch.labels)
    expected = (0.5 * focal + 0.25 * contrastive + 0.1 * aux["basket_size"] + 0.07 * aux["price_sensitivity"]
                + 0.05 * aux["mission_type"] + 0.03 * aux["mission_focus"])
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["total"], expected.detach())
    torch.testing.assert_close(parts["focal"], focal.detach())
    torch.testing.assert_close(parts["contrastive"], contrastive.detach())
    total.backward()
    assert outputs["hidden"].grad.abs().sum() > 0
    assert all(outputs["aux"][h].grad.abs().sum() > 0 for h in AUX_HEADS)


def test_full_logits_are_accepted_and_unknown_phase_rejected():
    outputs, batch = fake_outputs_and_batch(seed=2)
    B, S = batch.tokens.shape
    full = torch.zeros(B, S, outputs["product_logits"].shape[-1])
    full[batch.predict_mask] = outputs["product_logits"].detach()
    loss_fn = WorldModelLoss(TrainingConfig())
    selected, _ = loss_fn(outputs, batch, "warmup")
    from_full, _ = loss_fn({**outputs, "product_logits": full}, batch, "warmup")
    torch.testing.assert_close(from_full, selected.detach())
    with pytest.raises(ValueError, match="phase"):
        loss_fn(outputs, batch, "pretrain")
