"""Pairwise preference accuracy: how often a model gives the chosen completion a higher log-likelihood (or, for a
reward model, a higher reward score).

Guarantees: for each held-out pair the chosen and rejected completions are scored under the same prompt (shared
prompt ids, completion tokens only, end-of-turn included) by summed log-probability; the pair counts as correct only
when chosen scores strictly higher (a tie is wrong, as in TRL's reward accuracy). Nothing is sampled, so the number is
exact for the model and data. Pairs are tokenized and truncated exactly as DPO trains on them; pairs that
truncation empties or makes identical are not scored and are counted in `dropped`. Per-pair records are written when a path is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..align.preference import collate_pairs, encode_pairs
from ..align.engine import TrainOptions
from ..align.logprobs import sequence_logprobs
from ..align.sft import pad_id_of


@dataclass
class PairwiseResult:
    value: float
    n: int
    correct: int
    samples_path: str | None
    dropped: dict[str, int]


@torch.no_grad()
def evaluate_pairwise(model: Any, tokenizer: Any, rows: Sequence[dict], *, reward_model: bool = False,
                      batch_size: int = 16,
                      max_length: int = 512, max_prompt_length: int | None = None, samples_path: str | Path | None = None,
                      progress: Callable[[int, int], None] | None = None) -> PairwiseResult:
    model.eval()
    pairs, dropped = encode_pairs(tokenizer, rows, TrainOptions(max_length=max_length,
                                                                 max_prompt_length=max_prompt_length))
    if not pairs:
        raise ValueError(f"no pairs left to evaluate after tokenization (dropped: {dropped})")
    pad = pad_id_of(tokenizer)
    records, correct = [], 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = collate_pairs(chunk, pad)
        if reward_model:
            from ..align.reward_model import sequence_scores

            logps = sequence_scores(model, batch)
        else:
            logps, _ = sequence_logprobs(model, batch)
        n = len(chunk)
        for j in range(n):
            c, r = float(logps[j]), float(logps[n + j])
            ok = c > r
            correct += ok
            records.append({"pair": start + j, "logp_chosen": c, "logp_rejected": r, "correct": ok})
        if progress is not None:
            progress(min(start + batch_size, len(pairs)), len(pairs))
    if samples_path is not None:
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "w") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")
    return PairwiseResult(correct / len(pairs), len(pairs), correct, str(samples_path) if samples_path else None,
                          dropped)
