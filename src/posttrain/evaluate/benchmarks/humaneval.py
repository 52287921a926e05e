"""HumanEval (164 problems): model-written code run against the problems' tests, pass@k (EVALUATION.md §6).

Guarantees:
- Nothing is generated or executed unless `ctx.options["allow_code_execution"]` is True (the CLI's
  `--allow-code-execution`); otherwise `CodeExecutionNotAllowed` (a `BenchmarkUnavailable`) is raised at once.
- prompt = the raw `prompt` field, 0-shot, encoded the tokenizer's own way; generation stops at the Codex stop
  sequences "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint" (and the tokenizer's EOS), at most `max_gen_toks` new
  tokens (512 unless `ctx.options["max_gen_toks"]`; lm-eval uses 1024), the context left-truncated to fit.
- `num_samples` = 1 (default): greedy. `num_samples` = n > 1: n samples per problem with `temperature` (0.2) and
  `top_p` (0.95) unless given (lm-eval's `humaneval_64` values), seeded from `ctx.seed`.
- Each sample's program is `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`, executed only in
  `evaluate.sandbox` (a separate, resource-limited, namespace-isolated process tree; `workers` = 2 at a time,
  `timeout_s` 5 s each unless given). A sample passes only if the program runs to its end with status 0.
- Metrics: `pass@k` for k in `ctx.options["ks"]` (default 1, 10, 100) with k <= n, each the mean over problems of
  the unbiased estimator `1 - C(n-c, k) / C(n, k)` (Chen et al. 2021), computed as `1 - prod_{i=n-c+1}^{n}(1 - k/i)`
  and 1.0 when n - c < k. Greedy pass@1 is a proportion (Wilson interval); sampled pass@k a bounded mean.
  One record per sample (`task_id`, `sample_index`, `completion`, `status`, `reason`, `passed`); the mean of
  `passed` over all records is pass@1.
- `settings["sandbox"]` records the isolation layers that were in force (network isolation included); a note says
  so whenever network isolation was not active.
- data: `data_dir/humaneval/HumanEval.jsonl.gz`, or `openai/openai_humaneval` from the hub when `data_dir` is None.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from ..generation import generate_until
from ..harness import BenchmarkUnavailable
from ..loglikelihood import load_hub_split, prompt_fields
from ..sandbox import NAMESPACES_IN_WORDS, SandboxLimits, isolation_summary, run_programs
from .base import BenchmarkResult, EvalContext, Metric, context_budget, subsample

CODEX_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_GEN_TOKS = 512
DEFAULT_KS = (1, 10, 100)
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


class CodeExecutionNotAllowed(BenchmarkUnavailable):
    """HumanEval was asked for without the explicit opt-in to execute model-written code."""


def option(ctx: EvalContext, key: str, default: Any) -> Any:
    """`ctx.options["humaneval"][key]`, else `ctx.options[key]`, else `default` (None counts as not given)."""
    own = ctx.options.get("humaneval")
    if isinstance(own, dict) and own.get(key) is not None:
        return own[key]
    value = ctx.options.get(key)
    return default if value is None else value


def load_humaneval(data_dir: Path | None) -> list[dict[str, str]]:
    """The problems in file order, each with the five HumanEval fields."""
    if data_dir is None:
        rows = load_hub_split("humaneval", "openai/openai_humaneval", None, "test")
        return [{k: r[k] for k in FIELDS} for r in rows]
    path = Path(data_dir) / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise BenchmarkUnavailable(f"humaneval: {path} does not exist (a --data-dir laid out like ../shared/datasets)")
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                row = json.loads(line)
                missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
                if missing:
                    raise ValueError(f"{path}:{lineno}: missing or non-string fields {missing}")
                problems.append({k: row[k] for k in FIELDS})
    return problems


def build_program(problem: dict[str, str], completion: str) -> str:
    """The program human-eval executes for one completion."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` of `n` samples correct (requires 1 <= k <= n, 0 <= c <= n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):  # the product form avoids huge binomials
        product *= 1.0 - k / i
    return 1.0 - product


def _refuse() -> CodeExecutionNotAllowed:
    return CodeExecutionNotAllowed(
        "humaneval executes model-written code; it runs only with the explicit opt-in --allow-code-execution "
        "(options allow_code_execution=True). The code then runs in a sandboxed child process (resource limits, a "
        f"timeout; isolation: {NAMESPACES_IN_WORDS[isolation_summary()['namespaces']]}), never in this process")


def run_humaneval(ctx: EvalContext) -> BenchmarkResult:
    if ctx.options.get("allow_code_execution") is not True:
        raise _refuse()
    n = int(option(ctx, "num_samples", 1))
    if n < 1:
        raise ValueError(f"humaneval: num_samples must be >= 1, got {n}")
    given_temperature = option(ctx, "temperature", None)
    greedy = n == 1 and not given_temperature
    temperature = float(given_temperature if given_temperature is not None else 0.2)
    top_p = float(option(ctx, "top_p", 0.95))
    max_gen_toks = int(option(ctx, "max_gen_toks", MAX_GEN_TOKS))
    ks = sorted({int(k) for k in option(ctx, "ks", DEFAULT_KS) if 1 <= int(k) <= n} | {1})
    limits = SandboxLimits(timeout_s=float(option(ctx, "timeout_s", SandboxLimits.timeout_s)))

    problems = subsample(load_humaneval(ctx.data_dir), ctx.limit, ctx.seed)
    until = list(CODEX_STOPS)
    eos = getattr(ctx.tokenizer, "eos_token", None)
    if eos and eos not in until:
        until.append(eos)
    budget = context_budget(ctx)
    completions = generate_until(ctx.model, ctx.tokenizer, [p["prompt"] for p in problems], until=until,
                                 max_new_tokens=max_gen_toks, max_length=budget, batch_size=ctx.batch_size,
                                 do_sample=not greedy, temperature=temperature, top_p=top_p, num_samples=n,
                                 seed=None if greedy else ctx.seed, progress=ctx.progress)
    pairs = [(p, j, c) for p, cs in zip(problems, completions) for j, c in enumerate(cs)]
    results = run_programs([build_program(p, c) for p, _, c in pairs], limits,
                           workers=int(option(ctx, "workers", 2)))

    samples: list[dict[str, Any]] = []
    correct = {p["task_id"]: 0 for p in problems}
    for (problem, j, completion), result in zip(pairs, results):
        correct[problem["task_id"]] += int(result.passed)
        samples.append({"task_id": problem["task_id"], "sample_index": j, **prompt_fields(problem["prompt"]),
                        "completion": completion, "status": result.status, "reason": result.reason,
                        "passed": result.passed, "correct": result.passed, "seconds": result.seconds,
                        "stderr_tail": result.stderr[-400:], "network_isolated": result.isolation.get(
                            "network_isolated", False)})
    metrics: dict[str, Metric] = {}
    for k in ks:
        values = [pass_at_k(n, c, k) for c in correct.values()]
        metrics[f"pass@{k}"] = (Metric.proportion(sum(values), len(values)) if n == 1
                                else Metric.mean(values, 0.0, 1.0))

    isolation = results[0].isolation if results else {}
    notes = []
    if any(r.isolation != isolation for r in results):
        notes.append("the sandbox's isolation layers differed between samples; see each record")
    if not all(r.isolation.get("network_isolated") for r in results):
        notes.append("network isolation was NOT active for some or all samples (only the Python-level socket "
                     "guard applied)")
    if option(ctx, "chat_template", False):
        notes.append("chat_template is not applied to humaneval: the raw prompt is completed, as lm-eval does")
    settings = {
        "num_fewshot": 0, "prompt": "raw prompt field", "chat_template": False, "until": until,
        "max_gen_toks": max_gen_toks, "max_length": budget, "num_samples": n,
        "decoding": "greedy" if greedy else f"sampling temperature={temperature} top_p={top_p} seed={ctx.seed}",
        "ks": ks, "estimator": "unbiased pass@k, 1 - prod_{i=n-c+1}^{n} (1 - k/i)",
        "program": "prompt + completion + '\\n' + test + '\\n' + 'check(entry_point)'",
        "sandbox": {**isolation, "timeout_s": limits.timeout_s, "memory_bytes": limits.memory_bytes,
                    "max_processes": limits.max_processes, "max_file_bytes": limits.max_file_bytes,
                    "workers": int(option(ctx, "workers", 2))},
        "limit": ctx.limit, "seed": ctx.seed, "n_problems": len(problems), "n_samples": len(samples),
        "data": str(ctx.data_dir) if ctx.data_dir else "hub:openai/openai_humaneval",
    }
    return BenchmarkResult("humaneval", metrics, samples, settings, notes)
