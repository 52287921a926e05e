"""Exact values of the KTO and Bradley–Terry losses on fixed tensors (hand-computed in the comments)."""

import math

import pytest
import torch

from posttrain.align.losses import bradley_terry_loss, kto_kl_baseline, kto_loss


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_kto_loss_equals_formula_with_weights_and_reference_point():
    policy = torch.tensor([-1.0, -3.0, -2.0])
    ref = torch.tensor([-2.0, -2.0, -2.0])  # ρ = [1, -1, 0]
    labels = torch.tensor([True, False, True])
    losses, rewards = kto_loss(policy, ref, labels, torch.tensor(0.5), beta=0.1, desirable_weight=2.0,
                               undesirable_weight=1.5)
    # desirable: λ_D(1 − σ(β(ρ − z0))); undesirable: λ_U(1 − σ(β(z0 − ρ)))
    expected = [2.0 * (1 - sig(0.1 * (1 - 0.5))), 1.5 * (1 - sig(0.1 * (0.5 + 1))), 2.0 * (1 - sig(0.1 * (0 - 0.5)))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)
    assert rewards.tolist() == pytest.approx([0.1, -0.1, 0.0], abs=1e-7)


def test_kto_loss_is_one_half_at_policy_equal_reference():
    logps = torch.tensor([-7.25, -3.5, -11.0, -0.5])
    labels = torch.tensor([True, False, False, True])
    losses, rewards = kto_loss(logps, logps, labels, kto_kl_baseline(logps, logps))
    assert losses.tolist() == [0.5, 0.5, 0.5, 0.5]
    assert rewards.abs().max().item() == 0.0


def test_kto_gradient_at_policy_equal_reference_is_beta_over_four_and_skips_z0():
    policy = torch.tensor([-4.0, -4.0], requires_grad=True)
    z0 = torch.tensor(0.0, requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-4.0, -4.0]), torch.tensor([True, False]), z0, beta=0.1)
    losses.sum().backward()
    # d/dρ [1 − σ(βρ)] = −β·σ(0)·(1 − σ(0)) = −β/4; the undesirable side has the opposite sign.
    assert policy.grad.tolist() == pytest.approx([-0.025, 0.025], abs=1e-9)
    assert z0.grad is None


def test_kto_single_label_batches_are_finite():
    policy, ref = torch.tensor([-1.0, -9.0]), torch.tensor([-3.0, -2.0])
    for label in (True, False):
        labels = torch.tensor([label, label])
        losses, _ = kto_loss(policy, ref, labels, kto_kl_baseline(policy, ref))
        assert torch.isfinite(losses).all()
    # ρ = [2, -7], z0 = clamp(mean(2, -7), 0) = 0
    losses, _ = kto_loss(policy, ref, torch.tensor([True, True]), 0.0)
    assert losses.tolist() == pytest.approx([1 - sig(0.2), 1 - sig(-0.7)], abs=1e-7)


def test_kto_kl_baseline_is_the_detached_mean_clamped_at_zero():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    z0 = kto_kl_baseline(policy, torch.tensor([-1.5, -3.0]))  # diffs 0.5, 1.0
    assert z0.item() == pytest.approx(0.75) and not z0.requires_grad
    assert kto_kl_baseline(torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([-1.5, -2.5, -2.0])).item() == 0.0
    assert kto_kl_baseline(torch.tensor([]), torch.tensor([])).item() == 0.0


def test_bradley_terry_loss_equals_formula():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    losses = bradley_terry_loss(chosen, rejected)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))], abs=1e-7)


def test_bradley_terry_with_margin_and_centering():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    margin = torch.tensor([0.5, 0.0])  # r_w − r_l − m = [0.5, -0.5]
    losses = bradley_terry_loss(chosen, rejected, margin=margin)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))], abs=1e-7)
    centred = bradley_terry_loss(chosen, rejected, margin=margin, center_coefficient=0.01)  # + 0.01·(r_w + r_l)²
    assert (centred - losses).tolist() == pytest.approx([0.01 * 1.0, 0.01 * 0.25], abs=1e-7)


def test_bradley_terry_tie_is_ln2():
    scores = torch.tensor([0.3, -2.0])
    assert bradley_terry_loss(scores, scores).tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
