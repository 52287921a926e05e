"""Detect a dataset's kind from the fields its rows carry.

Guarantees:
- the kind comes from the first row; up to `SAMPLE` rows spread evenly over the whole dataset (first and last
  included) must not show another kind, so a file that mixes kinds is refused here, naming the first sampled row
  that disagrees (a row with the fields of no kind is left to `validate`, which names the missing field);
- a first row with the fields of no kind is a `DataError` for row 1 that lists every accepted field set;
- fields decide, in this order: chosen+rejected -> preference; a label -> unpaired; an answer field with a
  prompt/question -> verifiable; prompt+completion, messages or text -> sft. The order matters only for rows
  that carry extra fields (a preference row with a "label" column is still a preference row).
- detection looks at field names only; `validate` checks every row's values.
"""

from __future__ import annotations

from posttrain.data.errors import DataError, describe_fields
from posttrain.data.schema import (ACCEPTED_FIELDS, ANSWER_KEYS, CONVERSATION_KEYS, PROMPT_KEYS, DataKind,
                                   first_present, present)

SAMPLE = 64  # rows checked for agreement; cheap (field names only) and enough to catch concatenated files


def kind_of(record: object) -> DataKind | None:
    """The kind a single record's fields indicate, or None."""
    if not isinstance(record, dict):
        return None
    if present(record, "chosen") and present(record, "rejected"):
        return DataKind.PREFERENCE
    has_conversation = first_present(record, CONVERSATION_KEYS) is not None
    prompt_completion = present(record, "prompt") and present(record, "completion")
    if present(record, "label") and (has_conversation or prompt_completion):
        return DataKind.UNPAIRED
    if first_present(record, PROMPT_KEYS) and first_present(record, ANSWER_KEYS):
        return DataKind.VERIFIABLE
    if has_conversation or prompt_completion or present(record, "text"):
        return DataKind.SFT
    return None


def accepted_field_sets() -> str:
    return "; ".join(f"{kind.value}: {', '.join(sets)}" for kind, sets in ACCEPTED_FIELDS.items())


def a_kind(kind: DataKind) -> str:
    """The kind's name with its indefinite article, as said aloud: "a preference", "an sft", "an unpaired"."""
    # "sft" is spelled out letter by letter (ess-eff-tee), so it takes "an" although it starts with a consonant.
    return f"{'an' if kind.value[0] in 'aeiou' or kind is DataKind.SFT else 'a'} {kind.value}"


def _fields(record: object) -> str:
    if isinstance(record, dict):
        return describe_fields(record)
    name = type(record).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}, not an object"


def detect_kind(records: list[dict], source: str) -> DataKind:
    """The kind of `records` (loaded from `source`, named in errors)."""
    if not records:
        raise DataError(source, None, None, "at least one row", "no rows")
    kind = kind_of(records[0])
    if kind is None:
        raise DataError(source, 1, None, f"the fields of a known kind ({accepted_field_sets()})",
                        _fields(records[0]))
    n = len(records)
    step = max(1, (n - 1) / (SAMPLE - 1)) if n > 1 else 1
    sample = sorted({min(n - 1, round(i * step)) for i in range(min(n, SAMPLE))} | {n - 1})
    for i in sample:
        other = kind_of(records[i])
        # A row with the fields of no kind is left to `validate`, which names the exact missing field; a row of
        # another kind is a mixed file, which only this look across rows can tell.
        if other is not None and other is not kind:
            raise DataError(source, i + 1, None, f"the fields of {a_kind(kind)} row, like row 1",
                            f"{_fields(records[i])} ({a_kind(other)} row)")
    return kind
