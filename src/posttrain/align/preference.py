"""Pairwise preference trainer for DPO, IPO, SimPO and ORPO: one batching and log-prob path, the loss plugged in.

Guarantees:
- each pair's prompt is tokenized once and shared by chosen and rejected (identical prompt ids); pairs whose
  completion is emptied by truncation, or whose chosen and rejected are identical after truncation, are dropped and
  counted, never trained on (ALGORITHMS.md pitfalls 13, 14);
- for the length-normalised objectives (IPO, SimPO, ORPO) the longest common prefix of the two completions is moved
  into the prompt before averaging, leaving at least one token on each side (pitfall 20); token counts are clamped
  at 1 as a second line of defence (pitfall 15);
- chosen and rejected go through one forward (2B rows); the loss of a step is the mean over the window's pairs;
- DPO and IPO use a reference equal to the initial policy (a frozen copy or log-probs precomputed once), so at step 0
  DPO gives ln 2 and IPO 1/(4β²) with zero margins; SimPO and ORPO use no reference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Sequence

import torch

from ..data.collate import CompletionBatch, collate_completions
from ..data.tokenize import EncodedCompletion, encode_completion, encode_prompt
from .batching import windows
from .engine import Engine, LossOutput, TrainOptions, TrainResult, disable_dropout, set_seed, train_loop
from .logprobs import shared_prompt_logprobs
from .losses import dpo_loss, ipo_loss, orpo_odds_ratio, simpo_loss
from .reference import ReferenceMode, make_reference, run_frozen
from .sft import pad_id_of

PreferenceMethod = Literal["dpo", "ipo", "simpo", "orpo"]
NEEDS_REFERENCE = {"dpo": True, "ipo": True, "simpo": False, "orpo": False}
LENGTH_NORMALISED = {"dpo": False, "ipo": True, "simpo": True, "orpo": True}
# The mean, over the chosen and the rejected completions of the window's pairs, of the summed completion log-prob
# under the policy minus that under the reference: log π(y|x) − log π_ref(y|x) per sequence. It is 0 at step 0 and
# goes negative when training lowers the likelihood of the dataset's completions (DPO usually lowers both sides).
# It is not a KL estimate: the completions come from the dataset, not from the policy, so its mean does not
# estimate E_{y~π}[log π − log π_ref]; (GRPO's `kl`, on the policy's own samples, and KTO's `kl`, its z₀ reference
# point, are their methods' KL estimates and keep that name.)
POLICY_REF_LOGRATIO = "policy_ref_logratio"


@dataclass
class PreferenceSettings:
    """Hyper-parameters; defaults are each paper's. `beta` is DPO's β, IPO's τ, SimPO's β, ORPO's λ."""

    method: PreferenceMethod = "dpo"
    beta: float | None = None  # None: the method's default (0.1 for DPO/IPO/ORPO, 2.0 for SimPO)
    label_smoothing: float = 0.0  # DPO (cDPO) and SimPO
    gamma: float = 0.5  # SimPO target margin γ (paper: γ/β = 0.25 with β = 2)
    reference: ReferenceMode = "copy"

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return 2.0 if self.method == "simpo" else 0.1


@dataclass
class EncodedPair:
    chosen: EncodedCompletion
    rejected: EncodedCompletion
    index: int


def _move_common_prefix(chosen: EncodedCompletion, rejected: EncodedCompletion) -> tuple[EncodedCompletion, EncodedCompletion]:
    a, b = chosen.completion_ids, rejected.completion_ids
    k, limit = 0, min(len(a), len(b)) - 1  # leave at least one token on each side
    while k < limit and a[k] == b[k]:
        k += 1
    if k == 0:
        return chosen, rejected
    prompt = chosen.prompt_ids + a[:k]
    return (replace(chosen, prompt_ids=prompt, completion_ids=a[k:]),
            replace(rejected, prompt_ids=prompt, completion_ids=b[k:]))


def encode_pairs(tokenizer: Any, rows: Sequence[dict], options: TrainOptions,
                 move_common_prefix: bool = False) -> tuple[list[EncodedPair], dict[str, int]]:
    pairs: list[EncodedPair] = []
    dropped: dict[str, int] = {}

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    for row in rows:
        prompt_ids = encode_prompt(tokenizer, row["prompt"])
        kw = dict(max_length=options.max_length, max_prompt_length=options.max_prompt_length, prompt_ids=prompt_ids)
        chosen = encode_completion(tokenizer, row["prompt"], row["chosen"], **kw)
        rejected = encode_completion(tokenizer, row["prompt"], row["rejected"], **kw)
        if chosen is None or rejected is None:
            drop("empty_after_truncation")
        elif chosen.completion_ids == rejected.completion_ids:
            drop("identical_after_truncation")
        else:
            if move_common_prefix:
                chosen, rejected = _move_common_prefix(chosen, rejected)
            pairs.append(EncodedPair(chosen, rejected, len(pairs)))
    return pairs, dropped


def collate_pairs(pairs: Sequence[EncodedPair], pad: int) -> CompletionBatch:
    """Chosen rows first, then rejected rows, right-padded: one forward scores both sides."""
    rows = [(p.chosen.prompt_ids, p.chosen.completion_ids) for p in pairs]
    rows += [(p.rejected.prompt_ids, p.rejected.completion_ids) for p in pairs]
    return collate_completions(rows, pad)


def pair_logprobs(model: Any, pairs: Sequence[EncodedPair], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs, token counts), chosen rows first then rejected, the shared prompt run once."""
    sums, counts = shared_prompt_logprobs(model, [p.chosen.prompt_ids for p in pairs],
                                          [[p.chosen.completion_ids, p.rejected.completion_ids] for p in pairs], pad)
    # prompt-major (c0, r0, c1, r1, ...) -> (c0, c1, ..., r0, r1, ...)
    return sums.view(-1, 2).T.reshape(-1), counts.view(-1, 2).T.reshape(-1)


def pair_losses(method: PreferenceMethod, settings: PreferenceSettings, logps: torch.Tensor, counts: torch.Tensor,
                ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the (chosen, rejected) implicit rewards, from [2B] summed log-probs and token counts."""
    n = logps.shape[0] // 2
    beta = settings.resolved_beta
    counts = counts.clamp(min=1)
    avg = logps / counts
    if method == "dpo":
        return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, settings.label_smoothing)
    if method == "ipo":
        ratio_avg = (logps - ref) / counts
        losses = ipo_loss(ratio_avg[:n], ratio_avg[n:], beta)
        return losses, beta * (logps[:n] - ref[:n]).detach(), beta * (logps[n:] - ref[n:]).detach()
    if method == "simpo":
        losses = simpo_loss(avg[:n], avg[n:], beta, settings.gamma, settings.label_smoothing)
        return losses, beta * avg[:n].detach(), beta * avg[n:].detach()
    if method == "orpo":
        # L_SFT: the chosen completion's token-mean NLL per pair (the paper's text; TRL also counts prompt tokens).
        odds_loss, _ = orpo_odds_ratio(avg[:n], avg[n:])
        return -avg[:n] + beta * odds_loss, beta * avg[:n].detach(), beta * avg[n:].detach()
    raise ValueError(f"unknown preference method {method!r}")


def train_preference(model: Any, tokenizer: Any, rows: Sequence[dict], options: TrainOptions,
                     settings: PreferenceSettings | None = None,
                     on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train `model` in place on normalised preference rows ({"prompt", "chosen", "rejected"}).

    Metrics per step (means over the window's pairs): loss, rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected (summed completion log-probs) and, for the methods with a
    reference (DPO, IPO), `policy_ref_logratio` (see POLICY_REF_LOGRATIO)."""
    settings = settings or PreferenceSettings()
    method = settings.method
    set_seed(options.seed)
    disable_dropout(model)
    pairs, dropped = encode_pairs(tokenizer, rows, options, move_common_prefix=LENGTH_NORMALISED[method])
    if not pairs:
        raise ValueError(f"no preference pairs left to train on after tokenization (dropped: {dropped})")
    pad = pad_id_of(tokenizer)
    ref_cache: dict[int, tuple[float, float]] = {}
    ref_model = None
    if NEEDS_REFERENCE[method]:
        if settings.reference == "precompute":
            # The same scoring path as the policy's, so step 0 is exact (not just equal up to rounding).
            for i in range(0, len(pairs), options.batch_size):
                chunk = pairs[i:i + options.batch_size]
                logps = run_frozen(model, lambda m: pair_logprobs(m, chunk, pad)[0])
                for j, p in enumerate(chunk):
                    ref_cache[p.index] = (float(logps[j]), float(logps[len(chunk) + j]))
        else:
            ref_model = make_reference(model, settings.reference)

    def loss_fn(micro: list[EncodedPair]) -> LossOutput:
        n = len(micro)
        logps, counts = pair_logprobs(model, micro, pad)
        ref = None
        if ref_model is not None:
            ref = ref_model.run(lambda m: pair_logprobs(m, micro, pad)[0])
        elif ref_cache:
            ref = torch.tensor([ref_cache[p.index][0] for p in micro] + [ref_cache[p.index][1] for p in micro],
                               dtype=logps.dtype, device=logps.device)
        losses, r_c, r_r = pair_losses(method, settings, logps, counts, ref)
        out = LossOutput(losses.sum(), float(n))
        out.add_metric("rewards/chosen", float(r_c.sum()), n)
        out.add_metric("rewards/rejected", float(r_r.sum()), n)
        out.add_metric("rewards/margins", float((r_c - r_r).sum()), n)
        out.add_metric("rewards/accuracies", float((r_c > r_r).float().sum()), n)
        out.add_metric("logps/chosen", float(logps[:n].detach().sum()), n)
        out.add_metric("logps/rejected", float(logps[n:].detach().sum()), n)
        if ref is not None:
            # 0 at step 0 in every reference mode (pitfall 17); not a KL (see POLICY_REF_LOGRATIO).
            out.add_metric(POLICY_REF_LOGRATIO, float((logps.detach() - ref).sum()), 2 * n)
        return out

    engine = Engine(model, options, tokenizer=tokenizer)
    result = TrainResult(steps=0, dropped=dropped, rows=len(pairs))
    feed = windows(pairs, options.batch_size, options.grad_accum, options.seed)
    return train_loop(engine, feed, loss_fn, options.steps, result, on_step)


def train_dpo(model: Any, tokenizer: Any, rows: Sequence[dict], options: TrainOptions, *, beta: float = 0.1,
              label_smoothing: float = 0.0, reference: ReferenceMode = "copy",
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """DPO (Rafailov et al. 2023): `train_preference` with method="dpo"."""
    return train_preference(model, tokenizer, rows, options,
                            PreferenceSettings("dpo", beta, label_smoothing, reference=reference), on_step)
