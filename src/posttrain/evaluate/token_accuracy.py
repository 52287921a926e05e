"""Teacher-forced next-token accuracy on held-out demonstrations (the metric TRL logs as mean_token_accuracy).

Guarantees: the prompt and completion are tokenized as SFT trains on them (chat template, stable boundary, the same
truncation); only completion tokens count, the end-of-turn included; a token is correct when the model's argmax at
the previous position equals it. The value is correct tokens / completion tokens over all rows; per-row records are
written when a path is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..align.engine import TrainOptions
from ..align.sft import encode_sft_rows, pad_id_of
from ..data.collate import collate_masked


@dataclass
class TokenAccuracyResult:
    value: float
    n: int  # completion tokens scored
    rows: int
    samples_path: str | None
    dropped: dict[str, int]


@torch.no_grad()
def evaluate_token_accuracy(model: Any, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 16,
                            max_length: int = 512, samples_path: str | Path | None = None,
                            progress: Callable[[int, int], None] | None = None) -> TokenAccuracyResult:
    model.eval()
    encoded, dropped = encode_sft_rows(tokenizer, rows, TrainOptions(max_length=max_length))
    if not encoded:
        raise ValueError(f"no demonstrations left to evaluate after tokenization (dropped: {dropped})")
    pad = pad_id_of(tokenizer)
    records, correct, total = [], 0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        batch = collate_masked(chunk, pad).to(next(model.parameters()).device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits[:, :-1]
        hits = (logits.argmax(-1) == batch.input_ids[:, 1:]) & (batch.completion_mask[:, 1:] == 1)
        counts = batch.completion_mask[:, 1:].sum(-1)
        for j in range(len(chunk)):
            c, t = int(hits[j].sum()), int(counts[j])
            correct, total = correct + c, total + t
            records.append({"row": start + j, "correct_tokens": c, "tokens": t})
        if progress is not None:
            progress(min(start + batch_size, len(encoded)), len(encoded))
    if total == 0:
        raise ValueError("no completion tokens to score in the held-out demonstrations")
    if samples_path is not None:
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return TokenAccuracyResult(correct / total, total, len(encoded), str(samples_path) if samples_path else None,
                               dropped)
