"""posttrain.data: load a dataset, detect its kind, validate and normalise every row, profile it.

`prepare` is the one call most users need:

    data = prepare("../shared/datasets/gsm8k/test.jsonl")
    data.kind, len(data.rows), data.dropped, data.profile

Guarantees: the steps run in order and all-or-nothing: a `DataError` (file, row, field, expected, got) stops
them, and no rows are returned half-validated. Tokenization (tokenize.py) and collation (collate.py) come after
and are imported from their own modules, so this package imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.data.errors import DataError
from posttrain.data.kinds import detect_kind
from posttrain.data.loading import LoadedData, load_records
from posttrain.data.profile import profile, row_hash
from posttrain.data.schema import DataKind
from posttrain.data.validate import ValidationResult, validate

__all__ = ["DataError", "DataKind", "LoadedData", "PreparedData", "ValidationResult", "detect_kind",
           "load_records", "prepare", "profile", "row_hash", "validate"]


@dataclass(frozen=True)
class PreparedData:
    kind: DataKind
    rows: list[dict[str, Any]]  # normalised (schema.py)
    dropped: dict[str, int]  # reason -> count (validate.py)
    profile: dict[str, Any]  # profile.py
    source: str  # the path or hub id the rows came from
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)  # reason -> 1-based row numbers


def prepare(source: str, kind: DataKind | str | None = None, split: str | None = None, limit: int | None = None,
            tokenizer: Any = None, *, drop_empty: bool = False) -> PreparedData:
    """Load `source`, detect its kind (unless `kind` is given), validate every row, profile the result.

    `drop_empty`: drop and count rows with an empty response instead of raising (see validate.py)."""
    loaded = load_records(source, split=split, limit=limit)
    detected = detect_kind(loaded.records, loaded.source) if kind is None else kind
    result = validate(loaded.records, detected, loaded.source, drop_empty=drop_empty)
    return PreparedData(kind=result.kind, rows=result.rows, dropped=result.dropped,
                        profile=profile(result.rows, result.kind, tokenizer), source=loaded.source,
                        dropped_rows=result.dropped_rows)
