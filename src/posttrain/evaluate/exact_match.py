"""Generative exact match on verifiable rows: greedy-decode each prompt and compare its ``#### N`` answer.

Guarantees:
- Each prompt is rendered exactly as training renders it (``posttrain.data.tokenize.encode_prompt``: the chat
  template with the generation prompt, tokenized with ``add_special_tokens=False``, one BOS), then decoded
  greedily by ``posttrain.rollout.generate.generate``; nothing is sampled, so the score is deterministic for a
  given model, machine and torch build.
- A row is correct when ``answers_match(extract_final_answer(output), row["answer"])`` (see
  ``posttrain.rewards.verifiable`` for exactly what is matched). An output cut off by ``max_new_tokens`` is
  scored like any other (usually incorrect: its ``####`` line is missing).
- ``value = correct / n`` over all rows given; an empty ``rows`` raises instead of reporting a made-up score.
- ``answered`` counts the outputs with an answer the verifier can read (a ``#### N`` line), right or wrong, so a
  change in accuracy can be told apart from a change in answer form.
- Prompts are batched by length (less padding) but per-sample records are written, and returned, in input order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.tokenize import encode_prompt
from ..rewards.verifiable import answers_match, extract_final_answer
from ..rollout.generate import generate


@dataclass
class ExactMatchResult:
    """``value`` = ``correct`` / ``n``; ``answered``: outputs with a readable ``#### N`` answer; ``samples_path`` is
    where per-sample records were written (or None)."""

    value: float
    n: int
    correct: int
    answered: int
    samples_path: Path | None = None
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def ci95(self) -> tuple[float, float]:
        """Wilson 95% score interval for the accuracy (well-behaved at 0, 1 and small n)."""
        z = 1.959963984540054
        p, n = self.value, self.n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_exact_match(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], *, batch_size: int = 32,
                         max_new_tokens: int = 128, samples_path: str | Path | None = None,
                         progress: Callable[[int, int], None] | None = None) -> ExactMatchResult:
    """Greedy exact match of ``model`` on normalised verifiable rows (``{"prompt": messages, "answer": str}``).

    Writes one JSON line per row to ``samples_path`` when given: ``index``, ``prompt`` (the rendered prompt
    text the model saw), ``target``, ``output`` (decoded completion, special tokens removed), ``extracted``,
    ``correct``, ``finished`` (False when ``max_new_tokens`` cut the output). Calls ``progress(done, total)``
    after each batch.
    """
    if not rows:
        raise ValueError("no rows to evaluate")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    encoded = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    # Longest first: similar lengths share a batch (little padding), and a memory problem shows up at once.
    order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))
    records: list[dict[str, Any] | None] = [None] * len(rows)
    done = 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        gens = generate(model, tokenizer, [encoded[i] for i in batch], max_new_tokens=max_new_tokens)
        for i, gen in zip(batch, gens):
            extracted = extract_final_answer(gen.text)
            target = str(rows[i]["answer"])
            records[i] = {
                "index": i,
                "prompt": tokenizer.decode(encoded[i], skip_special_tokens=False),
                "target": target,
                "output": gen.text,
                "extracted": extracted,
                "correct": answers_match(extracted, target),
                "finished": gen.finished,
            }
        done += len(batch)
        if progress is not None:
            progress(done, len(rows))

    final = [r for r in records if r is not None]
    correct = sum(1 for r in final if r["correct"])
    answered = sum(1 for r in final if r["extracted"] is not None)
    path = None
    if samples_path is not None:
        path = Path(samples_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for r in final:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return ExactMatchResult(value=correct / len(final), n=len(final), correct=correct, answered=answered,
                            samples_path=path, records=final)
