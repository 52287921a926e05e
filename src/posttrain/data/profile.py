"""Profile normalised rows: counts, duplicates, lengths, label balance, answer shape.

Guarantees:
- every number is computed from the rows given; a statistic over no rows is None, never a made-up 0;
- duplicates = rows minus distinct rows, where a row's identity is `row_hash` (SHA-256 of its canonical JSON);
- lengths are per text field (prompt, chosen, rejected, completion, answer): a field's text is its message
  contents joined by "\\n", without the chat template (whose overhead depends on the model, and is tokenize.py's
  business). Characters always; tokens when a tokenizer is given, counted as
  ``len(tokenizer(text, add_special_tokens=False)["input_ids"])``;
- unpaired: label counts and the fraction of true labels; verifiable: count and fraction of numeric answers
  (the same number syntax the reward uses, `posttrain.rewards.verifiable.normalize_number`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

from posttrain.data.schema import DataKind
from posttrain.rewards.verifiable import normalize_number

_TEXT_FIELDS = {
    DataKind.PREFERENCE: ("prompt", "chosen", "rejected"),
    DataKind.VERIFIABLE: ("prompt", "answer"),
    DataKind.SFT: ("prompt", "completion"),
    DataKind.UNPAIRED: ("prompt", "completion"),
}


def row_hash(row: dict[str, Any]) -> str:
    """A stable identity of a normalised row: independent of key order, process and Python version."""
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def field_text(value: Any) -> str:
    """The text of one field: a message list's contents joined by newlines, or the string itself."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] for m in value)


def _stats(values: list[int]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return count


def profile(rows: list[dict[str, Any]], kind: DataKind | str, tokenizer: Any = None) -> dict[str, Any]:
    """Statistics of `rows` (normalised, as returned by `validate`) of `kind`."""
    kind = DataKind(kind)
    n = len(rows)
    out: dict[str, Any] = {"kind": kind.value, "rows": n, "duplicates": n - len({row_hash(r) for r in rows})}
    fields = _TEXT_FIELDS[kind]
    texts = {f: [field_text(r[f]) for r in rows] for f in fields}
    out["chars"] = {f: _stats([len(t) for t in texts[f]]) for f in fields}
    if tokenizer is not None:
        count = _token_counter(tokenizer)
        out["tokens"] = {f: _stats([count(t) for t in texts[f]]) for f in fields}
    if kind is DataKind.UNPAIRED:
        true = sum(1 for r in rows if r["label"] is True)
        out["labels"] = {"true": true, "false": n - true, "true_fraction": true / n if n else None}
    if kind is DataKind.VERIFIABLE:
        numeric = sum(1 for r in rows if normalize_number(r["answer"]) is not None)
        out["numeric_answers"] = numeric
        out["numeric_answer_fraction"] = numeric / n if n else None
    return out
