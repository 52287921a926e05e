"""Log-likelihood of continuations given contexts, scored the way lm-eval scores them (EVALUATION.md §1), plus the
helpers the multiple-choice benchmarks (MMLU, ARC, TruthfulQA) share.

`loglikelihood(model, tokenizer, [(context, continuation), ...])` returns, per request, `(logprob_sum, is_greedy)`.
Guarantees:
- trailing whitespace of the context is moved to the front of the continuation;
- context + continuation are encoded as ONE string and split where the context's own tokens end, so BPE merges
  across the join are what the model would see. When a token straddles the join (e.g. `": C"` is one token, so the
  context's tokens are not a prefix of the whole's), the split is at the longest common prefix of the two
  encodings: the straddling token is scored as part of the continuation. lm-eval splits at `len(context tokens)`
  instead, which there asserts on an empty continuation or silently drops the straddled text; whenever the
  context's tokens ARE a prefix of the whole's (the usual case) the two splits are identical;
- the tokenizer's own leading special tokens (e.g. Llama's BOS) are kept when `add_special_tokens` (the tokenizer
  decides, as lm-eval does since PR #3347); trailing ones (an appended EOS) are never kept, since the continuation
  must follow the context directly. An empty context (or one whose tokens all merge into the continuation) is
  replaced by the prefix token: BOS, else EOS;
- the model input is `(context + continuation)[-(max_length + 1):][:-1]` (left truncation), so no input is longer
  than `max_length`; a continuation longer than `max_length` tokens is an error, never silently cut;
- the result is the sum of log-softmax over the continuation positions, and `is_greedy` is true when the argmax at
  every one of them is the continuation token;
- batching is padding-safe (left padding, attention mask, position ids counting real tokens) and results come back
  in request order; requests with the SAME model input (e.g. the one-token answers " A".." D" of one MMLU question)
  share one forward row, which is exactly the computation scoring each alone would do. Results therefore equal
  scoring each request alone, up to float rounding from padding;
- only the last positions' logits are computed when the model supports `logits_to_keep` (the model's own forward,
  so soft-capping and scaling stay applied).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

import torch

from ..align.logprobs import model_device, selective_log_softmax
from ..data.collate import collate_masked

Request = tuple[str, str]
CHUNK_REQUESTS = 4096  # requests encoded and scored together (see `loglikelihood`)


# ------------------------------------------------------------------------------------------------ encoding

def prefix_token_id(tokenizer: Any) -> int:
    """The token an empty context is replaced by: BOS, else EOS (lm-eval's `prefix_token_id`)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer itself puts before any text (e.g. [BOS]); [] for tokenizers adding none."""
    # The leading run of special tokens around a probe text that encodes to at least one ordinary token (a probe
    # the vocabulary cannot encode would leave BOS and EOS indistinguishable).
    for probe in ("a", "A", "0", " "):
        enc = tokenizer(probe, add_special_tokens=True, return_special_tokens_mask=True, verbose=False)
        mask = list(enc["special_tokens_mask"])
        if 0 in mask:
            return list(enc["input_ids"][:mask.index(0)])
    return []


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _move_whitespace(context: str, continuation: str) -> tuple[str, str]:
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not continuation:
        raise ValueError("a request needs a non-empty continuation")
    return context, continuation


def encode_pairs(tokenizer: Any, requests: Sequence[Request], *,
                 add_special_tokens: bool = True) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request, as described in the module docstring. Each distinct text is
    encoded once, all in one batched tokenizer call (the K choices of a question share their context)."""
    lead = leading_special_tokens(tokenizer) if add_special_tokens else []
    moved = [_move_whitespace(c, x) for c, x in requests]
    texts = list(dict.fromkeys(t for c, x in moved for t in ((c, c + x) if c else (x,))))
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    ids = {t: list(e) for t, e in zip(texts, encoded)}
    out = []
    for context, continuation in moved:
        if context == "":
            out.append(([prefix_token_id(tokenizer)], ids[continuation]))
            continue
        whole, ctx = lead + ids[context + continuation], lead + ids[context]
        split = _common_prefix(whole, ctx)  # == len(ctx) unless a token straddles the join
        if split == len(whole):  # the continuation encoded to nothing: refuse rather than guess
            raise ValueError(f"the continuation {continuation!r} encodes to no tokens after {context[-40:]!r}")
        if split == 0:  # every context token merged into the continuation's tokens: condition on the prefix token
            out.append(([prefix_token_id(tokenizer)], whole))
        else:
            out.append((whole[:split], whole[split:]))
    return out


def encode_pair(tokenizer: Any, context: str, continuation: str, *,
                add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """`encode_pairs` for one request."""
    return encode_pairs(tokenizer, [(context, continuation)], add_special_tokens=add_special_tokens)[0]


# ------------------------------------------------------------------------------------------------ scoring

def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft passes kwargs through
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def loglikelihood_tokens(model: torch.nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                         batch_size: int, max_length: int, pad_id: int = 0,
                         progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """`loglikelihood` on already-encoded (context ids, continuation ids) pairs; `batch_size` counts forward rows."""
    if batch_size < 1 or max_length < 1:
        raise ValueError("batch_size and max_length must be positive")
    inputs: list[list[int]] = []
    index_of: dict[tuple[int, ...], int] = {}
    users: list[list[int]] = []  # requests per distinct input
    for r, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"request {r}: the context and the continuation both need at least one token")
        if len(cont) > max_length:
            raise ValueError(f"request {r}: a {len(cont)}-token continuation does not fit in max_length={max_length}")
        inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        key = tuple(inp)
        if key not in index_of:
            index_of[key] = len(inputs)
            inputs.append(inp)
            users.append([])
        users[index_of[key]].append(r)
    # Longest first: similar lengths share a batch (little padding) and an out-of-memory shows up at once.
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    keep_logits = _accepts_logits_to_keep(model)
    device = model_device(model)
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    done = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            requests = [(row, r) for row, i in enumerate(chunk) for r in users[i]]
            keep = max(len(pairs[r][1]) for _, r in requests)
            # Left padding puts every row's last token in the last column, so the scored positions of all rows
            # are the last `keep` columns; position ids count real tokens only (data.collate).
            batch = collate_masked([(inputs[i], [1] * len(inputs[i])) for i in chunk], pad_id,
                                   padding_side="left").to(device)
            kwargs: dict[str, Any] = {"logits_to_keep": keep} if keep_logits else {}
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False, **kwargs).logits[:, -keep:]
            targets = torch.zeros((len(requests), keep), dtype=torch.long)
            scored = torch.zeros((len(requests), keep), dtype=torch.bool)
            for j, (_, r) in enumerate(requests):
                cont = pairs[r][1]
                targets[j, keep - len(cont):] = torch.tensor(list(cont), dtype=torch.long)
                scored[j, keep - len(cont):] = True
            targets, scored = targets.to(device), scored.to(device)
            picked = logits[torch.tensor([row for row, _ in requests], device=device)]
            logps = (selective_log_softmax(picked, targets) * scored).sum(-1)
            greedy = ((picked.argmax(-1) == targets) | ~scored).all(-1)
            for (_, r), lp, g in zip(requests, logps.float().tolist(), greedy.tolist()):
                results[r] = (float(lp), bool(g))
            done += len(requests)
            if progress is not None:
                progress(done, len(pairs))
    return [r for r in results if r is not None]


def loglikelihood(model: torch.nn.Module, tokenizer: Any, requests: Sequence[Request], *, batch_size: int,
                  max_length: int, add_special_tokens: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """Per (context, continuation): (sum of the continuation's token log-probs, whether greedy decoding would
    produce exactly it). `add_special_tokens=False` for text already rendered through a chat template (which
    writes its own BOS). See the module docstring for the guarantees."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[tuple[float, bool]] = []
    # Encoded in chunks: all of MMLU's 5-shot requests at once would hold tens of millions of Python ints. A chunk
    # boundary only costs a possible extra forward row; the numbers are the same.
    for start in range(0, len(requests), CHUNK_REQUESTS):
        pairs = encode_pairs(tokenizer, requests[start:start + CHUNK_REQUESTS], add_special_tokens=add_special_tokens)

        def report(done: int, _total: int, _offset: int = start) -> None:
            if progress is not None:
                progress(_offset + done, len(requests))

        results += loglikelihood_tokens(model, pairs, batch_size=batch_size, max_length=max_length,
                                        pad_id=int(pad or 0), progress=report)
    return results


# ------------------------------------------------------------------------------- multiple-choice helpers

def score_choices(model: torch.nn.Module, tokenizer: Any, questions: Sequence[tuple[str, Sequence[str]]], *,
                  batch_size: int, max_length: int, add_special_tokens: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> list[list[float]]:
    """For each (context, continuations) question, the log-likelihood of every continuation, in order."""
    flat = [(ctx, cont) for ctx, conts in questions for cont in conts]
    scores = loglikelihood(model, tokenizer, flat, batch_size=batch_size, max_length=max_length,
                           add_special_tokens=add_special_tokens, progress=progress)
    out, i = [], 0
    for _, conts in questions:
        out.append([lp for lp, _ in scores[i:i + len(conts)]])
        i += len(conts)
    return out


def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy's argmax, which lm-eval uses)."""
    if not values:
        raise ValueError("argmax of nothing")
    return max(range(len(values)), key=lambda i: (values[i], -i))


def render_prompt(tokenizer: Any, text: str, chat_template: bool) -> str:
    """The context as scored: the text itself, or the text as one user turn through the tokenizer's chat template
    with the generation prompt (lm-eval's --apply_chat_template for a single-turn few-shot prompt)."""
    if not chat_template:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template was asked for but the tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_fields(prompt: str, keep: int = 1000, tail: int = 500) -> dict[str, Any]:
    """A sample record's prompt: in full up to `keep` characters, else its last `tail` characters; always its
    sha256, so two runs can be checked for having scored the same prompt."""
    shown = prompt if len(prompt) <= keep else "…" + prompt[-tail:]
    return {"prompt": shown, "prompt_chars": len(prompt),
            "prompt_sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest()}


def _hub_reachable(timeout: float = 3.0) -> bool:
    # A bounded probe (a thread, so a hanging DNS lookup cannot stall us either): `datasets` alone may retry for
    # minutes before failing offline. urllib honours the proxy environment variables; any HTTP answer counts.
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(endpoint, timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)
        except Exception:  # noqa: BLE001 - unreachable for any reason
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


def load_hub_split(benchmark: str, path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset split, or `BenchmarkUnavailable` at once when the hub cannot be used. With
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, only the local `datasets` cache is tried."""
    from .harness import BenchmarkUnavailable

    def unavailable(reason: str) -> BenchmarkUnavailable:
        return BenchmarkUnavailable(f"{benchmark}: cannot load {path} ({split}) from the Hugging Face hub: {reason}; "
                                    "give --data-dir DIR (a folder laid out like ../shared/datasets)")

    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not _hub_reachable():
        raise unavailable("the hub is not reachable (set HF_HUB_OFFLINE=1 to use a cached copy)")
    try:
        import datasets

        return datasets.load_dataset(path, name, split=split).to_list()
    except Exception as e:  # noqa: BLE001 - any failure inside `datasets` becomes one readable message
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise unavailable(f"{type(e).__name__}: {first_line}") from None
