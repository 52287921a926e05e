"""GSM8K (test split: 1,319 problems) scored like lm-eval's default `gsm8k` task (EVALUATION.md §4).

Guarantees:
- prompt "Question: {question}\\nAnswer:"; `num_fewshot` examples (5 unless `ctx.options["num_fewshot"]`) from the
  train split, each "Question: {q}\\nAnswer: {full reference answer}" (target delimiter " "), joined and followed
  by "\\n\\n" (few-shot delimiter). They are drawn with `random.Random(fewshot_seed)` (1234, lm-eval's, unless
  `ctx.options["fewshot_seed"]`), `rng.sample(train, k)` once per test question in file order, so a question
  subsampled with `ctx.limit` gets the same examples as in a full run;
- greedy decoding, stopped at "Question:", "</s>", "<|im_end|>" and the tokenizer's EOS, at most `max_gen_toks`
  new tokens (256 unless `ctx.options["max_gen_toks"]`); the context is left-truncated to the model's length budget
  minus `max_gen_toks` (`evaluate.generation.generate_until`);
- `exact_match_strict`: the first "#### N" of the output; `exact_match_flexible`: the last number-like string;
  both compared with lm-eval's ignore regexes and ignore_case against the full reference answer
  (`evaluate.filters`); no match is "[invalid]", which never matches. Each sample record has `correct_strict` and
  `correct_flexible`, whose means are the two metrics;
- `ctx.options["chat_template"]`: the whole few-shot prompt becomes one user turn of the tokenizer's chat template
  (with the generation prompt, encoded without adding special tokens); recorded in `settings`;
- data: `data_dir/gsm8k/{train,test}.jsonl`, or `openai/gsm8k` ("main") from the hub when `data_dir` is None, which
  fails at once with `BenchmarkUnavailable` when the hub cannot be reached.
A benchmark-specific value may be given as `ctx.options["gsm8k"] = {key: value}`; it wins over the shared key.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..filters import (GSM8K_FLEXIBLE_REGEX, GSM8K_IGNORE_REGEXES, GSM8K_STRICT_REGEX, gsm8k_flexible, gsm8k_match,
                       gsm8k_strict)
from ..generation import generate_until
from ..loglikelihood import load_hub_split, prompt_fields, render_prompt
from .base import BenchmarkResult, EvalContext, Metric, context_budget, subsample

FEWSHOT_SEED = 1234  # lm-eval's fewshot_random_seed
NUM_FEWSHOT = 5
MAX_GEN_TOKS = 256
UNTIL = ("Question:", "</s>", "<|im_end|>")


def option(ctx: EvalContext, key: str, default: Any) -> Any:
    """`ctx.options["gsm8k"][key]`, else `ctx.options[key]`, else `default` (None counts as not given)."""
    own = ctx.options.get("gsm8k")
    if isinstance(own, dict) and own.get(key) is not None:
        return own[key]
    value = ctx.options.get(key)
    return default if value is None else value


def load_gsm8k(data_dir: Path | None, split: str) -> list[dict[str, str]]:
    """The `split` ("train" | "test") rows as {"question", "answer"} in file order."""
    if data_dir is None:
        rows = load_hub_split("gsm8k", "openai/gsm8k", "main", split)
        return [{"question": r["question"], "answer": r["answer"]} for r in rows]
    path = Path(data_dir) / "gsm8k" / f"{split}.jsonl"
    if not path.exists():
        from ..harness import BenchmarkUnavailable

        raise BenchmarkUnavailable(f"gsm8k: {path} does not exist (a --data-dir laid out like ../shared/datasets)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                    raise ValueError(f"{path}:{lineno}: expected string fields 'question' and 'answer'")
                rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


def gsm8k_prompt(row: dict[str, str]) -> str:
    return f"Question: {row['question']}\nAnswer:"


def fewshot_draws(n_train: int, n_test: int, shots: int, seed: int) -> list[list[int]]:
    """For each of the `n_test` test rows in order, the train indices of its few-shot examples (lm-eval's draw:
    one `rng.sample` per test row from a single `random.Random(seed)`)."""
    if shots <= 0:
        return [[] for _ in range(n_test)]
    if shots > n_train:
        raise ValueError(f"gsm8k: {shots} few-shot examples asked for but the train split has {n_train}")
    rng = random.Random(seed)
    return [rng.sample(range(n_train), shots) for _ in range(n_test)]


def fewshot_block(train: list[dict[str, str]], indices: list[int]) -> str:
    """The examples as "Question: ...\nAnswer: {answer}", each followed by "\n\n" ("" for none)."""
    return "".join(f"{gsm8k_prompt(train[j])} {train[j]['answer']}\n\n" for j in indices)


def run_gsm8k(ctx: EvalContext) -> BenchmarkResult:
    shots = int(option(ctx, "num_fewshot", NUM_FEWSHOT))
    fewshot_seed = int(option(ctx, "fewshot_seed", FEWSHOT_SEED))
    max_gen_toks = int(option(ctx, "max_gen_toks", MAX_GEN_TOKS))
    chat = bool(option(ctx, "chat_template", False))
    test = load_gsm8k(ctx.data_dir, "test")
    train = load_gsm8k(ctx.data_dir, "train") if shots > 0 else []
    draws = fewshot_draws(len(train), len(test), shots, fewshot_seed)
    chosen = subsample(list(range(len(test))), ctx.limit, ctx.seed)
    prompts = [render_prompt(ctx.tokenizer, fewshot_block(train, draws[i]) + gsm8k_prompt(test[i]), chat)
               for i in chosen]
    until = list(UNTIL)
    eos = getattr(ctx.tokenizer, "eos_token", None)
    if eos and eos not in until:
        until.append(eos)  # lm-eval always adds the model's EOS to the stop strings
    budget = context_budget(ctx)
    outputs = generate_until(ctx.model, ctx.tokenizer, prompts, until=until, max_new_tokens=max_gen_toks,
                             max_length=budget, batch_size=ctx.batch_size, add_special_tokens=not chat,
                             progress=ctx.progress)

    samples = []
    for i, prompt, out in zip(chosen, prompts, outputs):
        output, target = out[0], test[i]["answer"]
        strict, flexible = gsm8k_strict(output), gsm8k_flexible(output)
        samples.append({"index": i, **prompt_fields(prompt), "fewshot_indices": draws[i], "target": target,
                        "output": output, "extracted_strict": strict, "extracted_flexible": flexible,
                        "correct_strict": gsm8k_match(strict, target),
                        "correct_flexible": gsm8k_match(flexible, target)})
    n = len(samples)
    metrics = {"exact_match_strict": Metric.proportion(sum(s["correct_strict"] for s in samples), n),
               "exact_match_flexible": Metric.proportion(sum(s["correct_flexible"] for s in samples), n)}
    fewshot_source = f"train, random.Random({fewshot_seed}).sample per test item in order" if shots else None
    settings = {
        "num_fewshot": shots, "fewshot_source": fewshot_source, "target_delimiter": " ", "fewshot_delimiter": "\n\n",
        "template": "Question: {question}\nAnswer:", "chat_template": chat, "decoding": "greedy", "until": until,
        "max_gen_toks": max_gen_toks, "max_length": budget, "left_truncated_to": budget - max_gen_toks,
        "strict_regex": GSM8K_STRICT_REGEX + " (first match)",
        "flexible_regex": GSM8K_FLEXIBLE_REGEX + " (last match)",
        "ignore_regexes": list(GSM8K_IGNORE_REGEXES), "ignore_case": True,
        "limit": ctx.limit, "seed": ctx.seed, "n_scored": n, "n_available": len(test),
        "data": str(ctx.data_dir) if ctx.data_dir else "hub:openai/gsm8k (main)",
    }
    return BenchmarkResult("gsm8k", metrics, samples, settings)
