"""Evaluation throughput: posttrain's batched log-likelihood scoring against a straightforward one-at-a-time
baseline, on the same model and the same real benchmark questions (printed, not asserted).

    python bench/eval.py [--model PATH_OR_ID] [--questions 40] [--data-dir ../shared/datasets]

For MMLU (5-shot, four one-token continuations sharing one context) and ARC-Easy (0-shot, 3-5 choice texts) it
builds the standard requests, scores them both ways, and prints one JSON line per benchmark: questions/s for each
side, the ratio, and the largest difference between the two sides' log-likelihoods (they must agree). The baseline
is what a first implementation does: encode context + continuation, run the model on that one sequence, sum the
continuation's log-probs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from posttrain.evaluate.benchmarks.arc import arc_prompt, load_arc
from posttrain.evaluate.benchmarks.mmlu import build_prompt, load_split
from posttrain.evaluate.loglikelihood import score_choices
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
    dev, test = load_split(data_dir, "dev"), load_split(data_dir, "test")
    subjects = sorted(test)
    questions = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        q = test[subject][i // len(subjects)]
        questions.append((build_prompt(q, dev[subject][:5]), [" A", " B", " C", " D"]))
    return questions


def arc_questions(data_dir: Path, n: int) -> list[tuple[str, list[str]]]:
    items = load_arc(data_dir, "Easy", "Test")[:n]
    return [(arc_prompt(item), [" " + t for t in item.texts]) for item in items]


def measure(fn) -> tuple[list[list[float]], float]:
    started = time.perf_counter()
    scores = fn()
    return scores, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    max_length = int(model.config.max_position_embeddings)
    data_dir = Path(args.data_dir)
    print(json.dumps({"event": "setup", "model": args.model, "threads": torch.get_num_threads(),
                      "machine": platform.machine(), "torch": torch.__version__}), flush=True)
    for name, questions in (("mmlu_5shot", mmlu_questions(data_dir, args.questions)),
                            ("arc_easy", arc_questions(data_dir, args.questions))):
        ours, t_ours = measure(lambda: score_choices(model, tokenizer, questions, batch_size=args.batch_size,
                                                     max_length=max_length))
        base, t_base = measure(lambda: one_at_a_time(model, tokenizer, questions, max_length))
        diff = max(abs(a - b) for qa, qb in zip(ours, base) for a, b in zip(qa, qb))
        print(json.dumps({"benchmark": name, "questions": len(questions),
                          "requests": sum(len(c) for _, c in questions),
                          "posttrain_questions_per_s": round(len(questions) / t_ours, 2),
                          "baseline_questions_per_s": round(len(questions) / t_base, 2),
                          "ratio": round(t_base / t_ours, 2), "max_abs_loglik_diff": diff}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
