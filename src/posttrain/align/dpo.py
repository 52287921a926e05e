"""DPO trainer: preference pairs, completion-only summed log-probs, a frozen reference, the sigmoid loss.

Guarantees: each pair's prompt is tokenized once and shared by chosen and rejected (identical prompt ids); pairs
whose completion is emptied by truncation, or whose chosen and rejected are identical after truncation, are dropped
and counted, never trained on (ALGORITHMS.md pitfalls 13, 14); chosen and rejected go through one forward (2B rows);
the loss of a step is the mean over the window's pairs; at step 0 the loss is ln 2 and the margins are 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..data.collate import collate_completions
from ..data.tokenize import EncodedCompletion, encode_completion, encode_prompt
from .batching import windows
from .engine import Engine, LossOutput, TrainOptions, set_seed
from .logprobs import sequence_logprobs
from .losses import dpo_loss
from .reference import FrozenReference, ReferenceMode, precompute_sequence_logprobs
from .sft import TrainResult, pad_id_of


@dataclass
class EncodedPair:
    chosen: EncodedCompletion
    rejected: EncodedCompletion
    index: int


def encode_pairs(tokenizer: Any, rows: Sequence[dict], options: TrainOptions) -> tuple[list[EncodedPair], dict[str, int]]:
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
            pairs.append(EncodedPair(chosen, rejected, len(pairs)))
    return pairs, dropped


def collate_pairs(pairs: Sequence[EncodedPair], pad: int):
    rows = [(p.chosen.prompt_ids, p.chosen.completion_ids) for p in pairs]
    rows += [(p.rejected.prompt_ids, p.rejected.completion_ids) for p in pairs]
    return collate_completions(rows, pad)


def train_dpo(model: Any, tokenizer: Any, rows: Sequence[dict], options: TrainOptions, *, beta: float = 0.1,
              label_smoothing: float = 0.0, reference: ReferenceMode = "copy",
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train `model` in place with DPO on normalised preference rows ({"prompt", "chosen", "rejected"})."""
    set_seed(options.seed)
    pairs, dropped = encode_pairs(tokenizer, rows, options)
    if not pairs:
        raise ValueError(f"no preference pairs left to train on after tokenization (dropped: {dropped})")
    pad = pad_id_of(tokenizer)
    ref_cache: dict[int, tuple[float, float]] = {}
    ref_model = None
    if reference == "copy":
        ref_model = FrozenReference(model)
    elif reference == "precompute":
        chunks = [pairs[i:i + options.batch_size] for i in range(0, len(pairs), options.batch_size)]
        for chunk, logps in zip(chunks, precompute_sequence_logprobs(model, [collate_pairs(c, pad) for c in chunks])):
            n = len(chunk)
            for j, p in enumerate(chunk):
                ref_cache[p.index] = (float(logps[j]), float(logps[n + j]))
    else:
        raise ValueError(f"unknown reference mode {reference!r}; expected 'copy' or 'precompute'")

    def loss_fn(micro: list[EncodedPair]) -> LossOutput:
        n = len(micro)
        batch = collate_pairs(micro, pad)
        logps, _ = sequence_logprobs(model, batch)
        if ref_model is not None:
            ref = ref_model.sequence_logprobs(batch)
            ref_c, ref_r = ref[:n], ref[n:]
        else:
            ref_c = torch.tensor([ref_cache[p.index][0] for p in micro], dtype=logps.dtype)
            ref_r = torch.tensor([ref_cache[p.index][1] for p in micro], dtype=logps.dtype)
        losses, r_c, r_r = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, beta, label_smoothing)
        out = LossOutput(losses.sum(), float(n))
        out.add_metric("rewards/chosen", float(r_c.sum()), n)
        out.add_metric("rewards/rejected", float(r_r.sum()), n)
        out.add_metric("rewards/margins", float((r_c - r_r).sum()), n)
        out.add_metric("rewards/accuracies", float((r_c > r_r).float().sum()), n)
        out.add_metric("logps/chosen", float(logps[:n].detach().sum()), n)
        out.add_metric("logps/rejected", float(logps[n:].detach().sum()), n)
        return out

    engine = Engine(model, options, on_step=on_step)
    result = TrainResult(steps=0, dropped=dropped, rows=len(pairs))
    feed = windows(pairs, options.batch_size, options.grad_accum, options.seed)
    for _ in range(options.steps):
        result.history.append(engine.step(next(feed), loss_fn))
    result.steps = engine.step_count
    model.eval()
    return result
