"""Conversations: coercing raw field values into normalised message lists.

Guarantees:
- a normalised message is exactly ``{"role": "system"|"user"|"assistant", "content": str}``; other keys of the
  source message (``name``, ``weight``…) are not carried over;
- accepted inputs: a string (one message with the caller's default role), one message dict, or a list of message
  dicts; a message is ``{"role", "content"}`` (OpenAI style) or ``{"from", "value"}`` (ShareGPT style, where
  human -> user, gpt -> assistant); anything else is a `DataError` naming the exact sub-field, e.g.
  ``messages[2].role``;
- HH-RLHF transcripts (``"\\n\\nHuman: …\\n\\nAssistant: …"``) become user/assistant messages; each turn's text is
  stripped of the whitespace around it (the transcripts put a space after the colon and sometimes at the end);
- `split_shared_prefix` returns the longest common prefix of whole messages and the two remainders.
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.data.errors import RowRef, describe

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names; "user"/"assistant" also appear in the wild under "from".
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def to_messages(value: Any, ref: RowRef, field: str, default_role: str, *, allow_string: bool = True
                ) -> list[Message]:
    """Normalise one field holding a string, a message, or a list of messages."""
    if isinstance(value, str) and allow_string:
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [_to_message(value, ref, field)]
    if isinstance(value, list):
        if not value:
            raise ref.error(field, "a non-empty list of messages", describe(value))
        return [_to_message(m, ref, f"{field}[{i}]") for i, m in enumerate(value)]
    expected = "a string or a list of messages" if allow_string else "a list of messages"
    raise ref.error(field, expected, describe(value))


def _to_message(m: Any, ref: RowRef, field: str) -> Message:
    if not isinstance(m, dict):
        raise ref.error(field, "a message object with 'role' and 'content'", describe(m))
    if "role" in m:
        content_key, role = "content", m["role"]
        if role not in ROLES:
            raise ref.error(f"{field}.role", "one of 'system', 'user', 'assistant'", describe(role))
    elif "from" in m:
        content_key = "value"
        role = _SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
        if role is None:
            raise ref.error(f"{field}.from", "one of 'human', 'gpt', 'system'", describe(m["from"]))
    else:
        raise ref.error(field, "a message with 'role' and 'content' (or ShareGPT 'from' and 'value')", describe(m))
    if content_key not in m:
        raise ref.error(f"{field}.{content_key}", "a string", f"nothing (the message has keys {list(m)})")
    content = m[content_key]
    if not isinstance(content, str):
        # Multimodal content parts or nulls cannot be rendered by a text chat template; refuse them here.
        raise ref.error(f"{field}.{content_key}", "a string", describe(content))
    return {"role": role, "content": content}


def looks_like_transcript(text: str) -> bool:
    """True for an HH-RLHF style transcript: starts with a Human turn and has an Assistant turn."""
    return text.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in text


def parse_transcript(text: str) -> list[Message]:
    """Split an HH-RLHF transcript into messages. Call only when `looks_like_transcript(text)` holds.

    A turn marker is "Human:" or "Assistant:" after a blank line; the same word elsewhere (e.g. "Human:" inline
    inside an answer, which HH-RLHF has) stays part of the text."""
    body = "\n\n" + text.lstrip("\n")
    parts = _TRANSCRIPT_TURN.split(body)
    # parts = ["", role, content, role, content, ...]; the leading "" is guaranteed by the prepended "\n\n".
    return [{"role": _TRANSCRIPT_ROLES[role], "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def split_shared_prefix(a: list[Message], b: list[Message]) -> tuple[list[Message], list[Message], list[Message]]:
    """(longest common prefix of whole messages, rest of a, rest of b)."""
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return a[:n], a[n:], b[n:]


def roles(messages: list[Message]) -> str:
    """'user, assistant, …' for error messages about turn order."""
    return ", ".join(m["role"] for m in messages) if messages else "no turns"
