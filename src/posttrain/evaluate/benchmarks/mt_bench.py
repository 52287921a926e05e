"""MT-Bench (FastChat llm_judge, ../shared/EVALUATION.md §7): 80 two-turn questions answered by the model, graded
by an LLM judge.

Answering: each question's turns go through the model's chat template (plain text joined by blank lines when it has
none); turn 2 sees the conversation so far, including the model's own turn-1 answer. Temperature by category as in
FastChat (writing/roleplay 0.7; extraction/math/coding/reasoning greedy; stem/humanities 0.1; anything else 0.7),
sampling seeded from `ctx.seed`. `ctx.options`: `max_new_tokens` (1024), `mode` ("single" | "pairwise"),
`answers` (the model's answers given instead of generated), and the judge (`judges.judge_from_options`).

Single mode (the default): every turn is graded 1–10 with single-v1 / single-v1-multi-turn, or, for math,
reasoning and coding, the reference-guided single-math-v1(-multi-turn) with the GPT-4 reference answers. A judgment
without a usable rating is excluded from the means and counted (`settings["judge_failures"]`), as FastChat drops
its -1 rows. Metrics: `score` (all turns), `score_turn1`, `score_turn2`, each the mean over parsed ratings with n the
parsed count.

Pairwise mode: the model's answers against a baseline's (`baseline_answers`: {question_id: [turn1, turn2]}, a
FastChat answer JSONL path or its records; or `baseline_model` with `baseline_tokenizer`, answered the same way),
with pair-v2(-multi-turn) / pair-math-v1(-multi-turn). Each pair is judged twice with the positions swapped; a tie
in either game or disagreeing games make a tie; a game without a verdict drops the pair (counted as `errors`).
Metrics: `win_rate` = wins / (wins + losses + ties) with that n, and FastChat's `win_rate_adjusted`
((wins + ties / 2) / n); the counts are in settings and in a note. `answers_from_samples` reads single-mode records
back as answers, so a before/after comparison can judge exactly the answers already scored.

"No metric": when no judgment could be used, the metric is omitted from `metrics` (never a made-up value), its name
is listed in `settings["not_measured"]` and a note says why. The judge's `describe()` is in `settings["judge"]` and
its lines in `notes` (which judge; comparable only under the same judge; "not GPT-4-judged" unless it is).
No judge named, or no data folder: `BenchmarkUnavailable`. A judge that cannot be asked (`judges.JudgeError`: an
HTTP failure after retries) stops the benchmark: a failing endpoint is not a failed judgment, so nothing is scored.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ...data.tokenize import has_chat_template, render_prompt
from ..generation import encode_context, generate_until
from ..judge_parsing import (format_pair, format_single, load_judge_prompts, needs_reference, pair_prompt_name,
                             checked_rating, parse_verdict, resolve_swap, single_prompt_name)
from ..judges import Judge, complete_all, judge_from_options
from .base import BenchmarkResult, EvalContext, Metric, context_budget, subsample

TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
                "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7  # FastChat's fallback for a category it has no entry for
DEFAULT_MAX_NEW_TOKENS = 1024
Answers = dict[int, list[str]]


def _unavailable(reason: str) -> Exception:
    from ..harness import BenchmarkUnavailable  # imported late: the harness imports the benchmark registry

    return BenchmarkUnavailable(reason)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_questions(data_dir: Path) -> list[dict[str, Any]]:
    return _read_jsonl(Path(data_dir) / "mt_bench" / "question.jsonl")


def load_references(data_dir: Path) -> Answers:
    """question_id -> the GPT-4 reference answer's two turns."""
    return load_answers(Path(data_dir) / "mt_bench" / "reference_answer" / "gpt-4.jsonl")


def load_answers(source: Any) -> Answers:
    """question_id -> [turn1, turn2] from a mapping, a FastChat answer JSONL path, or its parsed records."""
    if isinstance(source, dict):
        return {int(k): [str(t) for t in v] for k, v in source.items()}
    records = _read_jsonl(Path(source)) if isinstance(source, (str, Path)) else list(source)
    return {int(r["question_id"]): [str(t) for t in r["choices"][0]["turns"]] for r in records}


def answers_from_samples(records: Iterable[dict[str, Any]]) -> Answers:
    """{question_id: [turn1, turn2]} from single-mode per-sample records (a harness samples file), so that a later
    pairwise comparison judges exactly the answers that were scored. Questions missing a turn are left out."""
    turns: dict[int, dict[int, str]] = defaultdict(dict)
    for r in records:
        if r.get("benchmark", "mt_bench") == "mt_bench" and "answer" in r and "baseline_answer" not in r:
            turns[int(r["question_id"])][int(r["turn"])] = str(r["answer"])
    return {qid: [t[1], t[2]] for qid, t in turns.items() if 1 in t and 2 in t}


def temperature_for(category: str) -> float:
    return TEMPERATURES.get(category, DEFAULT_TEMPERATURE)


def generate_answers(model: Any, tokenizer: Any, questions: Sequence[dict[str, Any]], *, max_new_tokens: int,
                     max_length: int, batch_size: int, seed: int,
                     progress: Callable[[int], None] | None = None) -> tuple[Answers, set[tuple[int, int]]]:
    """({question_id: [turn1, turn2]}, {(question_id, turn) whose context was cut from the left to fit})."""
    special = not has_chat_template(tokenizer)  # a rendered template already holds its special tokens
    budget = max_length - max_new_tokens
    answers: Answers = {q["question_id"]: [] for q in questions}
    truncated: set[tuple[int, int]] = set()
    for turn in range(2):
        groups: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for q in questions:
            groups[temperature_for(q["category"])].append(q)
        for g, (temp, group) in enumerate(sorted(groups.items())):
            contexts = []
            for q in group:
                messages: list[dict[str, str]] = []
                for t in range(turn + 1):
                    messages.append({"role": "user", "content": q["turns"][t]})
                    if t < turn:
                        messages.append({"role": "assistant", "content": answers[q["question_id"]][t]})
                text = render_prompt(tokenizer, messages)
                if len(encode_context(tokenizer, text, special)) > budget:
                    truncated.add((q["question_id"], turn + 1))
                contexts.append(text)
            sample = temp > 1e-4  # FastChat decodes greedily below this temperature
            outs = generate_until(model, tokenizer, contexts, until=[], max_new_tokens=max_new_tokens,
                                  max_length=max_length, batch_size=batch_size, add_special_tokens=special,
                                  do_sample=sample, temperature=temp if sample else 1.0,
                                  seed=seed + 1000 * turn + 100 * g if sample else None)
            for q, out in zip(group, outs):
                answers[q["question_id"]].append(out[0].strip())
            if progress is not None:
                progress(len(group))
    return answers, truncated


def _judge_in_chunks(judge: Judge, requests: list[tuple[str, str]], chunk: int,
                     progress: Callable[[int], None]) -> list[str]:
    outputs: list[str] = []
    for start in range(0, len(requests), chunk):
        part = requests[start:start + chunk]
        outputs.extend(complete_all(judge, part))
        progress(len(part))
    return outputs


def _check_answers(answers: Answers, questions: Sequence[dict[str, Any]], whose: str) -> None:
    for q in questions:
        got = answers.get(q["question_id"])
        if got is None or len(got) < 2:
            raise ValueError(f"{whose} have no two-turn answer for MT-Bench question {q['question_id']}")


def run_mt_bench(ctx: EvalContext) -> BenchmarkResult:
    options = ctx.options
    mode = options.get("mode", "single")
    if mode not in ("single", "pairwise"):
        raise ValueError(f"MT-Bench mode must be 'single' or 'pairwise', not {mode!r}")
    if ctx.data_dir is None or not (Path(ctx.data_dir) / "mt_bench" / "question.jsonl").exists():
        raise _unavailable("MT-Bench needs data_dir with mt_bench/question.jsonl (there is no hub copy here)")
    max_length = context_budget(ctx)
    judge = judge_from_options(options, ctx.model, ctx.tokenizer, max_length)
    if judge is None:
        raise _unavailable("MT-Bench needs a judge: options judge='self', 'local:<path>' or 'openai:<model>'")

    all_questions = load_questions(ctx.data_dir)
    questions = subsample(all_questions, ctx.limit, ctx.seed)
    references = load_references(ctx.data_dir)
    prompts = load_judge_prompts(Path(ctx.data_dir) / "mt_bench" / "judge_prompts.jsonl")
    for q in questions:
        if needs_reference(q["category"]) and q["question_id"] not in references:
            raise ValueError(f"MT-Bench question {q['question_id']} ({q['category']}) has no GPT-4 reference answer")
    max_new_tokens = int(options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))

    given = options.get("answers")
    generations = 0 if given is not None else 2 * len(questions)
    baseline_model = options.get("baseline_model") if mode == "pairwise" else None
    if baseline_model is not None and options.get("baseline_answers") is None:
        generations += 2 * len(questions)
    judgments = (2 if mode == "single" else 4) * len(questions)
    total, done = generations + judgments, 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        if ctx.progress is not None:
            ctx.progress(done, total)

    gen_kw = dict(max_new_tokens=max_new_tokens, max_length=max_length, batch_size=ctx.batch_size, seed=ctx.seed,
                  progress=step)
    truncated: set[tuple[int, int]] = set()
    if given is not None:
        answers = load_answers(given)
    else:
        answers, truncated = generate_answers(ctx.model, ctx.tokenizer, questions, **gen_kw)
    _check_answers(answers, questions, "the model's answers")

    settings: dict[str, Any] = {
        "mode": mode, "questions": len(questions), "of": len(all_questions), "limit": ctx.limit, "seed": ctx.seed,
        "question_ids": [q["question_id"] for q in questions], "max_new_tokens": max_new_tokens,
        "temperatures": dict(TEMPERATURES), "chat_template": has_chat_template(ctx.tokenizer),
        "answers": "given" if given is not None else "generated", "answer_contexts_truncated": len(truncated),
        "reference_answers": "reference_answer/gpt-4.jsonl for math, reasoning, coding",
    }
    notes: list[str] = []
    if ctx.limit is not None and len(questions) < len(all_questions):
        notes.append(f"seeded subset: {len(questions)} of {len(all_questions)} questions (seed {ctx.seed})")
    if truncated:
        notes.append(f"{len(truncated)} answer contexts were cut from the left to fit {max_length} tokens")

    if mode == "single":
        metrics, samples = _single(judge, questions, answers, references, prompts, ctx.batch_size, step,
                                   truncated, settings, notes)
    else:
        baseline_source = options.get("baseline_answers")
        if baseline_source is not None:
            baseline = load_answers(baseline_source)
        elif baseline_model is not None:
            baseline, _ = generate_answers(baseline_model, options.get("baseline_tokenizer") or ctx.tokenizer,
                                           questions, **gen_kw)
        else:
            raise ValueError("pairwise MT-Bench needs options baseline_answers or baseline_model")
        _check_answers(baseline, questions, "the baseline's answers")
        settings["baseline"] = str(options.get("baseline_name") or ("given answers" if baseline_source is not None
                                                                    else "baseline_model"))
        metrics, samples = _pairwise(judge, questions, answers, baseline, references, prompts, ctx.batch_size,
                                     step, settings, notes)

    description = judge.describe()  # after judging: a local judge reports how many prompts it had to cut
    settings["judge"] = description
    notes.extend(description["notes"])
    return BenchmarkResult("mt_bench", metrics, samples, settings, notes)


def _single(judge: Judge, questions: Sequence[dict[str, Any]], answers: Answers, references: Answers,
            prompts: dict, chunk: int, step: Callable[[int], None], truncated: set[tuple[int, int]],
            settings: dict[str, Any], notes: list[str]) -> tuple[dict[str, Metric], list[dict[str, Any]]]:
    plan, requests = [], []
    for q in questions:
        qid, ref = q["question_id"], references.get(q["question_id"]) if needs_reference(q["category"]) else None
        for turn in (1, 2):
            name = single_prompt_name(q["category"], turn)
            requests.append(format_single(prompts[name], q["turns"], answers[qid], turn, ref))
            plan.append((q, turn, name, ref is not None))
    outputs = _judge_in_chunks(judge, requests, chunk, step)

    samples: list[dict[str, Any]] = []
    by_turn: dict[int, list[float]] = {1: [], 2: []}
    reasons: dict[str, int] = defaultdict(int)
    for (q, turn, name, guided), output in zip(plan, outputs):
        rating, failure = checked_rating(output)
        if rating is None:
            reasons[failure] += 1
        else:
            by_turn[turn].append(rating)
        samples.append({"question_id": q["question_id"], "category": q["category"], "turn": turn,
                        "question": q["turns"][turn - 1], "answer": answers[q["question_id"]][turn - 1],
                        "context_truncated": (q["question_id"], turn) in truncated, "judge_prompt": name,
                        "reference_guided": guided, "judge_output": output, "rating": rating, "failure": failure})

    failures = sum(reasons.values())
    settings.update(judgments=len(samples), judge_failures=failures, judge_failure_reasons=dict(reasons))
    if failures:
        notes.append(f"judge_failures: {failures} of {len(samples)} judgments gave no usable 1-10 rating and are "
                     "excluded from the scores")
    metrics: dict[str, Metric] = {}
    candidates = {"score": by_turn[1] + by_turn[2], "score_turn1": by_turn[1], "score_turn2": by_turn[2]}
    not_measured = []
    for key, values in candidates.items():
        if values:
            metrics[key] = Metric.mean(values, 1.0, 10.0)
        else:
            not_measured.append(key)
    if not_measured:
        settings["not_measured"] = not_measured
        notes.append(f"not measured (no parsable rating): {', '.join(not_measured)}")
    return metrics, samples


def _pairwise(judge: Judge, questions: Sequence[dict[str, Any]], answers: Answers, baseline: Answers,
              references: Answers, prompts: dict, chunk: int, step: Callable[[int], None],
              settings: dict[str, Any], notes: list[str]) -> tuple[dict[str, Metric], list[dict[str, Any]]]:
    plan, requests = [], []
    for q in questions:
        qid, ref = q["question_id"], references.get(q["question_id"]) if needs_reference(q["category"]) else None
        for turn in (1, 2):
            name = pair_prompt_name(q["category"], turn)
            # Game 1: the model is assistant A; game 2: positions swapped.
            requests.append(format_pair(prompts[name], q["turns"], answers[qid], baseline[qid], turn, ref))
            requests.append(format_pair(prompts[name], q["turns"], baseline[qid], answers[qid], turn, ref))
            plan.append((q, turn, name))
    outputs = _judge_in_chunks(judge, requests, chunk, step)

    samples: list[dict[str, Any]] = []
    counts = {"win": 0, "loss": 0, "tie": 0, "error": 0}
    credit: list[float] = []
    for i, (q, turn, name) in enumerate(plan):
        g1, g2 = outputs[2 * i], outputs[2 * i + 1]
        v1, v2 = parse_verdict(g1), parse_verdict(g2)
        outcome = resolve_swap(v1, v2)
        counts[outcome] += 1
        if outcome != "error":
            credit.append({"win": 1.0, "tie": 0.5, "loss": 0.0}[outcome])
        qid = q["question_id"]
        samples.append({"question_id": qid, "category": q["category"], "turn": turn, "question": q["turns"][turn - 1],
                        "answer": answers[qid][turn - 1], "baseline_answer": baseline[qid][turn - 1],
                        "judge_prompt": name, "judge_output": [g1, g2], "verdicts": [v1, v2], "outcome": outcome,
                        "failure": "no [[A]]/[[B]]/[[C]] verdict" if outcome == "error" else None})

    n = counts["win"] + counts["loss"] + counts["tie"]
    settings.update(judgments=2 * len(samples), pairs=len(samples), wins=counts["win"], losses=counts["loss"],
                    ties=counts["tie"], errors=counts["error"], judge_failures=counts["error"])
    if counts["error"]:
        notes.append(f"judge_failures: {counts['error']} of {len(samples)} pairs had a game without a verdict and "
                     "are excluded")
    metrics: dict[str, Metric] = {}
    if n:
        metrics["win_rate"] = Metric.proportion(counts["win"], n)
        metrics["win_rate_adjusted"] = Metric.mean(credit, 0.0, 1.0)
    else:
        settings["not_measured"] = ["win_rate", "win_rate_adjusted"]
        notes.append("not measured (no pair with verdicts in both games): win_rate, win_rate_adjusted")
    notes.append(f"pairwise vs {settings['baseline']}: {counts['win']} wins, {counts['tie']} ties, "
                 f"{counts['loss']} losses, n={n} pairs with both verdicts, {counts['error']} excluded "
                 "(each pair judged twice, positions swapped; inconsistent verdicts count as ties)")
    return metrics, samples
