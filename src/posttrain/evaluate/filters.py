"""Answer filters and exact match the way lm-eval scores generative tasks (EVALUATION.md §1, §4), as pure functions.

Guarantees:
- `regex_extract(text, pattern, group_select)` behaves like lm-eval's `regex` filter: all non-overlapping matches
  are found (`re.findall`), the one at `group_select` is taken (0 = first, -1 = last); when the pattern has several
  groups the first non-empty group of that match is used; the result is stripped. No match (or only empty groups, or
  a `group_select` out of range) gives `fallback`, "[invalid]" by default.
- `exact_match(prediction, reference, ...)` behaves like HF-evaluate's `exact_match` as lm-eval configures it: every
  regex in `ignore` is removed (`re.sub(r, "", s)`, in order) from BOTH strings, then, with `ignore_case`, both are
  lower-cased; the result is plain string equality. Nothing else is normalised (no whitespace stripping).
- The GSM8K constants are lm-eval's `gsm8k` task values: strict = `#### (\\-?[0-9\\.\\,]+)`, first match;
  flexible = `(-?[$0-9.,]{2,})|(-?[0-9]+)`, last match; ignore `[",", "\\$", "(?s).*#### ", "\\.$"]`, ignore_case.
  So "1,000." and "#### 1000" match, and a reference "...#### 18" is compared as "18".
"""

from __future__ import annotations

import re
from typing import Sequence

INVALID = "[invalid]"

GSM8K_STRICT_REGEX = r"#### (\-?[0-9\.\,]+)"
GSM8K_FLEXIBLE_REGEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_IGNORE_REGEXES: tuple[str, ...] = (",", r"\$", r"(?s).*#### ", r"\.$")


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = INVALID) -> str:
    """The `group_select`-th match of `pattern` in `text` (see the module docstring), or `fallback`."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    try:
        match = matches[group_select]
    except IndexError:
        return fallback
    if isinstance(match, tuple):  # several groups: the alternative that matched is the non-empty one
        match = next((m for m in match if m), fallback)
    return match.strip()


def normalize_for_match(text: str, ignore: Sequence[str] = (), ignore_case: bool = False) -> str:
    """`text` with every `ignore` regex removed (in order), then lower-cased when `ignore_case`."""
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    return text.lower() if ignore_case else text


def exact_match(prediction: str, reference: str, ignore: Sequence[str] = (), ignore_case: bool = False) -> bool:
    """True when the normalised prediction equals the normalised reference (see `normalize_for_match`)."""
    return (normalize_for_match(prediction, ignore, ignore_case)
            == normalize_for_match(reference, ignore, ignore_case))


def gsm8k_strict(output: str) -> str:
    """The number after the first "#### " in `output` (raw, e.g. "1,000."), or "[invalid]"."""
    return regex_extract(output, GSM8K_STRICT_REGEX, 0)


def gsm8k_flexible(output: str) -> str:
    """The last number-like string in `output` (raw, e.g. "$5" or "12.5."), or "[invalid]"."""
    return regex_extract(output, GSM8K_FLEXIBLE_REGEX, -1)


def gsm8k_match(extracted: str, reference: str) -> bool:
    """lm-eval's GSM8K `exact_match` of an extracted answer against the full reference answer."""
    return exact_match(extracted, reference, GSM8K_IGNORE_REGEXES, ignore_case=True)
