"""An Ollama Modelfile for an exported GGUF: ``FROM``, a Go ``TEMPLATE`` equivalent to the HF chat template, and
``PARAMETER stop`` lines.

How the template is converted: instead of translating Jinja source, the HF template is *rendered* on probe
conversations (user / assistant / system turns with marker contents) and the text around the markers gives the
pieces of a role-wrapped chat format: a head (with and without a leading system turn), a prefix and suffix per
role, and the generation prompt. Those pieces are re-assembled for every probe conversation and must reproduce
the HF rendering exactly; only then are they written as a Go template over ``.Messages``. This covers the common
shapes (ChatML, Llama-3, Zephyr-style role markers, posttrain's own template, Mistral/Llama-2 ``[INST]`` without a
system turn). Guarantees of :func:`write_modelfile`:
- the Modelfile is ``<gguf stem>.Modelfile`` next to the GGUF and starts with ``FROM ./<gguf file name>``;
- a converted TEMPLATE renders, for every probe conversation, the same text as ``apply_chat_template`` (a
  conversation ending with a user turn gets the generation prompt; one ending with an assistant turn is left open
  so the model continues it, as Ollama's own templates do). A BOS that llama.cpp adds by itself
  (``add_bos_token``) is not repeated in the template;
- when the pieces do not reproduce the HF rendering (templates that merge the system prompt into the first user
  turn, trim or rewrite contents, etc.), the file says so in a comment and uses ``GENERIC_TEMPLATE`` ("role: text"
  lines, which the model was not trained on); with no chat template at all, likewise;
- ``PARAMETER stop`` lists the eos token and the special tokens that end an assistant turn or open a user turn.
A system message is expected first, as chat templates expect it; the template renders no system header for one
elsewhere.
Not verified here: running ``ollama create`` (no Ollama binary on these machines).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from posttrain.compress.gguf_vocab import special_flags

GENERIC_TEMPLATE = "{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant: "
_MARK = "MSGq{}x"  # marker contents: plain ASCII so no template filter changes them


@dataclass
class ChatPieces:
    """A role-wrapped chat format: head + per message (prefix + content + suffix) + generation prompt."""

    head: str                # before the first message when it is not a system message
    system_head: str | None  # before the content of a leading system message (None: no system support)
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation: str

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool, close_last: bool) -> str:
        """The text the Go template produces (``close_last`` also closes a final assistant turn, as HF does)."""
        out = [self.system_head if messages[0]["role"] == "system" else self.head]
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "system":
                out += [m["content"], self.system_suffix]
            elif m["role"] == "user":
                out += [self.user_prefix, m["content"], self.user_suffix]
                out += [self.generation] if last and add_generation_prompt else []
            else:
                out += [self.assistant_prefix, m["content"]]
                out += [self.assistant_suffix] if close_last or not last else []
        return "".join(out)


def _msgs(roles: str) -> list[dict[str, str]]:
    names = {"s": "system", "u": "user", "a": "assistant"}
    return [{"role": names[r], "content": _MARK.format(i)} for i, r in enumerate(roles)]


def _render(tokenizer: Any, roles: str, gen: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(_msgs(roles), tokenize=False, add_generation_prompt=gen)
    except Exception:  # templates raise on shapes they refuse (e.g. no system turn); that shape is unsupported
        return None


def _between(text: str, i: int) -> tuple[str, str]:
    """(text before marker i, text between marker i and marker i+1 or the end)."""
    start = text.index(_MARK.format(i))
    end_i = start + len(_MARK.format(i))
    nxt = text.find(_MARK.format(i + 1))
    return text[:start], text[end_i:] if nxt < 0 else text[end_i:nxt]


def _strip_suffix(text: str, suffix: str) -> str | None:
    return text[: len(text) - len(suffix)] if text.endswith(suffix) else None


def infer_pieces(tokenizer: Any) -> ChatPieces | None:
    """The pieces of the tokenizer's chat template, verified on probe conversations; None when it is not
    role-wrapped in a way the pieces reproduce."""
    u, ua, uau = _render(tokenizer, "u", False), _render(tokenizer, "ua", False), _render(tokenizer, "uau", False)
    u_gen = _render(tokenizer, "u", True)
    if None in (u, ua, uau, u_gen) or not u_gen.startswith(u):
        return None
    if any(_MARK.format(i) not in text for text, n in ((u, 1), (ua, 2), (uau, 3)) for i in range(n)):
        return None  # the template changes or drops contents
    head_user, user_suffix = _between(u, 0)
    mid, assistant_suffix = _between(ua, 0)[1], _between(ua, 1)[1]
    assistant_prefix = mid[len(user_suffix):] if mid.startswith(user_suffix) else None
    closing_and_opening = _between(uau, 1)[1]  # assistant suffix + user prefix
    if assistant_prefix is None or not closing_and_opening.startswith(assistant_suffix):
        return None
    user_prefix = closing_and_opening[len(assistant_suffix):]
    head = _strip_suffix(head_user, user_prefix)
    if head is None:
        return None
    pieces = ChatPieces(head, None, "", user_prefix, user_suffix, assistant_prefix, assistant_suffix,
                        u_gen[len(u):])
    su = _render(tokenizer, "su", False)
    if su is not None and _MARK.format(0) in su and _MARK.format(1) in su:
        system_head, between = _between(su, 0)
        system_suffix = _strip_suffix(between, user_prefix)
        if system_suffix is not None:
            candidate = replace(pieces, system_head=system_head, system_suffix=system_suffix)
            if _verified(tokenizer, candidate, ("su", "sua", "suau")):
                pieces = candidate
    return pieces if _verified(tokenizer, pieces, ("u", "ua", "uau", "uaua")) else None


def _verified(tokenizer: Any, pieces: ChatPieces, shapes: tuple[str, ...]) -> bool:
    for roles in shapes:
        for gen in (False, True):
            if gen and roles.endswith("a"):
                continue
            expected = _render(tokenizer, roles, gen)
            if expected is None or pieces.render(_msgs(roles), gen, close_last=True) != expected:
                return False
    return True


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')  # only the action delimiter is special in Go template text


def go_template(pieces: ChatPieces, bos_added: str | None = None) -> str:
    """The Go template over ``.Messages`` for ``pieces``; ``bos_added`` is a BOS text llama.cpp adds itself, so
    it is dropped from the front of the heads."""
    def head(text: str) -> str:
        return text[len(bos_added):] if bos_added and text.startswith(bos_added) else text

    L = _go_literal
    first_is_system = '(eq (index .Messages 0).Role "system")'
    if pieces.system_head is not None:
        start = (f"{{{{ if {first_is_system} }}}}{L(head(pieces.system_head))}"
                 f"{{{{ else }}}}{L(head(pieces.head))}{{{{ end }}}}")
    else:
        start = L(head(pieces.head))
    return (
        start
        + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        # Without system support, system messages are left out rather than rendered in a made-up format.
        + ('{{ if eq .Role "system" }}' + ("{{ .Content }}" + L(pieces.system_suffix)
                                           if pieces.system_head is not None else ""))
        + '{{ else if eq .Role "user" }}' + L(pieces.user_prefix) + "{{ .Content }}" + L(pieces.user_suffix)
        + "{{ if $last }}" + L(pieces.generation) + "{{ end }}"
        + '{{ else if eq .Role "assistant" }}' + L(pieces.assistant_prefix) + "{{ .Content }}"
        + "{{ if not $last }}" + L(pieces.assistant_suffix) + "{{ end }}"
        + "{{ end }}{{ end }}"
    )


def stop_tokens(tokenizer: Any, pieces: ChatPieces | None) -> list[str]:
    """eos, plus the special tokens in the assistant suffix and the user prefix (a model that starts a new user
    turn has finished its answer)."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if pieces is not None:
        specials = [t for t in tokenizer.all_special_tokens if t]
        for piece in (pieces.assistant_suffix, pieces.user_prefix):
            stops += sorted((t for t in specials if t in piece), key=piece.index)
    return list(dict.fromkeys(stops))


def write_modelfile(gguf_path: str | Path, tokenizer: Any) -> Path:
    """Write ``<gguf stem>.Modelfile`` next to ``gguf_path`` for ``tokenizer`` (an HF tokenizer or its
    directory) and return its path. Use it with ``ollama create NAME -f <that file>``."""
    gguf_path = Path(gguf_path)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    lines = [f"FROM ./{gguf_path.name}", ""]
    pieces = infer_pieces(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if pieces is not None:
        template = go_template(pieces, tokenizer.bos_token if special_flags(tokenizer)[0] else None)
        if '"""' in template:
            pieces = None
    if pieces is not None:
        lines.append("# TEMPLATE: converted from the Hugging Face chat template (verified on probe conversations).")
        if pieces.system_head is None:
            lines.append("# System messages could not be converted (the template has no separate system turn); "
                         "they are left out.")
    else:
        reason = ("the tokenizer has no chat template" if not getattr(tokenizer, "chat_template", None)
                  else "the Hugging Face chat template could not be converted to Ollama's Go template syntax")
        lines += [f"# TEMPLATE: {reason};",
                  "# a generic 'role: text' template is used instead, which the model was not trained on."]
        template = GENERIC_TEMPLATE
    lines += [f'TEMPLATE """{template}"""', ""]
    for stop in stop_tokens(tokenizer, pieces):
        if '"' not in stop and "\n" not in stop:  # a quoted Modelfile value cannot hold these
            lines.append(f'PARAMETER stop "{stop}"')
    path = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
