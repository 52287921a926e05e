"""ARC-Easy and ARC-Challenge (test splits: 2,376 and 1,172 questions) scored like lm-eval's `arc_easy` /
`arc_challenge` (EVALUATION.md §3).

Guarantees:
- prompt "Question: {stem}\\nAnswer:"; each choice is scored as " " + its text ("" + text with the chat template);
  3 to 5 options, labels A-E or 1-5: the gold is always `labels.index(answerKey)`, never a position;
- `acc` = argmax of the raw log-likelihood; `acc_norm` = argmax of log-likelihood / character length of the choice
  text (without the delimiter); ties go to the first choice, as numpy's argmax does;
- 0-shot by default; with `ctx.options["num_fewshot"] = k`, k examples from the train split ("{prompt} {gold text}",
  joined and followed by "\\n\\n"), drawn with `random.Random(fewshot_seed)` (1234, lm-eval's, unless
  `ctx.options["fewshot_seed"]`) one draw per test question in file order, so a question subsampled with
  `ctx.limit` gets the same examples as in a full run;
- data: `data_dir/arc/ARC-{Easy,Challenge}/ARC-*-{Test,Train}.jsonl` (the AI2 ARC-V1 format), or
  `allenai/ai2_arc` from the hub when `data_dir` is None.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..loglikelihood import first_argmax, load_hub_split, prompt_fields, render_prompt, score_choices
from .base import BenchmarkResult, EvalContext, Metric, context_budget, subsample

FEWSHOT_SEED = 1234  # lm-eval's fewshot_random_seed


@dataclass(frozen=True)
class Item:
    id: str
    stem: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    gold: int


def arc_prompt(item: Item) -> str:
    return f"Question: {item.stem}\nAnswer:"


def predictions(lls: list[float], texts: tuple[str, ...] | list[str]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction): argmax of ll, and of ll / len(choice text) in characters."""
    if len(lls) != len(texts):
        raise ValueError("one log-likelihood per choice")
    return first_argmax(lls), first_argmax([ll / max(len(t), 1) for ll, t in zip(lls, texts)])


def _item(raw: dict, where: str) -> Item:
    q = raw["question"]
    if isinstance(q, dict):  # the AI2 files: question.stem, question.choices[{text, label}]
        stem, texts, labels = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    else:  # the hub: question (str), choices {text: [...], label: [...]}
        stem, texts, labels = q, list(raw["choices"]["text"]), list(raw["choices"]["label"])
    key = str(raw["answerKey"])
    if key not in labels:
        raise ValueError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
    return Item(str(raw.get("id", where)), stem, tuple(texts), tuple(labels), labels.index(key))


def load_arc(data_dir: Path | None, subset: str, split: str) -> list[Item]:
    """Items of `subset` ("Easy" or "Challenge") and `split` ("Test", "Train" or "Dev"), in file order."""
    if data_dir is None:
        hub_split = {"Test": "test", "Train": "train", "Dev": "validation"}[split]
        rows = load_hub_split(f"arc_{subset.lower()}", "allenai/ai2_arc", f"ARC-{subset}", hub_split)
        return [_item(r, f"allenai/ai2_arc ARC-{subset} {hub_split} row {i + 1}") for i, r in enumerate(rows)]
    path = Path(data_dir) / "arc" / f"ARC-{subset}" / f"ARC-{subset}-{split}.jsonl"
    if not path.is_file():
        from ..harness import BenchmarkUnavailable

        raise BenchmarkUnavailable(f"arc_{subset.lower()}: {path} does not exist (a --data-dir laid out like "
                                   "../shared/datasets)")
    items = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                items.append(_item(json.loads(line), f"{path}:{lineno}"))
    return items


def _run(ctx: EvalContext, subset: str) -> BenchmarkResult:
    name = f"arc_{subset.lower()}"
    shots = int(ctx.options.get("num_fewshot") or 0)
    fewshot_seed = int(ctx.options.get("fewshot_seed", FEWSHOT_SEED))
    chat = bool(ctx.options.get("chat_template", False))
    test = load_arc(ctx.data_dir, subset, "Test")
    examples = [""] * len(test)
    if shots > 0:
        train = load_arc(ctx.data_dir, subset, "Train")
        rng = random.Random(fewshot_seed)
        # Drawn for every test item in order (not only the subsampled ones) so the draws do not depend on limit.
        examples = ["".join(f"{arc_prompt(s)} {s.texts[s.gold]}\n\n" for s in rng.sample(train, shots))
                    for _ in test]
    chosen = subsample(list(range(len(test))), ctx.limit, ctx.seed)
    delimiter = "" if chat else " "
    prompts = [render_prompt(ctx.tokenizer, examples[i] + arc_prompt(test[i]), chat) for i in chosen]
    lls = score_choices(ctx.model, ctx.tokenizer,
                        [(p, [delimiter + t for t in test[i].texts]) for p, i in zip(prompts, chosen)],
                        batch_size=ctx.batch_size, max_length=context_budget(ctx), add_special_tokens=not chat,
                        progress=ctx.progress)

    samples = []
    for i, prompt, ll in zip(chosen, prompts, lls):
        item = test[i]
        pred, pred_norm = predictions(ll, item.texts)
        samples.append({"id": item.id, **prompt_fields(prompt), "choices": list(item.texts),
                        "labels": list(item.labels), "gold": item.gold, "loglikelihoods": ll,
                        "prediction": pred, "correct": pred == item.gold,
                        "prediction_norm": pred_norm, "correct_norm": pred_norm == item.gold})
    n = len(samples)
    metrics = {"acc": Metric.proportion(sum(s["correct"] for s in samples), n),
               "acc_norm": Metric.proportion(sum(s["correct_norm"] for s in samples), n)}
    settings = {
        "num_fewshot": shots, "fewshot_source": f"train, random.Random({fewshot_seed}) one draw per test item"
        if shots else None, "chat_template": chat, "delimiter": delimiter,
        "metric": "acc = argmax ll; acc_norm = argmax ll / character length of the choice text",
        "limit": ctx.limit, "seed": ctx.seed, "n_scored": n, "n_available": len(test),
        "max_length": context_budget(ctx), "data": str(ctx.data_dir) if ctx.data_dir else "hub:allenai/ai2_arc",
    }
    return BenchmarkResult(name, metrics, samples, settings)


def run_arc_easy(ctx: EvalContext) -> BenchmarkResult:
    return _run(ctx, "Easy")


def run_arc_challenge(ctx: EvalContext) -> BenchmarkResult:
    return _run(ctx, "Challenge")
