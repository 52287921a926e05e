"""Distillation losses: exact values at the special points, gradients in closed form and by finite differences,
masking, the CE mix and the feature loss."""


import pytest
import torch

from posttrain.compress.distill_losses import (FeatureProjector, distillation_terms, forward_kl, generalized_jsd,
                                               hidden_state_loss, reverse_kl, token_divergence, uniform_layer_map)


def _logits(seed, shape=(2, 5, 11), scale=3.0, dtype=torch.float64):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale)


def _reference_kl(p_logits, q_logits):
    p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, lambda s, t, **k: generalized_jsd(s, t, beta=0.3, **k)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_is_zero_with_zero_gradient_when_student_is_teacher(fn, temperature):
    teacher = _logits(0)
    student = teacher.clone().requires_grad_(True)
    loss = fn(student, teacher, temperature=temperature)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-12
    assert student.grad.abs().max() < 1e-12


def test_forward_and_reverse_kl_match_the_definitions():
    s, t = _logits(0), _logits(1)
    torch.testing.assert_close(forward_kl(s, t), _reference_kl(t, s).mean())
    torch.testing.assert_close(reverse_kl(s, t), _reference_kl(s, t).mean())
    assert float(forward_kl(s, t)) != pytest.approx(float(reverse_kl(s, t)))  # KL is not symmetric


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gjsd_at_beta_zero_and_one_is_forward_and_reverse_kl_exactly(temperature):
    s, t = _logits(0), _logits(1)
    tau = temperature
    assert torch.equal(generalized_jsd(s, t, beta=0.0, temperature=tau), forward_kl(s, t, temperature=tau))
    assert torch.equal(generalized_jsd(s, t, beta=1.0, temperature=tau), reverse_kl(s, t, temperature=tau))


def test_gjsd_mixture_matches_its_definition_and_tends_to_the_kls_at_the_ends():
    s, t = _logits(0), _logits(1)
    beta = 0.3
    p_t, p_s = torch.softmax(t, -1), torch.softmax(s, -1)
    m = beta * p_t + (1 - beta) * p_s
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)
    expected = (beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)).mean()
    torch.testing.assert_close(generalized_jsd(s, t, beta=beta), expected)
    # why β = 0 / 1 are defined as the KLs: GJSD(β)/β -> KL(p_T‖p_S) and GJSD(β)/(1-β) -> KL(p_S‖p_T)
    eps = 1e-7  # the second-order term is β·max(p_T/p_S): eps must be small against the largest ratio
    assert float(generalized_jsd(s, t, beta=eps)) / eps == pytest.approx(float(forward_kl(s, t)), rel=1e-3)
    assert float(generalized_jsd(s, t, beta=1 - eps)) / eps == pytest.approx(float(reverse_kl(s, t)), rel=1e-3)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_tau_squared_scaling_closed_form_gradient_and_finite_differences(temperature):
    s, t = _logits(0, (3, 7)), _logits(1, (3, 7))
    s.requires_grad_(True)
    loss = forward_kl(s, t, temperature=temperature, reduction="sum")
    loss.backward()
    # d/dz_S of τ² KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) = τ (p_S − p_T): the τ² cancels the 1/τ² of the soft targets
    closed = temperature * (torch.softmax(s.detach() / temperature, -1) - torch.softmax(t / temperature, -1))
    torch.testing.assert_close(s.grad, closed)
    # and the value itself is τ² times the plain KL of the softened distributions
    plain = _reference_kl(t / temperature, s.detach() / temperature).sum()
    torch.testing.assert_close(loss.detach(), temperature**2 * plain)
    h = 1e-6
    for index in [(0, 0), (1, 3), (2, 6)]:
        bumped = [s.detach().clone(), s.detach().clone()]
        bumped[0][index] += h
        bumped[1][index] -= h
        numeric = (forward_kl(bumped[0], t, temperature=temperature, reduction="sum")
                   - forward_kl(bumped[1], t, temperature=temperature, reduction="sum")) / (2 * h)
        assert float(numeric) == pytest.approx(float(s.grad[index]), abs=1e-7)


def test_mask_selects_positions_and_sum_mean_agree():
    s, t = _logits(0), _logits(1)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1:4], mask[1, 0] = True, True
    per_token = _reference_kl(t, s)
    torch.testing.assert_close(forward_kl(s, t, mask, reduction="sum"), per_token[mask].sum())
    torch.testing.assert_close(forward_kl(s, t, mask), per_token[mask].mean())
    # masked-out positions do not matter, even if they are garbage
    s2 = s.clone()
    s2[~mask] = 1e4
    torch.testing.assert_close(forward_kl(s2, t, mask), forward_kl(s, t, mask))
    empty = torch.zeros(2, 5, dtype=torch.bool)
    assert float(forward_kl(s, t, empty)) == 0.0


def test_zero_probabilities_stay_finite():
    t = _logits(1, (4, 6))
    t[:, 0] = float("-inf")  # a vocabulary entry the teacher can never produce
    s = _logits(0, (4, 6))
    # (reverse KL against a token the teacher gives probability 0 is +inf by definition, so it is not checked)
    for kind in ("forward_kl", "gjsd"):
        assert torch.isfinite(token_divergence(s, t, kind=kind)).all()


def test_cross_entropy_mix():
    s, t = _logits(0), _logits(1)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    terms = distillation_terms(s, t, labels=labels, alpha=0.25, temperature=2.0)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 11), labels.reshape(-1))
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["total"], 0.25 * ce + 0.75 * forward_kl(s, t, temperature=2.0))
    with pytest.raises(ValueError, match="pass labels"):
        distillation_terms(s, t, alpha=0.5)


def test_uniform_layer_map_pairs_the_last_layers():
    assert uniform_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert uniform_layer_map(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert uniform_layer_map(1, 5) == [(0, 4)]
    assert uniform_layer_map(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]  # round(1.5)=2, round(4.5)=5: halves go up
    assert all(t == round((s + 1) * 12 / 5 + 1e-9) - 1 for s, t in uniform_layer_map(5, 12))


def test_hidden_state_loss_mse_cosine_and_projection():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 5, 4, generator=g) for _ in range(2)]
    teacher = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    projector = FeatureProjector(4, 8, 2)
    layer_map = uniform_layer_map(2, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        projected = [projector(k, student[s]) for k, (s, _) in enumerate(layer_map)]
        mse = sum(((p - teacher[t]) ** 2).mean() for p, (_, t) in zip(projected, layer_map)) / 2
        torch.testing.assert_close(hidden_state_loss(student, teacher, projector, layer_map, mask), mse)
        same = hidden_state_loss(teacher, teacher, FeatureProjector(8, 8, 1), [(1, 1)], mask, kind="cosine")
        assert float(same) == pytest.approx(0.0, abs=1e-6)  # equal widths start as the identity
    with pytest.raises(ValueError, match="identity projection needs equal widths"):
        FeatureProjector(4, 8, 1, kind="identity")
