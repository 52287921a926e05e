"""Exact values of the pure loss functions on fixed tensors."""

import math

import pytest
import torch

from posttrain.align.losses import dpo_loss, group_advantages, grpo_token_loss, k3_kl, nll_sum


def test_dpo_loss_equals_formula():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.5])
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: ρw = 0.5, ρl = -0.5 -> z = 0.1; pair 1: ρw = -1, ρl = 1.5 -> z = -0.25
    expected = [math.log1p(math.exp(-0.1)), math.log1p(math.exp(0.25))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)
    assert r_c.tolist() == pytest.approx([0.05, -0.1])
    assert r_r.tolist() == pytest.approx([-0.05, 0.15])


def test_dpo_loss_is_ln2_with_zero_margins_when_policy_equals_reference():
    logps = torch.tensor([-7.25, -3.5, -11.0])
    losses, r_c, r_r = dpo_loss(logps, logps + 1.0, logps, logps + 1.0, beta=0.3)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-7)
    assert (r_c - r_r).abs().max().item() == 0.0


def test_dpo_label_smoothing_is_conservative_dpo():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    z = 0.1
    expected = 0.8 * math.log1p(math.exp(-z)) + 0.2 * math.log1p(math.exp(z))
    assert losses.item() == pytest.approx(expected, abs=1e-7)


def test_dpo_gradient_is_zero_for_identical_pair():
    pc = torch.tensor([-4.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pc, torch.tensor([-4.0]), torch.tensor([-4.0]))
    losses.sum().backward()
    assert pc.grad.item() == 0.0


def test_group_advantages_are_per_group_with_bessel_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    adv = group_advantages(rewards, 4)
    std1 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # = 0.5
    std2 = math.sqrt(4 * 0.25 / 3)
    expected = [0.75 / (std1 + 1e-4)] + [-0.25 / (std1 + 1e-4)] * 3 + \
               [-0.5 / (std2 + 1e-4), 0.5 / (std2 + 1e-4), 0.5 / (std2 + 1e-4), -0.5 / (std2 + 1e-4)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_all_equal_group_gets_exactly_zero_never_nan():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), 4)
    assert torch.equal(adv, torch.zeros(8))


def test_invalid_samples_leave_the_group_statistics_and_get_zero():
    rewards = torch.tensor([1.0, 0.0, 5.0, 0.0])
    valid = torch.tensor([True, True, False, True])
    adv = group_advantages(rewards, 4, valid=valid)
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert adv[2].item() == 0.0
    assert adv[0].item() == pytest.approx((1 - mean) / (std + 1e-4), abs=1e-6)


def test_group_size_below_two_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([1.0, 0.0]), 1)


def test_dr_grpo_scale_none_only_centres():
    adv = group_advantages(torch.tensor([3.0, 1.0]), 2, scale="none")
    assert adv.tolist() == [1.0, -1.0]


def test_grpo_loss_on_policy_ratio_is_one_and_loss_is_minus_advantage():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, info = grpo_token_loss(logps, logps.detach(), torch.tensor([0.5]))
    assert loss.tolist() == [[-0.5, -0.5]]
    assert info["ratio"].tolist() == [[1.0, 1.0]]
    loss.sum().backward()
    assert logps.grad.tolist() == [[-0.5, -0.5]]  # ∇(−ρA) = −A at ρ = 1


def test_grpo_clipping_caps_positive_advantage_ratio():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    loss, info = grpo_token_loss(new, old, torch.tensor([1.0]), epsilon_low=0.2, epsilon_high=0.2)
    # A > 0: min(1.5, 1.2) = 1.2 (clipped), min(0.5, 0.8) = 0.5 (unclipped)
    assert loss.tolist()[0] == pytest.approx([-1.2, -0.5])
    assert info["clipped"].tolist() == [[1.0, 0.0]]
    loss.sum().backward()
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.5])


def test_k3_kl_is_zero_at_equality_and_matches_formula():
    a = torch.tensor([-1.0, -2.0])
    assert k3_kl(a, a).tolist() == [0.0, 0.0]
    kl = k3_kl(torch.tensor([-1.0]), torch.tensor([-1.5]))
    assert kl.item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-7)


def test_grpo_beta_needs_reference():
    with pytest.raises(ValueError, match="reference"):
        grpo_token_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), beta=0.1)


def test_nll_sum_counts_only_masked_tokens():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    total, count = nll_sum(logps, mask)
    assert total.item() == 7.0 and count.item() == 3.0


def test_ipo_loss_exact():
    from posttrain.align.losses import ipo_loss

    # h = 0.3 - (-0.2) = 0.5, target 1/(2*0.25) = 2 -> (0.5 - 2)^2 = 2.25
    assert ipo_loss(torch.tensor([0.3]), torch.tensor([-0.2]), beta=0.25).item() == pytest.approx(2.25)
    assert ipo_loss(torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1).item() == pytest.approx(25.0)


def test_simpo_loss_exact_with_paper_defaults():
    from posttrain.align.losses import simpo_loss

    # β(ℓw − ℓl) − γ = 2·(−1 + 1.5) − 0.5 = 0.5
    loss = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-7)


def test_orpo_odds_ratio_exact_and_stable():
    from posttrain.align.losses import log1mexp, orpo_odds_ratio

    lw, lr = -0.5, -2.0
    log_odds = (lw - lr) - (math.log(1 - math.exp(lw)) - math.log(1 - math.exp(lr)))
    loss, lo = orpo_odds_ratio(torch.tensor([lw]), torch.tensor([lr]))
    assert lo.item() == pytest.approx(log_odds, abs=1e-6)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-log_odds)), abs=1e-6)
    # Both branches of log1mexp, and finite gradients near 0 and far out.
    x = torch.tensor([-1e-6, -0.6931, -0.6932, -30.0], dtype=torch.float64, requires_grad=True)
    values = log1mexp(x)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert values.tolist() == pytest.approx(expected, rel=1e-9)
    values.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_orpo_full_objective_exact_nll_plus_lambda_odds_ratio():
    """The whole ORPO objective as the preference trainer computes it (`pair_losses`), by hand from ALGORITHMS.md §9:
    L = L_SFT + λ·L_OR, with L_SFT the chosen completion's token-mean NLL per pair (docs/decisions.md) and
    L_OR = −log σ(log odds(y_w) − log odds(y_l)), log odds(y) = ℓ − log(1 − e^ℓ), ℓ = summed log-prob / tokens."""
    from posttrain.align.preference import PreferenceSettings, pair_losses

    chosen_sums, chosen_counts = [-2.0, -4.5], [4, 3]
    rejected_sums, rejected_counts = [-6.0, -1.0], [3, 5]
    logps = torch.tensor(chosen_sums + rejected_sums, dtype=torch.float64)
    counts = torch.tensor(chosen_counts + rejected_counts, dtype=torch.float64)
    for lam in (0.1, 0.25):
        settings = PreferenceSettings(method="orpo", beta=None if lam == 0.1 else lam)  # None: λ's default, 0.1
        losses, r_c, r_r = pair_losses("orpo", settings, logps, counts, None)
        expected, exp_rc, exp_rr = [], [], []
        for sw, nw, sl, nl in zip(chosen_sums, chosen_counts, rejected_sums, rejected_counts):
            lw, ll = sw / nw, sl / nl
            log_odds = (lw - math.log(1 - math.exp(lw))) - (ll - math.log(1 - math.exp(ll)))
            odds_ratio_loss = -math.log(1 / (1 + math.exp(-log_odds)))
            expected.append(-lw + lam * odds_ratio_loss)
            exp_rc.append(lam * lw)
            exp_rr.append(lam * ll)
        assert losses.tolist() == pytest.approx(expected, rel=1e-12)
        assert r_c.tolist() == pytest.approx(exp_rc, rel=1e-12) and r_r.tolist() == pytest.approx(exp_rr, rel=1e-12)
    # Pair 1 worked by hand: ℓ_w = −0.5, ℓ_l = −2; log odds_w = −0.5 − ln(1 − e^−0.5) = 0.432752,
    # log odds_l = −2 − ln(1 − e^−2) = −1.854587; L_OR = ln(1 + e^−2.287339) = 0.096706; λ = 0.25 -> 0.5 + 0.024176.
    assert losses[0].item() == pytest.approx(0.524176, abs=1e-6)
