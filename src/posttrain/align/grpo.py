"""GRPO trainer (Shao et al. 2024, DeepSeekMath §4.1): G sampled completions per prompt, a verifiable reward,
group-normalised advantages, a clipped ratio objective, optional k3 KL to a frozen reference.

Guarantees:
- each generation round samples G completions per prompt with the KV cache, at the configured temperature/top-k/top-p,
  and scores them under the same temperature (ALGORITHMS.md pitfall 18); with one pass per round (μ = 1) the old
  log-probs are the current ones detached, so the ratio is exactly 1 and the gradient is ∇logπ·A;
- advantages are per group; an all-equal group gets exactly 0 (pitfall 1); an empty completion leaves its group's
  statistics and gets 0 (pitfall 19);
- `loss_type="grpo"` averages tokens within each sequence, then sequences (DeepSeekMath); `"dapo"` averages over all
  completion tokens of the generation batch (TRL's default). Either way the normaliser is the whole batch, whatever
  the micro-batch split (pitfall 3), and numerator and denominator use the same mask (pitfall 2).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from ..data.collate import collate_completions
from ..data.tokenize import encode_prompt
from ..rollout.generate import generate
from .engine import Engine, LossOutput, TrainOptions, TrainResult, disable_dropout, set_seed
from .logprobs import completion_mask, token_logprobs
from .losses import group_advantages, grpo_token_loss
from .reference import make_reference
from .sft import pad_id_of

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class GRPOSettings:
    num_generations: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    num_iterations: int = 1
    loss_type: Literal["grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "none"] = "group"
    reference: str = "copy"  # a live reference mode (see align.reference.make_reference); used when beta > 0


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


def _split(items: list, parts: int) -> list[list]:
    size = math.ceil(len(items) / parts)
    return [items[i:i + size] for i in range(0, len(items), size)]


def train_grpo(model: Any, tokenizer: Any, rows: Sequence[dict], options: TrainOptions, settings: GRPOSettings,
               reward_fn: RewardFn, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train `model` in place with GRPO on normalised verifiable rows ({"prompt": messages, "answer": str})."""
    set_seed(options.seed)
    disable_dropout(model)
    if not rows:
        raise ValueError("no prompts to train on")
    # Prompts keep their end (the question) and leave room for the completion within max_length.
    prompt_budget = options.max_length - settings.max_new_tokens
    if options.max_prompt_length is not None:
        prompt_budget = min(prompt_budget, options.max_prompt_length)
    if prompt_budget < 1:
        raise ValueError(f"train.max_length={options.max_length} leaves no room for a prompt next to "
                         f"grpo.max_new_tokens={settings.max_new_tokens}")
    prompts, truncated = [], 0
    for row in rows:
        ids = encode_prompt(tokenizer, row["prompt"])
        if len(ids) > prompt_budget:
            ids, truncated = ids[-prompt_budget:], truncated + 1
        prompts.append((ids, row["answer"]))
    G, pad = settings.num_generations, pad_id_of(tokenizer)
    reference = make_reference(model, settings.reference) if settings.beta > 0 else None
    engine = Engine(model, options.model_copy(update={"steps": options.steps * settings.num_iterations}),
                    tokenizer=tokenizer)
    result = TrainResult(steps=0, rows=len(prompts), dropped={"prompts_left_truncated": truncated} if truncated else {})
    rng = random.Random(options.seed)
    order: list[int] = []

    def loss_fn(micro: list[Sample]) -> LossOutput:
        batch = collate_completions([(s.prompt_ids, s.completion_ids) for s in micro], pad)
        logps = token_logprobs(model, batch, settings.temperature)
        mask = completion_mask(batch, logps)
        width = logps.shape[1]
        old = torch.stack([_fit(s.old_logps, width) for s in micro]) if micro[0].old_logps is not None \
            else logps.detach()
        ref = torch.stack([_fit(s.ref_logps, width) for s in micro]) if reference is not None else None
        adv = torch.tensor([s.advantage for s in micro], dtype=logps.dtype, device=logps.device)
        per_token, info = grpo_token_loss(logps, old, adv, epsilon_low=settings.epsilon_low,
                                          epsilon_high=settings.epsilon_high, beta=settings.beta, ref_logps=ref)
        tokens = mask.sum()
        if settings.loss_type == "grpo":
            loss_sum = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
            units = float(len(micro))
        else:
            loss_sum, units = (per_token * mask).sum(), float(tokens)
        out = LossOutput(loss_sum, units)
        out.add_metric("clip_ratio", float((info["clipped"] * mask).sum()), float(tokens))
        if "kl" in info:
            out.add_metric("kl", float((info["kl"] * mask).sum()), float(tokens))
        return out

    for round_index in range(options.steps):
        while len(order) < settings.prompts_per_step:
            epoch = list(range(len(prompts)))
            rng.shuffle(epoch)
            order.extend(epoch)
        picked, order = [prompts[i] for i in order[:settings.prompts_per_step]], order[settings.prompts_per_step:]
        model.eval()
        gens = generate(model, tokenizer, [p for p, _ in picked], max_new_tokens=settings.max_new_tokens,
                        do_sample=True, temperature=settings.temperature, top_k=settings.top_k,
                        top_p=settings.top_p, num_return_sequences=G, seed=options.seed * 100003 + round_index)
        if len(gens) != len(picked) * G:
            raise RuntimeError(f"expected {len(picked) * G} generations, got {len(gens)}")
        answers = [a for _, a in picked for _ in range(G)]
        rewards = torch.tensor(reward_fn([g.text for g in gens], answers), dtype=torch.float32)
        valid = torch.tensor([len(g.completion_ids) > 0 for g in gens])
        advantages = group_advantages(rewards, G, scale=settings.scale_rewards, valid=valid)
        samples = [Sample(list(g.prompt_ids), list(g.completion_ids), float(a))
                   for g, a, ok in zip(gens, advantages, valid) if ok]
        micro_batches = _split(samples, options.grad_accum) if samples else []
        with torch.no_grad():
            for micro in micro_batches:
                batch = collate_completions([(s.prompt_ids, s.completion_ids) for s in micro], pad)
                old = token_logprobs(model, batch, settings.temperature) if settings.num_iterations > 1 else None
                ref = reference.token_logprobs(batch, settings.temperature) if reference is not None else None
                for i, s in enumerate(micro):
                    s.old_logps = old[i] if old is not None else None
                    s.ref_logps = ref[i] if ref is not None else None
        group_std = rewards.view(-1, G).std(dim=1, unbiased=True)
        rollout = {"reward": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=True)),
                   "frac_zero_std_groups": float((group_std == 0).float().mean()),
                   "completion_length": float(sum(len(g.completion_ids) for g in gens) / len(gens)),
                   "completions_finished": float(sum(g.finished for g in gens) / len(gens))}
        rollout["empty_completions"] = float(sum(not ok for ok in valid.tolist()))
        for _ in range(settings.num_iterations):
            # No trainable completion: no update, so no loss to report (the rollout's own numbers still are).
            metrics = engine.step(micro_batches, loss_fn) if micro_batches else {}
            metrics.update(rollout)
            result.history.append(metrics)
            if on_step is not None:
                on_step(len(result.history), metrics)
    result.steps = engine.step_count
    model.eval()
    return result


def _fit(values: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad or cut a per-token row computed in another batch to this batch's width (padding is masked)."""
    if values.shape[0] >= width:
        return values[:width]
    return torch.cat([values, values.new_zeros(width - values.shape[0])])
