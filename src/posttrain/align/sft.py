"""Supervised fine-tuning: completion-only NLL, token-normalised over the whole accumulation window.

Guarantees: only completion tokens (the final assistant turn, or every assistant turn; end-of-turn included) are
supervised; the loss of an
optimizer step is Σ(token NLL) / (supervised tokens in the window), so GA=1 and GA=k agree; rows whose completion is
emptied by truncation are dropped and counted before training.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

from ..data.collate import collate_masked
from ..data.tokenize import encode_completion, encode_conversation
from .batching import windows
from .engine import Engine, LossOutput, TrainOptions, TrainResult, set_seed, train_loop
from .logprobs import completion_mask, token_logprobs
from .losses import nll_sum


SFTLossOn = Literal["completion", "assistant_turns"]


def encode_sft_rows(tokenizer: Any, rows: Sequence[dict], options: TrainOptions,
                    loss_on: SFTLossOn = "completion") -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """(ids, supervision mask) per row: the final completion only, or every assistant turn of the conversation."""
    encoded, dropped = [], {}
    for row in rows:
        if loss_on == "assistant_turns":
            conv = encode_conversation(tokenizer, row["prompt"] + row["completion"], max_length=options.max_length)
            enc = (conv.input_ids, conv.assistant_mask) if conv is not None else None
        else:
            c = encode_completion(tokenizer, row["prompt"], row["completion"], max_length=options.max_length,
                                  max_prompt_length=options.max_prompt_length)
            enc = (c.input_ids, [0] * len(c.prompt_ids) + [1] * len(c.completion_ids)) if c is not None else None
        if enc is None:
            dropped["empty_after_truncation"] = dropped.get("empty_after_truncation", 0) + 1
        else:
            encoded.append(enc)
    return encoded, dropped


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set one")
    return int(pad)


def train_sft(model: Any, tokenizer: Any, rows: Sequence[dict], options: TrainOptions,
              on_step: Callable[[int, dict[str, float]], None] | None = None,
              loss_on: SFTLossOn = "completion") -> TrainResult:
    """Train `model` in place on normalised SFT rows ({"prompt": messages, "completion": messages}).

    `loss_on="completion"` supervises the final completion; `"assistant_turns"` every assistant turn of the
    conversation (prompt turns included), as with TRL's assistant_only_loss."""
    set_seed(options.seed)
    encoded, dropped = encode_sft_rows(tokenizer, rows, options, loss_on)
    if not encoded:
        raise ValueError(f"no SFT rows left to train on after tokenization (dropped: {dropped})")
    pad = pad_id_of(tokenizer)
    result = TrainResult(steps=0, dropped=dropped, rows=len(encoded))
    engine = Engine(model, options, tokenizer=tokenizer)

    def loss_fn(micro: list[tuple[list[int], list[int]]]) -> LossOutput:
        batch = collate_masked(micro, pad)
        logps = token_logprobs(model, batch)
        mask = completion_mask(batch, logps)
        loss_sum, count = nll_sum(logps, mask)
        out = LossOutput(loss_sum, float(count))
        out.add_metric("tokens", float(count), 1)
        return out

    feed = windows(encoded, options.batch_size, options.grad_accum, options.seed)
    return train_loop(engine, feed, loss_fn, options.steps, result, on_step)
