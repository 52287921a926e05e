"""Validate every row of a dataset and normalise it (schema.py), all or nothing.

Guarantees:
- every row is checked; the first malformed row (missing field, wrong type, bad role, non-string content, label
  that is not a boolean, a preference pair without a prompt…) raises a `DataError` naming file, 1-based row and field; no partial result is returned;
- two kinds of rows are unusable rather than malformed and are handled by policy, never silently:
  - identical chosen and rejected ("identical_pair"): always dropped and counted (such a pair has loss ln 2 and
    zero gradient, ALGORITHMS.md pitfall 13);
  - an empty response ("empty_response": chosen, rejected or completion empty or blank): raises by default; with
    ``drop_empty=True`` dropped and counted. Real sets have them (UltraFeedback's `train_clean.jsonl` rows 479
    and 834, four HH-RLHF helpful-base test transcripts end in an empty assistant turn), and an empty completion
    must never reach a loss (pitfalls 14, 15), so the caller chooses, knowingly, between stopping and dropping;
- the row numbers of dropped rows are kept per reason, so a report can point at them;
- a dataset left with no usable row is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.data.errors import DataError, RowRef
from posttrain.data.schema import DataKind, normalise

IDENTICAL_PAIR = "identical_pair"
EMPTY_RESPONSE = "empty_response"


@dataclass(frozen=True)
class ValidationResult:
    kind: DataKind
    rows: list[dict[str, Any]]  # normalised, in source order
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)  # reason -> 1-based row numbers

    @property
    def total(self) -> int:
        """Rows read: kept plus dropped."""
        return len(self.rows) + sum(self.dropped.values())


def validate(records: list[dict], kind: DataKind | str, source: str, *, drop_empty: bool = False
             ) -> ValidationResult:
    """Normalise every record of `source` as `kind`; see the module docstring for what raises and what drops."""
    kind = _as_kind(kind, source)
    rows: list[dict[str, Any]] = []
    dropped_rows: dict[str, list[int]] = {}
    for i, record in enumerate(records, start=1):
        try:
            rows.append(normalise(record, kind, RowRef(source, i)))
        except DataError as e:
            if e.drop_reason == IDENTICAL_PAIR or (e.drop_reason == EMPTY_RESPONSE and drop_empty):
                dropped_rows.setdefault(e.drop_reason, []).append(i)
                continue
            if e.drop_reason == EMPTY_RESPONSE:
                raise DataError(e.file, e.row, e.field, e.expected,
                                f"{e.got} (set data_options.drop_empty: true, or pass drop_empty=True, to drop and count such rows instead)",
                                drop_reason=e.drop_reason) from None
            raise
    dropped = {reason: len(at) for reason, at in dropped_rows.items()}
    if not rows:
        detail = ", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "the dataset is empty"
        raise DataError(source, None, None, "at least one usable row", f"none of {len(records)} ({detail})")
    return ValidationResult(kind, rows, dropped, dropped_rows)


def _as_kind(kind: DataKind | str, source: str) -> DataKind:
    try:
        return DataKind(kind)
    except ValueError:
        raise DataError(source, None, None, "a kind among " + ", ".join(k.value for k in DataKind),
                        repr(kind)) from None
