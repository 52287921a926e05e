"""Standard benchmarks scored the standard way (../shared/EVALUATION.md), each `run(ctx) -> BenchmarkResult`.

The registry maps the public names (`posttrain eval --benchmarks ...`) to their runners; a runner module is only
imported when its benchmark is asked for.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .base import BenchmarkResult, EvalContext, Metric

# name -> (module, function)
REGISTRY: dict[str, tuple[str, str]] = {
    "mmlu": ("mmlu", "run_mmlu"),
    "arc_easy": ("arc", "run_arc_easy"),
    "arc_challenge": ("arc", "run_arc_challenge"),
    "gsm8k": ("gsm8k", "run_gsm8k"),
    "truthfulqa_mc1": ("truthfulqa", "run_truthfulqa_mc1"),
    "truthfulqa_mc2": ("truthfulqa", "run_truthfulqa_mc2"),
    "humaneval": ("humaneval", "run_humaneval"),
    "mt_bench": ("mt_bench", "run_mt_bench"),
}


def get_benchmark(name: str) -> Callable[[EvalContext], BenchmarkResult]:
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(REGISTRY)}")
    module, function = REGISTRY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


__all__ = ["REGISTRY", "BenchmarkResult", "EvalContext", "Metric", "get_benchmark"]
