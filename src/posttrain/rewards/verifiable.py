"""Verifiable rewards: extract the ``#### N`` final answer of a GSM8K-style solution and compare it.

What is matched, exactly:

1. ``extract_final_answer`` looks only at the text after the LAST ``####`` in the completion, up to the end of
   that line. From it, every ``$``, ``,`` and whitespace character is removed, then one trailing ``.``. What is
   left must be a whole number (``-3``, ``+4``, ``12``, ``1.5``, ``.5``); otherwise the result is ``None``. So
   ``"#### $1,234."`` gives ``"1234"`` and ``"#### 12 apples"`` gives ``None`` (we do not guess which number
   was meant). A leading ``+`` is dropped.
2. ``answers_match`` compares two answers as decimal numbers when both parse (so ``"12.0" == "12"`` and
   ``"-0" == "0"``), after the same cleaning; when either does not parse as a number it falls back to an exact
   comparison of the stripped strings. ``None`` never matches.
3. ``hash_answer_reward`` is 1.0 when the extracted answer of a completion matches its gold answer, else 0.0.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_MARKER = "####"
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_DROP = re.compile(r"[\s$,]")


def normalize_number(text: str) -> str | None:
    """Clean one answer string as described in the module docstring; ``None`` if it is not a number."""
    cleaned = _DROP.sub("", text)
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    if not _NUMBER.fullmatch(cleaned):
        return None
    return cleaned[1:] if cleaned.startswith("+") else cleaned


def extract_final_answer(text: str) -> str | None:
    """The normalised number after the last ``####`` (on the same line), or ``None`` when there is no marker
    or what follows it is not a single number."""
    if _MARKER not in text:
        return None
    tail = text.rsplit(_MARKER, 1)[1]
    line = tail.split("\n", 1)[0]
    return normalize_number(line)


def _as_decimal(text: str) -> Decimal | None:
    number = normalize_number(text)
    if number is None:
        return None
    try:
        return Decimal(number)
    except InvalidOperation:  # pragma: no cover - the regex only admits valid decimals
        return None


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True when ``pred`` equals ``gold`` numerically (``12.0 == 12``), or, when either is not a number, when
    their stripped strings are identical. ``None`` on either side is never a match."""
    if pred is None or gold is None:
        return False
    p, g = _as_decimal(pred), _as_decimal(gold)
    if p is not None and g is not None:
        return p == g
    return pred.strip() == gold.strip()


def hash_answer_reward(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 for each completion whose ``#### N`` answer matches its gold answer, else 0.0 (same order).

    Raises ``ValueError`` when the two lists differ in length (a silent zip would misalign rewards)."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return [1.0 if answers_match(extract_final_answer(c), a) else 0.0 for c, a in zip(completions, answers)]
