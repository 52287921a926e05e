"""The tokenizer half of a GGUF file: llama.cpp's ``tokenizer.*`` keys, written from a Hugging Face tokenizer.

Guarantees of :func:`write_tokenizer`:
- the token list has exactly ``n_vocab`` entries (the embedding's row count); token ``i`` is the HF token with id
  ``i``; ids the tokenizer does not use (embeddings padded past the vocabulary) become ``[PAD<i>]`` with type UNUSED;
- byte-level BPE (``model.type == "BPE"`` without byte fallback, ByteLevel pre-tokenizer) is written as
  ``tokenizer.ggml.model = "gpt2"``: tokens in their byte-level spelling, types NORMAL (1), CONTROL (3) for special
  added tokens, USER_DEFINED (4) for other added tokens, UNUSED (5) for padding; the merges in rank order; and
  ``tokenizer.ggml.pre`` from :func:`pre_tokenizer_name` (see ``PRE_TOKENIZERS`` for the mapping and the fallback);
- SentencePiece-style vocabularies (``tokenizer.model``, or a ``tokenizer.json`` BPE with byte fallback, as
  Llama-2 / Mistral ship) are written as ``tokenizer.ggml.model = "llama"`` through gguf-py's vocab helpers
  (``SentencePieceVocab`` when ``sentencepiece`` is importable and ``tokenizer.model`` exists, else
  ``LlamaHfVocab``), with scores, BYTE (6) types for ``<0xNN>`` pieces and ``add_space_prefix``;
- bos / eos / unk / pad ids are the tokenizer's own; ``add_bos_token`` / ``add_eos_token`` say what the tokenizer
  really does when asked to add special tokens (observed by encoding a probe, not read from config flags, which
  post-processors can contradict); the chat template is copied verbatim.
Anything else (WordPiece, Unigram, a BPE that is neither byte-level nor byte-fallback) raises
``NotImplementedError`` rather than writing a file llama.cpp would tokenize wrongly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import gguf

# The exact Split patterns of the two common regex pre-tokenizers, as their tokenizer.json files spell them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# HF pre-tokenizer shape -> the llama.cpp pre-tokenizer whose splitting is the same.
#   ByteLevel (GPT-2 regex, no prefix space)           -> "gpt-2"     (GPT-2, plain byte-level BPEs)
#   Digits(individual) + ByteLevel (GPT-2 regex)       -> "starcoder" (llama.cpp splits \p{N} one by one, then
#                                                         the GPT-2 regex: exactly this sequence; posttrain's
#                                                         own tokenizer has this shape, as do StarCoder/SmolLM)
#   Split(Llama-3 regex) + ByteLevel (no regex)        -> "llama-bpe"
#   Split(Qwen2 regex) + ByteLevel (no regex) [+ NFC]  -> "qwen2"
# Fallback: any other shape writes "default" (what llama.cpp itself assumes when the key is missing) and warns,
# because llama.cpp may then split text differently; pass ``pre_tokenizer=`` to choose a name yourself.
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", False, True),): "gpt-2",
    (("Digits", True), ("ByteLevel", False, True)): "starcoder",
    (("Split", LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", QWEN2_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "qwen2",
}
FALLBACK_PRE = "default"


def _step_signature(step: dict[str, Any]) -> tuple:
    kind = step.get("type")
    if kind == "ByteLevel":
        return ("ByteLevel", bool(step.get("add_prefix_space", False)), bool(step.get("use_regex", True)))
    if kind == "Digits":
        return ("Digits", bool(step.get("individual_digits", False)))
    if kind == "Split":
        return ("Split", (step.get("pattern") or {}).get("Regex"), step.get("behavior"), bool(step.get("invert")))
    return (kind, json.dumps(step, sort_keys=True))


def pre_tokenizer_name(backend: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name for a tokenizer.json (as a dict), or None when the shape is not known.

    A normalizer disqualifies the match (llama.cpp's byte-level path has none), except NFC for "qwen2", which
    Qwen2 ships and which changes nothing on already-composed text."""
    pre = backend.get("pre_tokenizer")
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    name = PRE_TOKENIZERS.get(tuple(_step_signature(s) for s in steps))
    normalizer = backend.get("normalizer")
    if name is not None and normalizer is not None and not (name == "qwen2" and normalizer.get("type") == "NFC"):
        return None
    return name


def special_flags(tokenizer: Any) -> tuple[bool, bool]:
    """(add_bos, add_eos) as the tokenizer behaves: encode a probe with and without special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    added = len(full) > len(plain)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (added and bos is not None and full[0] == bos, added and eos is not None and full[-1] == eos)


def _pad_to(items: list, n_vocab: int, make) -> list:
    if len(items) > n_vocab:
        raise ValueError(f"the tokenizer has {len(items)} tokens but the model's embedding only {n_vocab} rows")
    return items + [make(i) for i in range(len(items), n_vocab)]


def _bpe_vocab(backend: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    tokens: dict[int, str] = {i: t for t, i in backend["model"]["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(tokens, gguf.TokenType.NORMAL)
    for added in backend.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if tokens and max(tokens) >= n_vocab:
        raise ValueError(f"token id {max(tokens)} does not fit the model's {n_vocab} embedding rows")
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    type_list = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    merges = []
    for merge in backend["model"].get("merges", []):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if " " in left or " " in right:
            # Byte-level vocabularies spell the space as 'Ġ'; a literal space means a different kind of BPE.
            raise NotImplementedError(f"merge {merge!r} contains a literal space: not a byte-level BPE")
        merges.append(f"{left} {right}")
    return token_list, type_list, merges


def _merge_scores(backend: dict[str, Any]) -> dict[str, float]:
    """Score = -(rank of the merge that creates the token): llama.cpp's SentencePiece tokenizer merges the pair
    whose result scores highest, which then follows the BPE merge order exactly."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(backend["model"].get("merges", [])):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _spm_vocab(model_dir: Path, backend: dict[str, Any] | None, tokenizer: Any,
               n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    vocab: Any = None
    if (model_dir / "tokenizer.model").is_file():
        try:
            vocab = gguf.SentencePieceVocab(model_dir)  # real SentencePiece scores
        except RuntimeError:  # sentencepiece not installed: fall through to tokenizer.json
            vocab = None
    from_json = vocab is None
    if from_json:
        vocab = gguf.LlamaHfVocab(model_dir)
    entries = list(vocab.all_tokens())
    tokens = [text.decode("utf-8") for text, _, _ in entries]
    scores = [float(score) for _, score, _ in entries]
    types = [int(t) for _, _, t in entries]
    if from_json and backend is not None:
        # LlamaHfVocab writes a placeholder score for every token; derive real ones from the merge ranks.
        merge_scores = _merge_scores(backend)
        scores = [merge_scores.get(t, 0.0) for t in tokens]
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < len(types):
        types[tokenizer.unk_token_id] = int(gguf.TokenType.UNKNOWN)
    expected = tokenizer.convert_ids_to_tokens(list(range(len(tokens))))
    if tokens != expected:
        raise ValueError("gguf's SentencePiece vocabulary does not list the tokens in id order")
    tokens = _pad_to(tokens, n_vocab, lambda i: f"[PAD{i}]")
    scores = _pad_to(scores, n_vocab, lambda i: -1000.0)
    types = _pad_to(types, n_vocab, lambda i: int(gguf.TokenType.UNUSED))
    return tokens, scores, types


def write_tokenizer(writer: gguf.GGUFWriter, model_dir: str | Path, tokenizer: Any, n_vocab: int,
                    pre_tokenizer: str | None = None) -> dict[str, Any]:
    """Add the tokenizer.* keys for ``tokenizer`` (loaded from ``model_dir``) to ``writer``.

    Returns a summary: {"model": "gpt2"|"llama", "pre": name or None, "pre_recognised": bool, "tokens": n}."""
    model_dir = Path(model_dir)
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    model = (backend or {}).get("model", {})
    summary: dict[str, Any] = {"pre": None, "pre_recognised": False}
    if backend is not None and model.get("type") == "BPE" and not model.get("byte_fallback", False):
        if "ByteLevel" not in json.dumps(backend.get("pre_tokenizer")):
            raise NotImplementedError("a BPE tokenizer without byte fallback that is not byte-level")
        tokens, types, merges = _bpe_vocab(backend, n_vocab)
        known = pre_tokenizer_name(backend)
        pre = pre_tokenizer or known
        if pre is None:
            warnings.warn(f"unrecognised pre-tokenizer {json.dumps(backend.get('pre_tokenizer'))} (normalizer "
                          f"{json.dumps(backend.get('normalizer'))}); writing tokenizer.ggml.pre={FALLBACK_PRE!r}, "
                          "so llama.cpp may split text differently from Hugging Face. Check token ids, or pass "
                          "pre_tokenizer= with the llama.cpp name whose regex matches.", stacklevel=3)
            pre = FALLBACK_PRE
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        summary.update(model="gpt2", pre=pre, pre_recognised=known is not None)
    elif (model_dir / "tokenizer.model").is_file() or (model.get("type") == "BPE" and model.get("byte_fallback")):
        tokens, scores, types = _spm_vocab(model_dir, backend, tokenizer, n_vocab)
        writer.add_tokenizer_model("llama")  # no tokenizer.ggml.pre: llama.cpp's SentencePiece path has none
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        # SentencePiece prepends "▁" to the text when this is on; observe it rather than trust config flags.
        first = tokenizer.tokenize("a")
        writer.add_add_space_prefix(bool(first) and first[0].startswith("\u2581"))
        summary.update(model="llama")
    else:
        raise NotImplementedError(f"tokenizer model {model.get('type')!r} cannot be written to GGUF here "
                                  "(supported: byte-level BPE, SentencePiece BPE)")
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    add_bos, add_eos = special_flags(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        writer.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    elif isinstance(template, str):
        writer.add_chat_template(template)
    summary["tokens"] = n_vocab
    return summary

