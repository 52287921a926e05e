"""Dataset kinds and the conversion of one raw record into its normalised row.

Normalised rows (plain, JSON-serialisable dicts; every message is ``{"role", "content"}``, see messages.py):

- preference: ``{"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}``
- verifiable: ``{"prompt": [msgs], "answer": str}``
- sft:        ``{"prompt": [msgs], "completion": [msgs]}``
- unpaired:   ``{"prompt": [msgs], "completion": [msgs], "label": bool}``  (KTO: desirable or not)

Guarantees and choices:
- a completion side (chosen, rejected, completion) holds assistant turns only and its last turn is not blank; a
  blank one is a `DataError` with ``drop_reason="empty_response"`` (validate decides whether to drop it); a
  pair whose chosen and rejected are identical raises with ``drop_reason="identical_pair"``;
- preference without a prompt field: chosen and rejected are taken as whole conversations (message lists, or
  HH-RLHF transcripts, which are parsed), the longest common prefix of whole turns becomes the prompt and each
  side keeps the rest, which must be assistant turns (ALGORITHMS.md pitfall 20 at the message level);
- every preference row has a prompt with text: a pair left without one (plain strings that are not transcripts,
  conversations that share no turn, a null prompt) is a `DataError` on field 'prompt', not an unconditioned pair
  (it would only fail later, when the chat template meets an empty conversation);
- with a prompt field, chosen/rejected may repeat the prompt turns first (as some hub sets do); those are removed;
- ShareGPT pairwise rows (``conversations`` + ``chosen``/``rejected`` single messages) use ``conversations`` as
  the prompt; for sft and unpaired, ``conversations`` is accepted wherever ``messages`` is;
- sft ``messages``: the last message must be an assistant turn and is the completion; every earlier message,
  earlier assistant turns included, is prompt (context, not trained on). sft ``text``: the prompt is empty and
  the text is one assistant message, so every row has the same shape; note that with a chat template such a row
  is trained as an assistant turn, not as raw continuation text;
- verifiable answers are reduced to the final answer: the number after the last ``####`` (cleaned exactly as
  the reward cleans model outputs: `posttrain.rewards.verifiable.extract_final_answer`), else the whole answer
  when it is a number (cleaned the same way), else the stripped answer text unchanged (e.g. "B", "Paris");
- an explicit prompt that is an empty string is an error (more likely a broken export than intent).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from posttrain.data.errors import RowRef, describe, describe_fields, missing
from posttrain.data.messages import (Message, looks_like_transcript, parse_transcript, roles, split_shared_prefix,
                                     to_messages)
from posttrain.rewards.verifiable import extract_final_answer, normalize_number


class DataKind(StrEnum):
    PREFERENCE = "preference"  # pairwise: prompt, chosen, rejected
    VERIFIABLE = "verifiable"  # prompts with checkable answers (online RL: GRPO)
    SFT = "sft"  # demonstrations
    UNPAIRED = "unpaired"  # binary feedback on single completions (KTO)


PROMPT_KEYS = ("prompt", "question")
ANSWER_KEYS = ("answer", "solution", "ground_truth")
CONVERSATION_KEYS = ("messages", "conversations")

# The field sets each kind accepts, as shown in error messages ("a|b" means either name).
ACCEPTED_FIELDS: dict[DataKind, tuple[str, ...]] = {
    DataKind.PREFERENCE: ("chosen+rejected", "prompt+chosen+rejected", "conversations+chosen+rejected"),
    DataKind.UNPAIRED: ("prompt+completion+label", "messages|conversations+label"),
    DataKind.VERIFIABLE: ("prompt|question+answer|solution|ground_truth",),
    DataKind.SFT: ("prompt+completion", "messages|conversations", "text"),
}


def present(record: dict, key: str) -> bool:
    # A null counts as absent: hub datasets give every row every column and fill the missing ones with None.
    return record.get(key) is not None


def first_present(record: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if present(record, k)), None)


def normalise(record: dict, kind: DataKind, ref: RowRef) -> dict[str, Any]:
    """The normalised row of `record` for `kind`; raises DataError (see module docstring)."""
    if not isinstance(record, dict):
        raise ref.error(None, "an object", describe(record))
    return _NORMALISERS[DataKind(kind)](record, ref)


# ---------------------------------------------------------------------------------------------------- pieces

def _require(record: dict, key: str, ref: RowRef, expected: str) -> Any:
    if not present(record, key):
        raise ref.error(key, expected, missing(record))
    return record[key]


def _prompt(value: Any, ref: RowRef, field: str) -> list[Message]:
    if isinstance(value, str) and not value.strip():
        raise ref.error(field, "a non-empty string", describe(value))
    return to_messages(value, ref, field, "user")


def _conversation(value: Any, ref: RowRef, field: str) -> list[Message]:
    # Without a prompt field a preference side is a whole conversation: a transcript or a message list.
    if isinstance(value, str) and looks_like_transcript(value):
        return parse_transcript(value)
    return to_messages(value, ref, field, "assistant")


def _check_response(turns: list[Message], ref: RowRef, field: str, whole: bool) -> None:
    """`turns` is what is trained on for `field`; `whole` says it is the field's entire value."""
    if not turns:
        raise ref.error(field, "an assistant turn after the shared prompt", "nothing (it ends where the prompt does)",
                        drop_reason="empty_response")
    if any(m["role"] != "assistant" for m in turns):
        raise ref.error(field, "assistant turns only after the prompt", f"turns: {roles(turns)}")
    last = turns[-1]["content"]
    if not last.strip():
        got = describe(last) if whole else f"{describe(last)} as the final assistant turn"
        raise ref.error(field, "a non-empty response", got, drop_reason="empty_response")


def _split_last_turn(value: Any, ref: RowRef, key: str) -> tuple[list[Message], list[Message]]:
    msgs = to_messages(value, ref, key, "user", allow_string=False)
    i = len(msgs) - 1
    sharegpt = isinstance(value, list) and isinstance(value[i], dict) and "role" not in value[i]
    role_field, content_field = (f"{key}[{i}].from", f"{key}[{i}].value") if sharegpt else \
        (f"{key}[{i}].role", f"{key}[{i}].content")
    if msgs[i]["role"] != "assistant":
        raise ref.error(role_field, "an assistant turn (the last message is the completion)",
                        describe(value[i].get("from") if sharegpt else msgs[i]["role"]))
    if not msgs[i]["content"].strip():
        raise ref.error(content_field, "a non-empty response", describe(msgs[i]["content"]),
                        drop_reason="empty_response")
    return msgs[:i], msgs[i:]


def _completion(value: Any, ref: RowRef) -> list[Message]:
    turns = to_messages(value, ref, "completion", "assistant")
    _check_response(turns, ref, "completion", whole=len(turns) == 1)
    return turns


# ---------------------------------------------------------------------------------------------------- kinds

def _preference(rec: dict, ref: RowRef) -> dict[str, Any]:
    prompt_key = first_present(rec, ("prompt", "conversations"))
    raw_c = _require(rec, "chosen", ref, "a string or a list of messages")
    raw_r = _require(rec, "rejected", ref, "a string or a list of messages")
    if prompt_key is None:
        prompt: list[Message] | None = None
        chosen, rejected = _conversation(raw_c, ref, "chosen"), _conversation(raw_r, ref, "rejected")
    else:
        prompt = _prompt(rec[prompt_key], ref, prompt_key)
        chosen = to_messages(raw_c, ref, "chosen", "assistant")
        rejected = to_messages(raw_r, ref, "rejected", "assistant")
    # Identity first: identical transcripts would otherwise look like two empty responses.
    if chosen == rejected:
        raise ref.error("rejected", "a response that differs from 'chosen'", "an identical one",
                        drop_reason="identical_pair")
    shared, chosen_rest, rejected_rest = split_shared_prefix(chosen, rejected)
    if prompt is None:
        prompt = shared
        if not _has_text(prompt):
            raise ref.error("prompt", PROMPT_EXPECTED, _no_prompt(rec, shared))
    elif not _has_text(prompt):
        raise ref.error(prompt_key, "a non-empty prompt", f"turns without text ({roles(prompt)})")
    elif shared and shared != prompt:
        raise ref.error("chosen", f"responses that follow {prompt_key!r}, or repeat it whole before the response",
                        f"both start with other shared turns ({roles(shared)})")
    _check_response(chosen_rest, ref, "chosen", whole=len(chosen) == 1)
    _check_response(rejected_rest, ref, "rejected", whole=len(rejected) == 1)
    return {"prompt": prompt, "chosen": chosen_rest, "rejected": rejected_rest}


PROMPT_EXPECTED = ("a non-empty prompt, or 'chosen' and 'rejected' conversations that begin with the same non-empty "
                   "prompt turn (as HH-RLHF transcripts do)")


def _has_text(messages: list[Message]) -> bool:
    return any(m["content"].strip() for m in messages)


def _no_prompt(rec: dict, shared: list[Message]) -> str:
    given = "null" if "prompt" in rec else f"no 'prompt' field (the row has {describe_fields(rec)})"
    if not shared:
        return f"{given}, and 'chosen' and 'rejected' share no prompt turn"
    return f"{given}, and the turns 'chosen' and 'rejected' share have no text ({roles(shared)})"


def _verifiable(rec: dict, ref: RowRef) -> dict[str, Any]:
    prompt_key = first_present(rec, PROMPT_KEYS)
    if prompt_key is None:
        raise ref.error("prompt", "a string or a list of messages (in 'prompt' or 'question')", missing(rec))
    answer_key = first_present(rec, ANSWER_KEYS)
    if answer_key is None:
        raise ref.error("answer", "an answer (in 'answer', 'solution' or 'ground_truth')", missing(rec))
    return {"prompt": _prompt(rec[prompt_key], ref, prompt_key),
            "answer": _final_answer(rec[answer_key], ref, answer_key)}


def _final_answer(value: Any, ref: RowRef, field: str) -> str:
    if isinstance(value, bool):
        raise ref.error(field, "a string or a number", describe(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ref.error(field, "a finite number", describe(value))
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise ref.error(field, "a string or a number", describe(value))
    text = value.strip()
    if not text:
        raise ref.error(field, "a non-empty answer", describe(value))
    if "####" in text:
        number = extract_final_answer(text)
        if number is None:
            after = text.rsplit("####", 1)[1].split("\n", 1)[0]
            raise ref.error(field, "a single number after the last '####'", describe(after))
        return number
    return normalize_number(text) or text


def _sft(rec: dict, ref: RowRef) -> dict[str, Any]:
    key = first_present(rec, CONVERSATION_KEYS)
    if key is not None:
        prompt, completion = _split_last_turn(rec[key], ref, key)
    elif present(rec, "prompt") or present(rec, "completion"):
        prompt = _prompt(_require(rec, "prompt", ref, "a string or a list of messages"), ref, "prompt")
        completion = _completion(_require(rec, "completion", ref, "a string or a list of messages"), ref)
    elif present(rec, "text"):
        text = rec["text"]
        if not isinstance(text, str):
            raise ref.error("text", "a string", describe(text))
        prompt, completion = [], [{"role": "assistant", "content": text}]
        _check_response(completion, ref, "text", whole=True)
    else:
        raise ref.error(None, "the fields of an sft row: " + " or ".join(ACCEPTED_FIELDS[DataKind.SFT]),
                        missing(rec))
    return {"prompt": prompt, "completion": completion}


def _unpaired(rec: dict, ref: RowRef) -> dict[str, Any]:
    label = _require(rec, "label", ref, "true or false (is the completion desirable?)")
    if not isinstance(label, bool):
        # 0/1 or "true"/"false" are refused rather than guessed: a flipped label silently inverts KTO.
        raise ref.error("label", "true or false (a JSON boolean)", describe(label))
    key = first_present(rec, CONVERSATION_KEYS)
    if key is not None:
        prompt, completion = _split_last_turn(rec[key], ref, key)
    else:
        prompt = _prompt(_require(rec, "prompt", ref, "a string or a list of messages"), ref, "prompt")
        completion = _completion(_require(rec, "completion", ref, "a string or a list of messages"), ref)
    return {"prompt": prompt, "completion": completion, "label": label}


_NORMALISERS = {
    DataKind.PREFERENCE: _preference,
    DataKind.VERIFIABLE: _verifiable,
    DataKind.SFT: _sft,
    DataKind.UNPAIRED: _unpaired,
}
