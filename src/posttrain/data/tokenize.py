"""Tokenization of prompt/completion pairs with a stable boundary, through the model's chat template.

Guarantees (ALGORITHMS.md pitfalls 4, 5, 6, 10, 14):
- the template is rendered to text once; the prompt (with the generation prompt) and the completion are tokenized
  *separately* and concatenated, so the prompt's ids are identical across chosen and rejected and the completion's
  ids decode back to the completion text: no token is ever merged across the boundary;
- a template that is not prefix-preserving (the rendered prompt is not a prefix of the rendered conversation)
  raises instead of silently mis-masking;
- exactly one BOS at position 0 when the tokenizer uses one; the completion ends with exactly one end-of-turn
  (the template's, or the tokenizer's EOS for plain text);
- truncation is per row: the prompt may be left-truncated to `max_prompt_length` (BOS kept), the completion gets
  the budget `max_length - len(prompt)`; a row left with no completion token returns None (the caller drops and
  counts it, it never reaches a loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class EncodedCompletion:
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_text(messages: Messages) -> str:
    # Without a chat template, a conversation is its contents joined by blank lines (base-model style).
    return "\n\n".join(m["content"] for m in messages)


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _with_single_bos(tokenizer: Any, ids: list[int], wants_bos: bool) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if wants_bos and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def render_prompt(tokenizer: Any, prompt: Messages) -> str:
    """The prompt as text the model continues from (chat template with the generation prompt, or plain)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    text = _plain_text(prompt)
    return text + "\n\n" if text else text


def encode_prompt(tokenizer: Any, prompt: Messages) -> list[int]:
    """Token ids of the rendered prompt, with exactly one BOS when the model uses one."""
    text = render_prompt(tokenizer, prompt)
    starts_with_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return _with_single_bos(tokenizer, _encode_text(tokenizer, text), starts_with_bos or _tokenizer_adds_bos(tokenizer))


def completion_text(tokenizer: Any, prompt: Messages, completion: Messages) -> str:
    """The text the model must produce after the rendered prompt, end-of-turn included."""
    if has_chat_template(tokenizer):
        prompt_text = render_prompt(tokenizer, prompt)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template is not prefix-preserving: the rendered prompt is not a prefix of "
                             "the rendered prompt+completion, so the completion boundary cannot be found "
                             f"(prompt ends {prompt_text[-40:]!r}, conversation has {full[len(prompt_text) - 40:len(prompt_text) + 10]!r})")
        return full[len(prompt_text):]
    text = _plain_text(completion)
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos


def encode_completion(tokenizer: Any, prompt: Messages, completion: Messages, *, max_length: int | None = None,
                      max_prompt_length: int | None = None,
                      prompt_ids: list[int] | None = None) -> EncodedCompletion | None:
    """Encode one prompt/completion pair; None when truncation leaves no completion token."""
    p_ids = list(prompt_ids) if prompt_ids is not None else encode_prompt(tokenizer, prompt)
    c_ids = _encode_text(tokenizer, completion_text(tokenizer, prompt, completion))
    eos = tokenizer.eos_token_id
    if not has_chat_template(tokenizer) and eos is not None and (not c_ids or c_ids[-1] != eos):
        c_ids.append(eos)
    truncated = False
    if max_prompt_length is not None and len(p_ids) > max_prompt_length:
        bos = tokenizer.bos_token_id
        keep_bos = bos is not None and p_ids and p_ids[0] == bos
        tail = p_ids[-(max_prompt_length - int(keep_bos)):] if max_prompt_length > int(keep_bos) else []
        p_ids = ([bos] if keep_bos else []) + tail
        truncated = True
    if max_length is not None:
        budget = max(0, max_length - len(p_ids))
        if len(c_ids) > budget:
            c_ids = c_ids[:budget]
            truncated = True
    if not c_ids:
        return None
    return EncodedCompletion(p_ids, c_ids, truncated)


@dataclass(frozen=True)
class EncodedConversation:
    """A whole conversation's ids with a mask that is 1 on assistant-turn tokens (end-of-turn included)."""

    input_ids: list[int]
    assistant_mask: list[int]


def encode_conversation(tokenizer: Any, messages: Messages, *, max_length: int | None = None) -> EncodedConversation | None:
    """Encode every turn of a conversation, marking each assistant turn for supervision (assistant-turns-only SFT).

    The template is rendered once per turn boundary and each new segment tokenized on its own, so every assistant
    turn's ids decode back to that turn (end-of-turn included) and nothing merges across a boundary. Truncation keeps
    the start (`max_length`); None when no assistant token survives it.
    """
    if not has_chat_template(tokenizer):
        raise ValueError("assistant-turns-only loss needs a chat template; use the completion-only loss instead")
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            if not prefix.startswith(rendered):
                raise ValueError("the chat template is not prefix-preserving across turns")
            _append(tokenizer, prefix[len(rendered):], 0, ids, mask, first=not rendered)
            rendered = prefix
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not full.startswith(rendered):
            raise ValueError("the chat template is not prefix-preserving across turns "
                             f"(turn {i + 1}, role {message['role']!r})")
        _append(tokenizer, full[len(rendered):], int(message["role"] == "assistant"), ids, mask,
                first=not rendered)
        rendered = full
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        return None
    return EncodedConversation(ids, mask)


def _append(tokenizer: Any, text: str, flag: int, ids: list[int], mask: list[int], first: bool) -> None:
    if not text:
        return
    seg = _encode_text(tokenizer, text)
    if first:
        starts_with_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
        seg = _with_single_bos(tokenizer, seg, starts_with_bos or _tokenizer_adds_bos(tokenizer))
    ids.extend(seg)
    mask.extend([flag] * len(seg))
