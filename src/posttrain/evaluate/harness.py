"""Running a list of standard benchmarks on one model and writing the results the `posttrain eval` contract names.

Output (`run_benchmarks` return value and the JSON file): {"model": ..., "results": {benchmark: {metric: {"value",
"n", "ci_low", "ci_high"}}}, "settings": {benchmark: {...}}, "notes": {benchmark: [...]}, "samples_path": path,
"seconds": {benchmark: s}}. Per-sample records go to one JSONL file, one line per sample with its benchmark name.
A benchmark that cannot run here (no data, code execution not allowed, no judge) is reported under "skipped" with
the reason, never with a number.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from .benchmarks import EvalContext, get_benchmark


class BenchmarkUnavailable(RuntimeError):
    """Raised by a benchmark that cannot run in this environment (the reason is reported, nothing is scored)."""


def generation_cap(max_new_tokens: int) -> dict[str, int]:
    """The options that cap generation at `max_new_tokens` for every generative benchmark: gsm8k and mt_bench
    answers (`max_new_tokens`), humaneval (`max_gen_toks`) and the MT-Bench judge (`judge_max_new_tokens`)."""
    return {"max_new_tokens": max_new_tokens, "max_gen_toks": max_new_tokens, "judge_max_new_tokens": max_new_tokens}


def run_benchmarks(model: Any, tokenizer: Any, names: list[str], *, data_dir: str | Path | None = None,
                   limit: int | None = None, seed: int = 1234, batch_size: int = 16,
                   options: dict[str, Any] | None = None, samples_path: str | Path | None = None,
                   model_name: str | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model_name, "results": {}, "settings": {}, "notes": {}, "skipped": {},
                           "seconds": {}, "samples_path": str(samples_path) if samples_path else None}
    records: list[dict[str, Any]] = []
    for name in names:
        runner = get_benchmark(name)  # unknown names fail before anything runs

        def report(done: int, total: int, _name: str = name) -> None:
            if progress is not None:
                progress(_name, done, total)

        ctx = EvalContext(model=model, tokenizer=tokenizer, data_dir=Path(data_dir) if data_dir else None,
                          limit=limit, seed=seed, batch_size=batch_size, progress=report,
                          options=dict(options or {}))
        started = time.perf_counter()
        try:
            result = runner(ctx)
        except BenchmarkUnavailable as exc:
            out["skipped"][name] = str(exc)
            continue
        out["seconds"][name] = round(time.perf_counter() - started, 3)
        out["results"][name] = {k: m.as_dict() for k, m in result.metrics.items()}
        out["settings"][name] = result.settings
        out["notes"][name] = result.notes
        records.extend({"benchmark": name, **s} for s in result.samples)
    if samples_path is not None:
        path = Path(samples_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    return out
