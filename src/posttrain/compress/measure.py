"""Measuring a compressed artifact against the model it came from, on this machine.

Guarantees: every number is measured here and now — size on disk (weight files, or the single GGUF file), load time
(wall clock of loading the artifact), generation speed (greedy tokens per second on a fixed prompt, with the runtime
named), held-out perplexity of both models on the same token ids, and top-1 agreement (the share of held-out
positions where both models' argmax agree). Perplexity is exp of the mean next-token NLL over every position after the
first of each text (or over the completion tokens only, when the held-out rows have completions), so both models
are scored on exactly the same targets.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..models.loading import weights_size_bytes


@dataclass
class ArtifactMeasurement:
    size_bytes: int
    base_size_bytes: int
    load_seconds: float
    tokens_per_s: float
    runtime: str
    perplexity: float
    base_perplexity: float
    top1_agreement: float
    positions: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def artifact_size(path: str | Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else weights_size_bytes(path)


@torch.no_grad()
def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float()


@torch.no_grad()
def compare_on_texts(base: Any, candidate: Any,
                     token_ids: Sequence[list[int] | tuple[list[int], int]]) -> tuple[float, float, float, int]:
    """(candidate perplexity, base perplexity, top-1 agreement, positions) over the same held-out token ids.

    An item is a list of ids (every token after the first is scored) or (ids, start): only tokens from index
    `start` on are scored — e.g. a completion after its prompt, which is what the model was trained to produce."""
    nll_c = nll_b = 0.0
    agree = positions = 0
    for item in token_ids:
        ids, start = (item, 1) if isinstance(item, list) else (list(item[0]), max(1, int(item[1])))
        if len(ids) <= start:
            continue
        target = torch.tensor(ids[start:])
        lb, lc = _logits(base, ids)[start - 1:-1].cpu(), _logits(candidate, ids)[start - 1:-1].cpu()
        nll_b += float(torch.nn.functional.cross_entropy(lb, target, reduction="sum"))
        nll_c += float(torch.nn.functional.cross_entropy(lc, target, reduction="sum"))
        agree += int((lb.argmax(-1) == lc.argmax(-1)).sum())
        positions += len(ids) - start
    if positions == 0:
        raise ValueError("no held-out text with at least two tokens to measure on")
    return math.exp(nll_c / positions), math.exp(nll_b / positions), agree / positions, positions


@torch.no_grad()
def greedy_tokens_per_s(model: Any, prompt_ids: list[int], new_tokens: int = 32) -> float:
    """Greedy generation speed with the KV cache (HF generate), EOS ignored so every run makes `new_tokens`."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm-up
    started = time.perf_counter()
    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    return (out.shape[1] - ids.shape[1]) / seconds


def measure_artifact(base: Any, base_dir: str | Path, artifact: str | Path, load: Callable[[], Any],
                     token_ids: Sequence[list[int]], prompt_ids: list[int], runtime: str) -> ArtifactMeasurement:
    """Load the artifact with `load` (timed), then measure it against `base` on `token_ids`."""
    started = time.perf_counter()
    candidate = load()
    load_seconds = time.perf_counter() - started
    candidate.eval()
    ppl, base_ppl, agreement, positions = compare_on_texts(base, candidate, token_ids)
    speed = greedy_tokens_per_s(candidate, prompt_ids)
    return ArtifactMeasurement(artifact_size(artifact), weights_size_bytes(base_dir), round(load_seconds, 4),
                               round(speed, 2), runtime, ppl, base_ppl, agreement, positions)
