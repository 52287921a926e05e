"""The bus envelope: one immutable, versioned, CloudEvents-shaped record per message.

Guarantees:
- every envelope has a unique `id`, a dotted versioned `type` (``task.assigned.v1``), a `source` agent, a `topic`,
  and the `run_id`, `correlation_id` (the logical flow) and `causation_id` (the event that caused it);
- `data` is a JSON object validated against the payload model registered for `type` (see `events.py`); unknown
  types are refused, so nothing untyped reaches the log;
- big things never ride the bus: `dataref` carries a path instead.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

SPEC_VERSION = "1.0"
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+\.v[0-9]+$")


def new_id() -> str:
    return uuid.uuid4().hex


class Envelope(BaseModel):
    """An event as it is logged and delivered. Frozen: handlers can never mutate what was logged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: str = SPEC_VERSION
    id: str = Field(default_factory=new_id)
    type: str
    source: str
    target: str | None = None
    topic: str
    subject: str | None = None
    time: float = Field(default_factory=time.time)
    run_id: str
    correlation_id: str | None = None
    causation_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    dataref: str | None = None

    @field_validator("type")
    @classmethod
    def _dotted_and_versioned(cls, value: str) -> str:
        if not _TYPE_RE.match(value):
            raise ValueError(f"event type {value!r} must be dotted and versioned, like 'task.assigned.v1'")
        return value

    def reply(self, type: str, source: str, data: dict[str, Any], topic: str | None = None,
              dataref: str | None = None) -> "Envelope":
        """An envelope answering this one: same correlation, caused by this event, addressed to its sender."""
        return Envelope(type=type, source=source, target=self.source, topic=topic or self.topic,
                        subject=self.subject, run_id=self.run_id,
                        correlation_id=self.correlation_id or self.id, causation_id=self.id,
                        data=data, dataref=dataref)
