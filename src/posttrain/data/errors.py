"""The one error type of the data layer.

Guarantees:
- every data problem is a `DataError` (a `ValueError`) that names the file, the 1-based row (None when the
  problem is with the file as a whole), the field (None when no single field is at fault), what was expected and
  what was found, and reads as one line:
  ``data/train.jsonl: row 17, field 'chosen': expected a non-empty string, got '' (empty)``;
- `got` is always short (values are described by `describe`, which truncates), so a 10 MB field never floods a
  terminal or an event log;
- a `DataError` may carry a `drop_reason` ("identical_pair", "empty_response"): the row is unusable rather than
  malformed, and `validate` decides by policy whether to drop and count it or to raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MAX_GOT = 80


def _short(text: str, limit: int = _MAX_GOT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(value: Any) -> str:
    """A short, human description of a value as found in the data (JSON vocabulary: null, a number, an object)."""
    if isinstance(value, str):
        if value == "":
            return "'' (empty)"
        if not value.strip():
            return f"{value!r} (blank)"
        shown = repr(value)
        # Truncate inside the quotes and say how long the real string was, so the reader knows it was cut.
        return shown if len(shown) <= _MAX_GOT else f"{shown[:_MAX_GOT - 2]}…' ({len(value)} chars)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{_short(repr(value), 40)} (a number)"
    if isinstance(value, list):
        return f"{_short(repr(value), 60)} (a list of {len(value)})"
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:6]) + (", …" if len(value) > 6 else "")
        return f"an object with fields {keys}" if value else "an empty object"
    return _short(f"{value!r} (a {type(value).__name__})")


def describe_fields(record: dict) -> str:
    """'fields 'a', 'b'' for error messages about which fields a row has."""
    if not record:
        return "no fields"
    return "fields " + ", ".join(repr(k) for k in record)


def missing(record: dict) -> str:
    """The `got` text for a field that is absent (or null, which datasets use for an absent column value)."""
    return f"nothing (the row has {describe_fields(record)})"


class DataError(ValueError):
    """A problem in the data, located to file, row and field."""

    def __init__(self, file: str, row: int | None, field: str | None, expected: str, got: str,
                 *, drop_reason: str | None = None) -> None:
        self.file = file
        self.row = row
        self.field = field
        self.expected = expected
        self.got = _short(got, 2 * _MAX_GOT)  # second line of defence: callers already pass short descriptions
        self.drop_reason = drop_reason
        super().__init__(self._message())

    def _message(self) -> str:
        where = [f"row {self.row}"] if self.row is not None else []
        if self.field is not None:
            where.append(f"field {self.field!r}")
        located = f"{self.file}: {', '.join(where)}: " if where else f"{self.file}: "
        return f"{located}expected {self.expected}, got {self.got}"


@dataclass(frozen=True)
class RowRef:
    """Where a row came from; builds DataErrors so that normalisers need not repeat file and row everywhere."""

    file: str
    row: int  # 1-based

    def error(self, field: str | None, expected: str, got: str, *, drop_reason: str | None = None) -> DataError:
        return DataError(self.file, self.row, field, expected, got, drop_reason=drop_reason)
