"""The pure pieces of MT-Bench judging (FastChat llm_judge conventions, ../shared/EVALUATION.md §7): loading the
judge prompts, choosing and filling them, reading a rating or a verdict out of a judge's text, and resolving a
position-swapped pair.

Guarantees:
- `parse_rating` applies FastChat's patterns in FastChat's order: `\\[\\[(\\d+\\.?\\d*)\\]\\]` first, then the
  fallback `\\[(\\d+\\.?\\d*)\\]`, and returns the number as a float; no match gives None (FastChat's -1). The
  range check (`checked_rating`) is separate: a number outside 1–10 is not an MT-Bench rating and counts as a
  failure (FastChat would keep it; with GPT-4 as the judge this never comes up, with a weak local judge it does).
- `parse_verdict` checks `[[A]]`, then `[[B]]`, then `[[C]]` (tie), as FastChat does, so a text holding more than
  one of them resolves to the first in that order; none gives None (FastChat's "error").
- `resolve_swap` follows FastChat's consistency rule: either game unreadable -> "error" (dropped and counted by
  the caller); either game a tie, or the two games disagreeing once the swap is undone -> "tie".
- Prompt filling uses the template's own `str.format` fields, exactly the keyword names FastChat passes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Categories judged against the GPT-4 reference answers (FastChat's NEED_REF_CATS).
NEED_REF_CATS = ("math", "reasoning", "coding")
RATING_MIN, RATING_MAX = 1.0, 10.0

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str  # "single" | "pairwise"
    system_prompt: str
    prompt_template: str
    output_format: str


def load_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """name -> JudgePrompt, read from FastChat's judge_prompts.jsonl."""
    prompts: dict[str, JudgePrompt] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                prompts[d["name"]] = JudgePrompt(d["name"], d["type"], d["system_prompt"], d["prompt_template"],
                                                 d.get("output_format", ""))
    return prompts


def needs_reference(category: str) -> bool:
    return category in NEED_REF_CATS


def single_prompt_name(category: str, turn: int) -> str:
    """single-v1 / single-v1-multi-turn, or the reference-guided single-math-v1(-multi-turn)."""
    base = "single-math-v1" if needs_reference(category) else "single-v1"
    return base if turn == 1 else base + "-multi-turn"


def pair_prompt_name(category: str, turn: int) -> str:
    """pair-v2 / pair-v2-multi-turn, or the reference-guided pair-math-v1(-multi-turn)."""
    base = "pair-math-v1" if needs_reference(category) else "pair-v2"
    return base if turn == 1 else base + "-multi-turn"


def _reference_fields(reference: Sequence[str] | None, turn: int) -> dict[str, str]:
    if reference is None:
        return {}
    fields = {"ref_answer_1": reference[0]}
    if turn == 2:
        fields["ref_answer_2"] = reference[1]
    return fields


def format_single(prompt: JudgePrompt, questions: Sequence[str], answers: Sequence[str], turn: int,
                  reference: Sequence[str] | None = None) -> tuple[str, str]:
    """(system, user) for grading the answer to `turn` (1 or 2) of a two-turn question."""
    if turn == 1:
        fields = {"question": questions[0], "answer": answers[0]}
    else:
        fields = {"question_1": questions[0], "question_2": questions[1],
                  "answer_1": answers[0], "answer_2": answers[1]}
    return prompt.system_prompt, prompt.prompt_template.format(**fields, **_reference_fields(reference, turn))


def format_pair(prompt: JudgePrompt, questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
                turn: int, reference: Sequence[str] | None = None) -> tuple[str, str]:
    """(system, user) for comparing assistant A's and B's answers at `turn` (1 or 2)."""
    if turn == 1:
        fields = {"question": questions[0], "answer_a": answers_a[0], "answer_b": answers_b[0]}
    else:
        fields = {"question_1": questions[0], "question_2": questions[1],
                  "answer_a_1": answers_a[0], "answer_a_2": answers_a[1],
                  "answer_b_1": answers_b[0], "answer_b_2": answers_b[1]}
    return prompt.system_prompt, prompt.prompt_template.format(**fields, **_reference_fields(reference, turn))


def parse_rating(text: str) -> float | None:
    """The judge's rating as FastChat reads it, or None when neither pattern matches."""
    match = _RATING.search(text) or _RATING_FALLBACK.search(text)
    if match is None:
        return None
    return float(match.group(1))


def checked_rating(text: str) -> tuple[float | None, str | None]:
    """(rating, None) for a usable 1–10 rating, else (None, reason)."""
    rating = parse_rating(text)
    if rating is None:
        return None, "no [[rating]] in the judge output"
    if not RATING_MIN <= rating <= RATING_MAX:
        return None, f"rating {rating:g} outside 1-10"
    return rating, None


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from `[[A]]` / `[[B]]` / `[[C]]` (checked in that order), None when absent."""
    if "[[A]]" in text:
        return "A"
    if "[[B]]" in text:
        return "B"
    if "[[C]]" in text:
        return "tie"
    return None


def resolve_swap(first: str | None, second: str | None) -> str:
    """The evaluated model's outcome from two games: `first` with the model as A, `second` with the model as B.

    Returns 'win', 'loss', 'tie' or 'error' (a game without a verdict).
    """
    if first is None or second is None:
        return "error"
    if first == "tie" or second == "tie":
        return "tie"
    # Undo the swap: in the second game the model sat in position B.
    winner_first = "model" if first == "A" else "other"
    winner_second = "model" if second == "B" else "other"
    if winner_first != winner_second:
        return "tie"
    return "win" if winner_first == "model" else "loss"
