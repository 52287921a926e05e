"""The embedded task: generated GSM8K-style arithmetic word problems with checkable answers.

Each item is ``{"question": str, "answer": str, "kind": template name}``; the answer is a short worked solution
whose last line is ``#### N`` (the GSM8K convention), e.g. ``"Sam has 7 + 5 = 12 apples.\\n#### 12"``.

Templates: addition, subtraction, multiplication and a two-step (add then subtract) problem, over varied names
and objects with small numbers, so that a tiny model can learn part of the task in a couple of CPU minutes and
still leave room for alignment to improve it.

Guarantees:
- ``make_splits(seed, ...)`` is a pure function of its arguments (its own ``random.Random(seed)``; the global
  RNG is never touched) and train/test share no identical question.
- Every answer's ``#### N`` value is the true result of the arithmetic in the question (checked by the tests).
- ``preference_rows`` "rejected" answers end in a result that differs from the correct one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

NAMES = (
    "Sam", "Ava", "Liam", "Mia", "Noah", "Emma", "Omar", "Lena", "Ravi", "Zoe",
    "Ben", "Ivy", "Kai", "Nora", "Leo", "Maya", "Finn", "Ella", "Hugo", "Rosa",
)
# (plural noun, container word used by the multiplication template)
OBJECTS = (
    ("apples", "bags"), ("pencils", "boxes"), ("marbles", "jars"), ("stickers", "sheets"),
    ("cookies", "plates"), ("books", "shelves"), ("coins", "purses"), ("eggs", "cartons"),
    ("cards", "packs"), ("shells", "buckets"), ("flowers", "vases"), ("stamps", "albums"),
)

Item = dict[str, str]


def _add(rng: random.Random, name: str, friend: str, obj: str, box: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    c = a + b
    q = rng.choice((
        f"{name} has {a} {obj}. {friend} gives {name} {b} more. How many {obj} does {name} have now?",
        f"{name} picked {a} {obj} in the morning and {b} {obj} in the afternoon. How many {obj} did {name} pick?",
    ))
    return q, f"{name} has {a} + {b} = {c} {obj}.", c


def _sub(rng: random.Random, name: str, friend: str, obj: str, box: str) -> tuple[str, str, int]:
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    c = a - b
    if rng.random() < 0.5:
        q = f"{name} has {a} {obj} and gives {b} of them to {friend}. How many {obj} does {name} have left?"
        return q, f"{name} has {a} - {b} = {c} {obj} left.", c
    q = f"There are {a} {obj} on the table. {name} takes away {b}. How many {obj} are left on the table?"
    return q, f"There are {a} - {b} = {c} {obj} left.", c


def _mul(rng: random.Random, name: str, friend: str, obj: str, box: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = a * b
    q = rng.choice((
        f"{name} has {a} {box} with {b} {obj} in each. How many {obj} does {name} have in total?",
        f"{name} buys {a} {box}. Each one holds {b} {obj}. How many {obj} did {name} buy?",
    ))
    return q, f"{name} has {a} * {b} = {c} {obj}.", c


def _two_step(rng: random.Random, name: str, friend: str, obj: str, box: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    s = a + b
    c = rng.randint(1, s - 1)
    r = s - c
    q = (f"{name} has {a} {obj} and buys {b} more. Then {name} gives {c} {obj} to {friend}. "
         f"How many {obj} does {name} have now?")
    return q, f"{name} has {a} + {b} = {s} {obj}. Then {s} - {c} = {r} {obj}.", r


TEMPLATES: dict[str, Callable[..., tuple[str, str, int]]] = {
    "add": _add, "subtract": _sub, "multiply": _mul, "two_step": _two_step,
}


def format_answer(solution: str, result: int | str) -> str:
    """The answer format of the task: the worked solution, a newline, then ``#### N``."""
    return f"{solution}\n#### {result}"


def make_item(rng: random.Random, kind: str | None = None) -> Item:
    """One problem drawn from ``rng`` (a template chosen uniformly unless ``kind`` names one)."""
    kind = kind if kind is not None else rng.choice(sorted(TEMPLATES))
    name, friend = rng.sample(NAMES, 2)
    obj, box = rng.choice(OBJECTS)
    question, solution, result = TEMPLATES[kind](rng, name, friend, obj, box)
    return {"question": question, "answer": format_answer(solution, result), "kind": kind}


def make_splits(seed: int = 0, n_train: int = 2000, n_test: int = 200) -> tuple[list[Item], list[Item]]:
    """Deterministic train/test splits with no question in both (and no duplicate question within a split).

    Draws distinct questions from a private ``random.Random(seed)`` until ``n_train + n_test`` are collected,
    then assigns the first ``n_test`` to test. Raises ``ValueError`` if that many distinct questions cannot be
    found (the template space holds far more than any sensible request).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    rng = random.Random(seed)
    want = n_train + n_test
    seen: set[str] = set()
    items: list[Item] = []
    attempts = 0
    while len(items) < want:
        attempts += 1
        if attempts > 50 * want + 1000:
            raise ValueError(f"could not draw {want} distinct questions")
        item = make_item(rng)
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        items.append(item)
    return items[n_test:], items[:n_test]


def final_result(answer: str) -> str:
    """The text after the last ``#### `` of an item's answer (always a plain integer for this task)."""
    return answer.rsplit("####", 1)[1].strip()


def verifiable_rows(items: Iterable[Item]) -> list[dict[str, Any]]:
    """Normalised verifiable rows: ``{"prompt": [user message], "answer": "N"}``."""
    return [{"prompt": [{"role": "user", "content": it["question"]}], "answer": final_result(it["answer"])}
            for it in items]


ALT_FINAL_LINE = "The answer is {}."


def alt_format_answer(answer: str) -> str:
    """The same worked solution ending in ``The answer is N.`` instead of ``#### N``: a convention other corpora
    use, which the task's verifier (``rewards.verifiable``) does not accept."""
    body, _ = answer.rsplit("\n####", 1)
    return f"{body}\n{ALT_FINAL_LINE.format(final_result(answer))}"


def sft_rows(items: Iterable[Item], alt_format_rates: Mapping[str, float] | None = None,
             seed: int = 0) -> list[dict[str, Any]]:
    """Normalised SFT rows: ``{"prompt": [user message], "completion": [assistant worked solution]}``.

    ``alt_format_rates`` maps a template kind to the share of its rows (each drawn with ``random.Random(seed)``)
    that end in the other convention (``alt_format_answer``), as in an SFT corpus pooled from sources that write
    answers differently and cover problem types in different proportions. By default every row ends in
    ``#### N``."""
    rates = dict(alt_format_rates or {})
    for kind, rate in rates.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"alt_format_rates[{kind!r}] must be in [0, 1], got {rate}")
    rng = random.Random(seed)
    rows = []
    for it in items:
        alt = rng.random() < rates.get(it.get("kind", ""), 0.0)
        rows.append({"prompt": [{"role": "user", "content": it["question"]}],
                     "completion": [{"role": "assistant",
                                     "content": alt_format_answer(it["answer"]) if alt else it["answer"]}]})
    return rows


def _slip(answer: str, rng: random.Random) -> str:
    """A plausible wrong solution: the last ``= X`` result and the ``#### X`` line changed by a small nonzero
    offset, as if the final arithmetic step slipped. The rest of the working is left untouched so that the
    pair differs only where the mistake is (what a preference learner should pick up)."""
    body, _ = answer.rsplit("\n####", 1)
    right = int(final_result(answer))
    delta = rng.choice((-10, -2, -1, 1, 2, 10))
    wrong = right + delta if right + delta >= 0 else right + abs(delta)
    head, sep, tail = body.rpartition(f"= {right}")
    if not sep:  # every template writes "= result"; keep a safe fallback anyway
        return format_answer(body, wrong)
    return format_answer(f"{head}= {wrong}{tail}", wrong)


def preference_rows(items: Iterable[Item], seed: int = 0) -> list[dict[str, Any]]:
    """Normalised preference rows: chosen = the correct solution, rejected = the same solution with an
    arithmetic slip in its final result (guaranteed to end in a different ``#### N``). Deterministic in seed."""
    rng = random.Random(seed)
    rows = []
    for it in items:
        prompt = [{"role": "user", "content": it["question"]}]
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": it["answer"]}],
            "rejected": [{"role": "assistant", "content": _slip(it["answer"], rng)}],
        })
    return rows
