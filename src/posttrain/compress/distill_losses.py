"""Knowledge-distillation losses as pure functions of student and teacher outputs, with a token mask.

Per token, p_T = softmax(z_T / τ) and p_S = softmax(z_S / τ); only positions where `mask` is true count, and
`reduction="mean"` averages over them ("sum" gives the sum, for the engine's window normalisation; no token gives
an exact, finite 0).

Guarantees:
- forward KL(p_T ‖ p_S) (Hinton et al. 2015, mean-covering), reverse KL(p_S ‖ p_T) (mode-seeking, MiniLLM, Gu et al.
  2024) and the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024) with TRL's convention:
  m = β p_T + (1 − β) p_S, GJSD(β) = β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m). The mixture formula tends to 0 at both ends
  (GJSD(β)/β → forward KL as β → 0, GJSD(β)/(1 − β) → reverse KL as β → 1), so β = 0 and β = 1 are defined as forward
  and reverse KL exactly, as TRL does.
- Every divergence is multiplied by τ², so its gradient with respect to the logits keeps the same scale whatever τ
  (Hinton et al. 2015); the same factor for all three keeps GJSD(0) and GJSD(1) equal to the KLs at any τ.
- Each divergence is ≥ 0 and exactly 0, with a zero gradient, when the student's logits equal the teacher's.
  Probabilities that are exactly 0 contribute 0 (x log x → 0), so −inf logits (masked vocab) stay finite.
- The CE mix is α · CE(student logits at τ = 1, labels) + (1 − α) · divergence.
- Feature KD: L = mean over mapped layer pairs of MSE(P_l h_S, h_T) (mean over the teacher's width) or of
  1 − cos(P_l h_S, h_T), P_l a learned linear map d_S → d_T; the default layer map is uniform, student layer i ↔
  teacher layer round((i + 1) · L_T / L_S) − 1 (so the last layers are always paired).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

Divergence = Literal["forward_kl", "reverse_kl", "gjsd"]
Reduction = Literal["mean", "sum"]


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[..., D] -> [N, D] rows where `mask` is true (every row when no mask)."""
    return x[mask.to(x.device).bool()] if mask is not None else x.reshape(-1, x.shape[-1])


def _reduce(per_token: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / max(per_token.numel(), 1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Half precision loses the small differences a divergence is made of; float64 stays float64 (exact checks).
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log q) per row, with 0 · log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.log_softmax(_upcast(logits) / temperature, dim=-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: Divergence = "forward_kl",
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """τ² · divergence per row of [N, V] logits (see the module docstring)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    if kind == "gjsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        kind = "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "gjsd"
    if kind == "forward_kl":
        per_token = _kl_rows(log_t, log_s)
    elif kind == "reverse_kl":
        per_token = _kl_rows(log_s, log_t)
    elif kind == "gjsd":
        log_beta = torch.log(torch.tensor(beta, dtype=log_s.dtype, device=log_s.device))
        log_rest = torch.log(torch.tensor(1.0 - beta, dtype=log_s.dtype, device=log_s.device))
        log_m = torch.logsumexp(torch.stack([log_t + log_beta, log_s + log_rest]), dim=0)
        per_token = beta * _kl_rows(log_t, log_m) + (1.0 - beta) * _kl_rows(log_s, log_m)
    else:
        raise ValueError(f"unknown divergence {kind!r}: use forward_kl, reverse_kl or gjsd")
    return per_token * temperature**2


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
               temperature: float = 1.0, reduction: Reduction = "mean") -> torch.Tensor:
    """τ² · KL(p_T ‖ p_S) over the masked positions (Hinton et al. 2015)."""
    return _reduce(token_divergence(_select(student_logits, mask), _select(teacher_logits, mask),
                                    kind="forward_kl", temperature=temperature), reduction)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
               temperature: float = 1.0, reduction: Reduction = "mean") -> torch.Tensor:
    """τ² · KL(p_S ‖ p_T) over the masked positions (the divergence MiniLLM minimises)."""
    return _reduce(token_divergence(_select(student_logits, mask), _select(teacher_logits, mask),
                                    kind="reverse_kl", temperature=temperature), reduction)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
                    beta: float = 0.5, temperature: float = 1.0, reduction: Reduction = "mean") -> torch.Tensor:
    """τ² · GJSD(β) of GKD (Agarwal et al. 2024), TRL's convention; β = 0 / 1 are forward / reverse KL exactly."""
    return _reduce(token_divergence(_select(student_logits, mask), _select(teacher_logits, mask),
                                    kind="gjsd", beta=beta, temperature=temperature), reduction)


def distillation_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                       *, labels: torch.Tensor | None = None, kind: Divergence = "forward_kl", beta: float = 0.5,
                       temperature: float = 1.0, alpha: float = 0.0,
                       reduction: Reduction = "mean") -> dict[str, torch.Tensor]:
    """{"divergence", "ce", "total"}: total = α · CE(labels) + (1 − α) · τ² · divergence (CE at τ = 1, Hinton 2015).

    `labels` has the logits' leading shape (masked the same way) and is needed only when α > 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    s, t = _select(student_logits, mask), _select(teacher_logits, mask)
    divergence = _reduce(token_divergence(s, t, kind=kind, beta=beta, temperature=temperature), reduction)
    terms = {"divergence": divergence, "total": (1.0 - alpha) * divergence if alpha else divergence}
    if alpha:
        if labels is None:
            raise ValueError("alpha > 0 mixes in cross-entropy on the labels: pass labels")
        flat = labels[mask.to(labels.device).bool()] if mask is not None else labels.reshape(-1)
        ce = _reduce(torch.nn.functional.cross_entropy(_upcast(s), flat.to(s.device), reduction="none"), reduction)
        terms["ce"] = ce
        terms["total"] = alpha * ce + terms["total"]
    return terms


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                      **kwargs) -> torch.Tensor:
    """The total of `distillation_terms` (same arguments)."""
    return distillation_terms(student_logits, teacher_logits, mask, **kwargs)["total"]


# -- feature-level ----------------------------------------------------------------------------------------------
def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """[(student layer i, teacher layer round((i + 1) · L_T / L_S) − 1)], rounding halves up."""
    if n_student < 1 or n_teacher < 1:
        raise ValueError("both models need at least one layer")
    return [(i, (2 * (i + 1) * n_teacher + n_student) // (2 * n_student) - 1) for i in range(n_student)]


class FeatureProjector(nn.Module):
    """One learned linear map d_S → d_T per mapped layer pair; starts as the identity when the widths are equal
    (so it begins as plain hidden-state matching). `kind="identity"` has no parameters and needs equal widths."""

    def __init__(self, d_student: int, d_teacher: int, n_pairs: int, kind: Literal["linear", "identity"] = "linear"):
        super().__init__()
        if kind == "identity":
            if d_student != d_teacher:
                raise ValueError(f"an identity projection needs equal widths, not {d_student} -> {d_teacher}")
            self.maps = nn.ModuleList([nn.Identity() for _ in range(n_pairs)])
            return
        self.maps = nn.ModuleList([nn.Linear(d_student, d_teacher, bias=False) for _ in range(n_pairs)])
        if d_student == d_teacher:
            with torch.no_grad():
                for m in self.maps:
                    m.weight.copy_(torch.eye(d_student))

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.maps[index](hidden)


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                      projector: FeatureProjector | None, layer_map: Sequence[tuple[int, int]],
                      mask: torch.Tensor | None = None, *, kind: Literal["mse", "cosine"] = "mse",
                      reduction: Reduction = "mean") -> torch.Tensor:
    """Mean over the layer pairs of the per-token MSE (or 1 − cosine) between projected student and teacher
    hidden states [B, T, d], reduced over the masked tokens. `projector=None` compares them as they are."""
    if not layer_map:
        raise ValueError("the layer map is empty")
    per_token = None
    for k, (s_idx, t_idx) in enumerate(layer_map):
        h_s = _upcast(_select(student_hidden[s_idx], mask))
        h_t = _upcast(_select(teacher_hidden[t_idx], mask)).to(h_s.device)
        h_p = projector(k, h_s) if projector is not None else h_s
        if kind == "mse":
            term = (h_p - h_t).pow(2).mean(-1)
        elif kind == "cosine":
            term = 1.0 - torch.nn.functional.cosine_similarity(h_p, h_t, dim=-1)
        else:
            raise ValueError(f"feature loss must be 'mse' or 'cosine', got {kind!r}")
        per_token = term if per_token is None else per_token + term
    return _reduce(per_token / len(layer_map), reduction)
