"""The shape every benchmark shares: what it receives (EvalContext), what it returns (BenchmarkResult).

Guarantees: a `Metric` always carries its n and 95% interval (see `evaluate.stats`); a `BenchmarkResult` carries
the per-sample records it was computed from (prompt, target, output or log-likelihoods, correct?) and the settings
that make the number comparable (shots, template, normalisation), so a number is never separated from how it was
measured. Subsampling with `limit` picks a seeded random subset, reported in `settings`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from ..stats import mean_interval, wilson_interval

T = TypeVar("T")


@dataclass
class Metric:
    value: float
    n: int
    ci_low: float | None
    ci_high: float | None

    @classmethod
    def proportion(cls, successes: float, n: int) -> "Metric":
        if n <= 0:
            raise ValueError("a proportion needs at least one item")
        lo, hi = wilson_interval(successes, n)
        return cls(successes / n, n, lo, hi)

    @classmethod
    def mean(cls, values: Sequence[float], low: float | None = None, high: float | None = None) -> "Metric":
        value, lo, hi = mean_interval(values, low, high)
        return cls(value, len(values), lo, hi)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchmarkResult:
    benchmark: str
    metrics: dict[str, Metric]
    samples: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class EvalContext:
    """What a benchmark may use. `data_dir` is a folder laid out like ../shared/datasets (None: the HF hub)."""

    model: Any
    tokenizer: Any
    data_dir: Path | None = None
    limit: int | None = None
    seed: int = 1234
    batch_size: int = 16
    max_length: int | None = None  # context budget; None: the model's max_position_embeddings
    progress: Callable[[int, int], None] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # benchmark-specific (judge, allow_code_execution, ...)


def subsample(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """All items, or a seeded random `limit` of them in their original order."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def context_budget(ctx: EvalContext) -> int:
    if ctx.max_length is not None:
        return ctx.max_length
    config = getattr(ctx.model, "config", None)
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)
