"""Evaluation throughput: posttrain's batched log-likelihood scoring against a straightforward one-at-a-time
baseline, on the same model and the same real benchmark questions (printed, not asserted).

    python bench/eval.py [--model PATH_OR_ID] [--questions 40] [--data-dir ../shared/datasets]

For MMLU (5-shot, four one-token continuations sharing one context) and ARC-Easy (0-shot, 3-5 choice texts) it
builds the standard requests, scores them both ways, and prints one JSON line per benchmark: questions/s for each
side, the ratio, the largest difference between the two sides' log-likelihoods (they must agree), posttrain again
with its shared-prefix reuse off (`share_prefixes=False`: what the reuse alone buys), and how many requests
posttrain scored on a cached shared prefix (and the prefix tokens it did not run again). The baseline is what a
first implementation does: encode context + continuation, run the model on that one sequence, sum the
continuation's log-probs. Times are medians over `--repeats` rounds in which the three sides take turns. The very
first posttrain call also runs the once-per-model-class check of the prefix path against the plain forward (a few
inputs run both ways).

MMLU is measured twice: `mmlu_5shot_by_subject` takes up to `--per-subject` test questions of each subject in
alphabetical order, as a full run meets them (a subject's questions share its 5-shot prompt), skipping questions
whose 5-shot prompt is longer than the model's window (a left-truncated window shares no prefix, and the embedded
model's 512-token BPE makes most MMLU prompts longer than its 1024 positions); `mmlu_5shot_one_per_subject` takes one
question per subject in turn (what a small `--limit` sample looks like), all subjects, truncated prompts included.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from posttrain.evaluate.benchmarks.arc import arc_prompt, load_arc
from posttrain.evaluate.benchmarks.mmlu import build_prompt, load_split
from posttrain.evaluate.loglikelihood import encode_pairs, plan_requests, score_choices
from posttrain.models.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def one_at_a_time(model, tokenizer, questions, max_length: int) -> list[list[float]]:
    out = []
    for context, continuations in questions:
        scores = []
        for cont in continuations:
            whole = tokenizer(context + cont)["input_ids"]
            n_cont = len(whole) - len(tokenizer(context)["input_ids"])
            window = whole[-(max_length + 1):]  # the standard left truncation (lm-eval), same on both sides
            logits = model(input_ids=torch.tensor([window[:-1]])).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            targets = range(len(window) - n_cont, len(window))
            scores.append(float(sum(logp[i - 1, window[i]] for i in targets)))
        out.append(scores)
    return out


def mmlu_questions(data_dir: Path, n: int) -> list[tuple[str, list[str]]]:
    """One question per subject in turn (subjects in alphabetical order)."""
    dev, test = load_split(data_dir, "dev"), load_split(data_dir, "test")
    subjects = sorted(test)
    questions = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        q = test[subject][i // len(subjects)]
        questions.append((build_prompt(q, dev[subject][:5]), [" A", " B", " C", " D"]))
    return questions


def mmlu_questions_by_subject(data_dir: Path, n: int, per_subject: int, tokenizer,
                              max_length: int) -> list[tuple[str, list[str]]]:
    """Up to `per_subject` questions of each subject in turn whose 5-shot prompts fit `max_length` tokens."""
    dev, test = load_split(data_dir, "dev"), load_split(data_dir, "test")
    questions: list[tuple[str, list[str]]] = []
    for subject in sorted(test):
        prompts = [build_prompt(q, dev[subject][:5]) for q in test[subject][:per_subject]]
        fitting = [p for p in prompts if len(tokenizer(p + " A")["input_ids"]) <= max_length]
        questions += [(p, [" A", " B", " C", " D"]) for p in fitting[:n - len(questions)]]
        if len(questions) == n:
            break
    return questions


def arc_questions(data_dir: Path, n: int) -> list[tuple[str, list[str]]]:
    items = load_arc(data_dir, "Easy", "Test")[:n]
    return [(arc_prompt(item), [" " + t for t in item.texts]) for item in items]


def measure(sides: dict, repeats: int) -> dict[str, tuple[list[list[float]], float]]:
    """Each side's scores and median wall time over `repeats` rounds; the sides take turns within a round, so a
    change in the machine's load reaches all of them."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    scores: dict[str, list[list[float]]] = {}
    for _ in range(repeats):
        for name, fn in sides.items():
            started = time.perf_counter()
            scores[name] = fn()
            times[name].append(time.perf_counter() - started)
    return {name: (scores[name], statistics.median(times[name])) for name in sides}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--per-subject", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    max_length = int(model.config.max_position_embeddings)
    data_dir = Path(args.data_dir)
    print(json.dumps({"event": "setup", "model": args.model, "threads": torch.get_num_threads(),
                      "machine": platform.machine(), "torch": torch.__version__}), flush=True)
    by_subject = mmlu_questions_by_subject(data_dir, args.questions, args.per_subject, tokenizer, max_length)
    for name, questions in (("mmlu_5shot_by_subject", by_subject),
                            ("mmlu_5shot_one_per_subject", mmlu_questions(data_dir, args.questions)),
                            ("arc_easy", arc_questions(data_dir, args.questions))):
        got = measure({
            "ours": lambda: score_choices(model, tokenizer, questions, batch_size=args.batch_size,
                                          max_length=max_length),
            "whole": lambda: score_choices(model, tokenizer, questions, batch_size=args.batch_size,
                                           max_length=max_length, share_prefixes=False),
            "base": lambda: one_at_a_time(model, tokenizer, questions, max_length)}, args.repeats)
        (ours, t_ours), (_, t_whole), (base, t_base) = got["ours"], got["whole"], got["base"]
        diff = max(abs(a - b) for qa, qb in zip(ours, base) for a, b in zip(qa, qb))
        # The plan score_choices followed (one encoding chunk: the requests here are far fewer than CHUNK_REQUESTS).
        plan = plan_requests(encode_pairs(tokenizer, [(c, x) for c, xs in questions for x in xs]),
                             max_length=max_length)
        print(json.dumps({"benchmark": name, "questions": len(questions), "repeats": args.repeats,
                          "requests": sum(len(c) for _, c in questions),
                          "posttrain_questions_per_s": round(len(questions) / t_ours, 2),
                          "baseline_questions_per_s": round(len(questions) / t_base, 2),
                          "ratio": round(t_base / t_ours, 2), "max_abs_loglik_diff": diff,
                          "no_prefix_reuse_questions_per_s": round(len(questions) / t_whole, 2),
                          "prefix_reuse_ratio": round(t_whole / t_ours, 2),
                          "requests_on_shared_prefix": plan.requests_on_shared_prefix(),
                          "prefix_tokens_reused": plan.prefix_tokens_reused(args.batch_size)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
