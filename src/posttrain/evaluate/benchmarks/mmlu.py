"""MMLU (57 subjects, 14,042 test questions) scored like lm-eval's `mmlu` task (EVALUATION.md §2).

Guarantees:
- prompt: "The following are multiple choice questions (with answers) about {subject with spaces}.\\n\\n", then the
  FIRST `num_fewshot` dev rows of the same subject (default 5, `ctx.options["num_fewshot"]`), each
  "{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer: {gold letter}" followed by "\\n\\n", then the
  question in the same template ending in "Answer:";
- the continuations scored are " A" .. " D" ("A" .. "D" with the chat template, whose generation prompt ends the
  context); the prediction is the argmax of the raw log-likelihood (ties: the first); there is no acc_norm;
- `acc` is the micro-average over the questions scored (lm-eval's weight_by_size); `acc/<category>` the same over
  each of stem, humanities, social_sciences, other (lm-eval's subject -> category map), and
  `settings["per_subject"]` each subject's accuracy with n and interval;
- `ctx.limit` scores a seeded random subset of all questions (subjects in alphabetical order, file order within);
- data: `data_dir/mmlu/{dev,test}/<subject>_{dev,test}.csv` (header question,choice0..choice3,answer with answer an
  integer 0-3), or `cais/mmlu` ("all") from the hub when `data_dir` is None.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..loglikelihood import first_argmax, load_hub_split, prompt_fields, render_prompt, score_choices
from .base import BenchmarkResult, EvalContext, Metric, context_budget, subsample

LETTERS = ("A", "B", "C", "D")

# lm-eval's grouping of the 57 subjects (the original MMLU paper's categories).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}
SUBJECT_CATEGORY: dict[str, str] = {s: c for c, subjects in CATEGORIES.items() for s in subjects}
SUBJECTS: tuple[str, ...] = tuple(sorted(SUBJECT_CATEGORY))


@dataclass(frozen=True)
class Question:
    subject: str
    index: int  # row within its subject's split, 0-based
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0-3


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(q: Question) -> str:
    lines = [q.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def build_prompt(q: Question, shots: list[Question]) -> str:
    """The plain-text context for `q` with these few-shot examples (lm-eval's fewshot_context)."""
    examples = "".join(f"{format_question(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return description(q.subject) + examples + format_question(q)


# ------------------------------------------------------------------------------------------------ data

def _read_csv(path: Path, subject: str) -> list[Question]:
    from ..harness import BenchmarkUnavailable

    if not path.is_file():
        raise BenchmarkUnavailable(f"mmlu: {path} does not exist (a --data-dir laid out like ../shared/datasets "
                                   "has mmlu/dev and mmlu/test with one CSV per subject)")
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            try:
                answer = int(row["answer"])
                choices = tuple(row[f"choice{k}"] for k in range(4))
                question = row["question"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}, row {i + 2}: expected question,choice0..choice3,answer with an integer "
                                 f"answer, got {row}") from None
            if not 0 <= answer <= 3:
                raise ValueError(f"{path}, row {i + 2}: answer must be 0-3, got {answer}")
            out.append(Question(subject, i, question, choices, answer))  # type: ignore[arg-type]
    return out


def load_split(data_dir: Path | None, split: str) -> dict[str, list[Question]]:
    """Questions per subject for `split` ("test" or "dev"), in file order."""
    if data_dir is not None:
        return {s: _read_csv(Path(data_dir) / "mmlu" / split / f"{s}_{split}.csv", s) for s in SUBJECTS}
    grouped: dict[str, list[Question]] = {s: [] for s in SUBJECTS}
    for row in load_hub_split("mmlu", "cais/mmlu", "all", split):
        subject = row["subject"]
        if subject not in grouped:
            raise ValueError(f"mmlu: unknown subject {subject!r} in cais/mmlu")
        grouped[subject].append(Question(subject, len(grouped[subject]), row["question"],
                                         tuple(row["choices"]), int(row["answer"])))  # type: ignore[arg-type]
    return grouped


# ------------------------------------------------------------------------------------------------ run

def run_mmlu(ctx: EvalContext) -> BenchmarkResult:
    shots = int(ctx.options.get("num_fewshot") if ctx.options.get("num_fewshot") is not None else 5)
    chat = bool(ctx.options.get("chat_template", False))
    test = load_split(ctx.data_dir, "test")
    dev = load_split(ctx.data_dir, "dev") if shots > 0 else {s: [] for s in SUBJECTS}
    for subject, rows in dev.items():
        if len(rows) < shots:
            raise ValueError(f"mmlu: {shots}-shot needs {shots} dev rows for {subject}, found {len(rows)}")
    everything = [q for s in SUBJECTS for q in test[s]]
    chosen = subsample(everything, ctx.limit, ctx.seed)
    # The chat template's generation prompt ends the context, so the letter follows it directly (lm-eval).
    delimiter = "" if chat else " "
    continuations = [delimiter + letter for letter in LETTERS]
    prompts = [render_prompt(ctx.tokenizer, build_prompt(q, dev[q.subject][:shots]), chat) for q in chosen]
    lls = score_choices(ctx.model, ctx.tokenizer, [(p, continuations) for p in prompts],
                        batch_size=ctx.batch_size, max_length=context_budget(ctx), add_special_tokens=not chat,
                        progress=ctx.progress)

    samples = []
    by_subject: dict[str, list[bool]] = {}
    for q, prompt, ll in zip(chosen, prompts, lls):
        pred = first_argmax(ll)
        correct = pred == q.answer
        by_subject.setdefault(q.subject, []).append(correct)
        samples.append({"id": f"{q.subject}/{q.index}", "subject": q.subject,
                        "category": SUBJECT_CATEGORY[q.subject], **prompt_fields(prompt),
                        "choices": continuations, "gold": q.answer, "loglikelihoods": ll, "prediction": pred,
                        "correct": correct})

    flags = [s["correct"] for s in samples]
    metrics = {"acc": Metric.proportion(sum(flags), len(flags))}
    for category, subjects in CATEGORIES.items():
        hits = [c for s in subjects for c in by_subject.get(s, [])]
        if hits:
            metrics[f"acc/{category}"] = Metric.proportion(sum(hits), len(hits))
    per_subject = {s: Metric.proportion(sum(v), len(v)).as_dict() for s, v in sorted(by_subject.items())}
    settings = {
        "num_fewshot": shots, "fewshot_source": "dev, first n rows of the subject (lm-eval sampler first_n)",
        "chat_template": chat, "continuations": continuations, "metric": "acc = argmax of raw log-likelihood",
        "aggregation": "micro-average over questions (acc and acc/<category>)", "limit": ctx.limit,
        "seed": ctx.seed, "n_scored": len(samples), "n_available": len(everything),
        "max_length": context_budget(ctx), "data": str(ctx.data_dir) if ctx.data_dir else "hub:cais/mmlu",
        "per_subject": per_subject,
    }
    notes = []
    if ctx.limit is not None and ctx.limit < len(everything):
        notes.append(f"seeded subset of {len(samples)} of {len(everything)} questions; subjects are unevenly "
                     "represented, so per-subject numbers have wide intervals")
    return BenchmarkResult("mmlu", metrics, samples, settings, notes)
