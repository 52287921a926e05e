"""Alignment objectives as pure functions on tensors (no models, no I/O). Each is unit-tested against exact values.

Conventions: log-probs are over completion tokens only; a "sequence log-prob" is the *sum* over its tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def nll_sum(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT: (−Σ log π over supervised tokens, number of supervised tokens). The caller normalises by the count
    of the whole accumulation window (token-mean over the effective batch), not per micro-batch."""
    return -(token_logps * mask).sum(), mask.sum()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(β[(logπ(y_w) − logπ_ref(y_w)) − (logπ(y_l) − logπ_ref(y_l))]).

    Inputs are summed completion log-probs per pair. With `label_smoothing` ε > 0 this is conservative DPO
    (cDPO, Mitchell 2023): −(1−ε)·log σ(βδ) − ε·log σ(−βδ). Returns (per-pair losses, chosen rewards β·ρ_w,
    rejected rewards β·ρ_l); the rewards are detached metrics. At policy == reference every loss is ln 2.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: Literal["group", "none"] = "group",
                     eps: float = 1e-4, valid: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024 §4.1.2): A_i = (r_i − mean_g(r)) / (std_g(r) + eps) per group.

    `rewards` is [N] with the G samples of each prompt contiguous. std is Bessel-corrected (n−1), as TRL does.
    A group whose rewards are all equal gets exactly 0 (never NaN). `valid` marks samples that have trainable
    tokens; invalid ones leave their group's mean and std and get advantage 0 (ALGORITHMS.md pitfall 19).
    `scale="none"` is Dr. GRPO (no division by the std).
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt to form a baseline, got group_size={group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    v = torch.ones_like(r) if valid is None else valid.float().view(-1, group_size)
    count = v.sum(dim=1, keepdim=True)
    mean = (r * v).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = (r - mean) * v
    if scale == "none":
        adv = centred
    else:
        var = (centred ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        adv = centred / (var.sqrt() + eps)
    # Groups of one valid sample have no baseline: their advantage is 0, like an all-equal group.
    adv = torch.where(count >= 2, adv, torch.zeros_like(adv))
    return adv.view(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π‖π_ref) (Schulman 2020): e^{ref−logπ} − (ref−logπ) − 1 ≥ 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1.0


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *,
                    epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
                    ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO per-token loss: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) + β·k3(π‖π_ref).

    `logps`/`old_logps`/`ref_logps` are [B, T] token log-probs, `advantages` is [B] (one per sequence). Returns the
    [B, T] loss (unmasked; the caller masks and normalises) and per-token diagnostics (ratio, clipped, kl).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    info = {"ratio": ratio.detach(), "clipped": (clipped < unclipped).float().detach()}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = k3_kl(logps, ref_logps)
        loss = loss + beta * kl
        info["kl"] = kl.detach()
    return loss, info


def ipo_loss(chosen_ratio_avg: torch.Tensor, rejected_ratio_avg: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al. 2023, ΨPO with Ψ = identity, eq. 17): (h − 1/(2τ))², τ = `beta`.

    The paper writes h with sequence log-ratios; like TRL (a choice confirmed with the IPO authors, TRL PR #1265)
    we take each side's log-ratio *averaged over its completion tokens*, h = ρ_w/|y_w| − ρ_l/|y_l|, so the target
    margin 1/(2τ) does not scale with length. The caller passes those averages. At policy == reference the loss is
    1/(4τ²) (25 for τ = 0.1).
    """
    h = chosen_ratio_avg - rejected_ratio_avg
    return (h - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): −log σ(β·avg-logπ(y_w) − β·avg-logπ(y_l) − γ), reference-free.

    Inputs are completion log-probs averaged over tokens. Defaults are the paper's: β = 2.0 and γ = 0.5
    (γ/β = 0.25, the official `gamma_beta_ratio`). Note TRL's CPO defaults differ (β 0.1, γ 0.5, plus an NLL
    term unless cpo_alpha = 0). Optional label smoothing as in the official code.
    """
    logits = beta * (chosen_avg - rejected_avg) - gamma
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −ln 2 (Mächler 2012): log(−expm1(x)) near 0,
    log1p(−exp(x)) further out. x = 0 (probability 1) gives −inf, as it must."""
    x = torch.clamp(x, max=0.0)
    near_zero = x > -0.6931471805599453
    return torch.where(near_zero, torch.log(-torch.expm1(torch.where(near_zero, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x))))


def orpo_odds_ratio(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eq. 6–7) on length-averaged log-probs ℓ:
    log odds(y) = ℓ − log(1 − e^ℓ); returns (L_OR = −log σ(log odds_w − log odds_l) per pair, the log-odds ratio).
    The full ORPO loss is L_SFT + λ·L_OR; the trainer adds the NLL term."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -F.logsigmoid(log_odds), log_odds


def kto_kl_baseline(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀ (Ethayarajh et al. 2024, eqs. 7–8): the batch estimate of KL(π_θ ‖ π_ref),
    mean(logπ_θ(y'|x) − logπ_ref(y'|x)) over *mismatched* pairs (x_i, y_j≠i), detached and clamped at 0.

    The caller must pass log-probs of mismatched pairs (ALGORITHMS.md pitfall 11); with matched pairs z₀ would be
    the batch's own mean log-ratio, so the loss would only push each reward away from that mean. No gradient flows
    through z₀ (the paper and HALOs do not back-propagate it). An empty input gives 0.
    """
    if kl_policy_logps.numel() == 0:
        return torch.zeros((), dtype=kl_policy_logps.dtype, device=kl_policy_logps.device)
    return (kl_policy_logps - kl_ref_logps).detach().mean().clamp(min=0.0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl_baseline: torch.Tensor | float, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8): per-example λ_y − v(x, y) with ρ = logπ_θ(y|x) − logπ_ref(y|x)
    (summed completion log-probs) and reference point z₀ = `kl_baseline`:

        desirable (label True):    λ_D·(1 − σ(β(ρ − z₀)))
        undesirable (label False): λ_U·(1 − σ(β(z₀ − ρ)))

    Defaults are the paper's (β = 0.1, λ_D = λ_U = 1). Returns (per-example losses, rewards β·ρ detached). Each
    example's loss depends only on its own ρ and z₀, so a batch holding a single label is finite and meaningful
    (pitfall 12). At policy == reference and z₀ = 0 every loss is exactly 0.5·λ_y.
    """
    ratio = policy_logps - ref_logps
    z0 = torch.as_tensor(kl_baseline, dtype=ratio.dtype, device=ratio.device).detach()
    # 1 − σ(t) is written σ(−t): the same value without the cancellation of 1 − (something close to 1).
    desirable = desirable_weight * torch.sigmoid(-beta * (ratio - z0))
    undesirable = undesirable_weight * torch.sigmoid(-beta * (z0 - ratio))
    losses = torch.where(labels.to(torch.bool), desirable, undesirable)
    return losses, beta * ratio.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | float | None = None,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """Reward-model loss per pair (Bradley–Terry; Stiennon et al. 2020, Ouyang et al. 2022): −log σ(r_w − r_l).

    With `margin` m (Llama 2, Touvron et al. 2023): −log σ(r_w − r_l − m). With `center_coefficient` c (Eisenstein
    et al. 2023, "Helping or herding?"): + c·(r_w + r_l)², which pins the mean reward near 0 (the preference term
    depends only on r_w − r_l). None leaves the term out (TRL's default; 0.01 is its recommended value). At r_w = r_l
    and no margin the loss is ln 2.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses
