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
- inputs sharing a long token prefix (MMLU's few-shot prompt within a subject, the context of ARC's choices) are
  scored on one cached prefix: the prefix runs once per batch, its keys and values are repeated for each input
  (`align.logprobs.shared_prompt_hidden`, the training's shared-prompt machinery) and only the rest of each input
  runs, positions continuing from the prefix. Groups are found by sorting the inputs (the common prefix of a run of
  sorted inputs is the smallest common prefix of neighbours); an input joins a group while the tokens saved do not
  shrink and the group still shares `MIN_SHARED_PREFIX` tokens and at least half of each member's tokens. The
  prefix never reaches into a scored position. Inputs that were left-truncated are always run whole (their windows
  start at different offsets anyway). On first use per model class and dtype a few inputs of the first such batch
  are also run whole and compared; if the two disagree (a model whose forward is more than `head(decoder(x))`,
  e.g. soft-capping) the plain numbers are returned and that model class stays on the plain path;
- only the last positions' logits are computed when the model supports `logits_to_keep` (the model's own forward,
  so soft-capping and scaling stay applied).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..align.logprobs import decoder_and_head, model_device, selective_log_softmax, shared_prompt_hidden
from ..data.collate import collate_masked

Request = tuple[str, str]
CHUNK_REQUESTS = 4096  # requests encoded and scored together (see `loglikelihood`)
# Tokens a group of inputs must share to be scored on one cached prefix: no grouping on a handful of common tokens
# (a template's opening words), where a second forward call would buy next to nothing.
MIN_SHARED_PREFIX = 16


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


@dataclass
class ScoringPlan:
    """How `loglikelihood_tokens` runs a list of encoded requests."""

    inputs: list[list[int]]               # the distinct model inputs
    users: list[list[int]]                # per input, the requests read from it
    groups: list[tuple[int, list[int]]]   # (shared prefix length, inputs) scored on one cached prefix
    plain: list[int]                      # inputs run whole

    def requests_on_shared_prefix(self) -> int:
        return sum(len(self.users[i]) for _, members in self.groups for i in members)

    def prefix_tokens_reused(self, batch_size: int) -> int:
        """Input tokens not run again because they came from a cached prefix: a group's prefix runs once per
        `batch_size` members."""
        return sum((len(members) - (len(members) + batch_size - 1) // batch_size) * n for n, members in self.groups)


def plan_requests(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int,
                  share_prefixes: bool = True) -> ScoringPlan:
    """The distinct model inputs of these (context ids, continuation ids) pairs and which of them share a prefix."""
    if max_length < 1:
        raise ValueError("max_length must be positive")
    inputs: list[list[int]] = []
    index_of: dict[tuple[int, ...], int] = {}
    users: list[list[int]] = []
    scored: list[int] = []            # per input, the most continuation tokens one of its requests scores
    truncated: list[bool] = []
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
            scored.append(0)
            truncated.append(False)
        i = index_of[key]
        users[i].append(r)
        scored[i] = max(scored[i], len(cont))
        truncated[i] = truncated[i] or len(ctx) + len(cont) > max_length + 1
    groups: list[tuple[int, list[int]]] = []
    if share_prefixes:
        # A prefix may cover at most the positions before the first scored one (the input's last `scored` positions
        # are scored; the prefix's last state predicts the first of them) and must leave at least one token to run.
        caps = [min(len(inp) - 1, len(inp) + 1 - n) for inp, n in zip(inputs, scored)]
        candidates = [i for i in range(len(inputs)) if not truncated[i] and caps[i] >= MIN_SHARED_PREFIX]
        groups = _shared_prefix_groups(inputs, caps, candidates)
    grouped = {i for _, members in groups for i in members}
    return ScoringPlan(inputs, users, groups, [i for i in range(len(inputs)) if i not in grouped])


def _shared_prefix_groups(inputs: list[list[int]], caps: list[int],
                          candidates: list[int]) -> list[tuple[int, list[int]]]:
    # Sorted, inputs with a common prefix are neighbours, and a run's common prefix is its neighbours' smallest.
    # An input joins the run while the tokens saved ((members - 1) * shared prefix) do not shrink and the shared
    # prefix stays at least half of every member (a template's common opening words before inputs that differ in
    # most of their tokens saves less than the second forward call costs).
    groups: list[tuple[int, list[int]]] = []
    members: list[int] = []
    shared = longest = 0
    for i in sorted(candidates, key=lambda c: inputs[c]):
        if members:
            joined = min(shared, _common_prefix(inputs[members[-1]], inputs[i]), caps[i])
            if (joined >= MIN_SHARED_PREFIX and 2 * joined >= max(longest, len(inputs[i]))
                    and len(members) * joined >= (len(members) - 1) * shared):
                members.append(i)
                shared, longest = joined, max(longest, len(inputs[i]))
                continue
            groups.append((shared, members))
        members, shared, longest = [i], caps[i], len(inputs[i])
    if members:
        groups.append((shared, members))
    return [(n, g) for n, g in groups if len(g) > 1]


def _plain_batch(model: torch.nn.Module, plan: ScoringPlan, chunk: Sequence[int],
                 pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                 keep_logits: bool) -> list[tuple[int, float, bool]]:
    """(request, log-likelihood, greedy) for the requests of these inputs, each input run whole."""
    device = model_device(model)
    inputs = plan.inputs
    requests = [(row, r) for row, i in enumerate(chunk) for r in plan.users[i]]
    keep = max(len(pairs[r][1]) for _, r in requests)
    # Left padding puts every row's last token in the last column, so the scored positions of all rows are the
    # last `keep` columns; position ids count real tokens only (data.collate).
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
    return [(r, float(lp), bool(g)) for (_, r), lp, g in zip(requests, logps.float().tolist(), greedy.tolist())]


def _prefix_batch(parts: tuple[torch.nn.Module, torch.nn.Module], plan: ScoringPlan,
                  pieces: Sequence[tuple[int, Sequence[int]]], pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                  pad_id: int) -> list[tuple[int, float, bool]]:
    """The same for inputs grouped on shared prefixes: each piece's prefix runs once, then the rest of its inputs
    on the cached keys and values; only the scored positions go through the LM head."""
    decoder, head = parts
    inputs = plan.inputs
    states = shared_prompt_hidden(decoder, [inputs[members[0]][:n] for n, members in pieces],
                                  [[inputs[i][n:] for i in members] for n, members in pieces], pad_id)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    owner: list[int] = []
    requests: list[int] = []
    row = 0
    for n, members in pieces:
        for i in members:
            rest = len(inputs[i]) - n  # predictor column `rest` is the input's last state
            for r in plan.users[i]:
                cont = list(pairs[r][1])  # predicted by the input's last len(cont) states
                rows += [row] * len(cont)
                cols += range(rest - len(cont) + 1, rest + 1)
                targets += cont
                owner += [len(requests)] * len(cont)
                requests.append(r)
            row += 1
    device = states.hidden.device
    logits = head(states.predictors()[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])
    target = torch.tensor(targets, device=device)
    index = torch.tensor(owner, device=device)
    logps = torch.zeros(len(requests), device=device).index_add_(
        0, index, selective_log_softmax(logits, target).float())
    misses = torch.zeros(len(requests), dtype=torch.long, device=device).index_add_(
        0, index, (logits.argmax(-1) != target).long())
    return [(r, float(lp), m == 0) for r, lp, m in zip(requests, logps.tolist(), misses.tolist())]


def _prefix_batches(plan: ScoringPlan, batch_size: int) -> list[list[tuple[int, list[int]]]]:
    # Longest prefix first; a group larger than a batch is split (its prefix then runs once per piece), and small
    # groups are packed together up to `batch_size` rows.
    batches: list[list[tuple[int, list[int]]]] = []
    current: list[tuple[int, list[int]]] = []
    rows = 0
    for n, members in sorted(plan.groups, key=lambda g: -g[0]):
        members = sorted(members, key=lambda i: -len(plan.inputs[i]))
        for start in range(0, len(members), batch_size):
            piece = members[start:start + batch_size]
            if current and rows + len(piece) > batch_size:
                batches.append(current)
                current, rows = [], 0
            current.append((n, piece))
            rows += len(piece)
    if current:
        batches.append(current)
    return batches


# Whether `_prefix_batch` reproduces `_plain_batch`, per (model class, dtype): checked once, on the first
# CHECK_INPUTS inputs of the first prefix batch.
_PREFIX_PATH_OK: dict[tuple[type, torch.dtype], bool] = {}
CHECK_INPUTS = 4


def loglikelihood_tokens(model: torch.nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                         batch_size: int, max_length: int, pad_id: int = 0, share_prefixes: bool = True,
                         progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """`loglikelihood` on already-encoded (context ids, continuation ids) pairs; `batch_size` counts forward rows
    (completion rows on the prefix path). `share_prefixes=False` runs every input whole."""
    if batch_size < 1 or max_length < 1:
        raise ValueError("batch_size and max_length must be positive")
    plan = plan_requests(pairs, max_length=max_length, share_prefixes=share_prefixes)
    parts = decoder_and_head(model) if plan.groups else None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = (type(base), next(model.parameters()).dtype)
    if parts is None or _PREFIX_PATH_OK.get(key) is False:
        plain, prefix_batches = list(range(len(plan.inputs))), []
    else:
        plain, prefix_batches = list(plan.plain), _prefix_batches(plan, batch_size)
    keep_logits = _accepts_logits_to_keep(model)
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    done = 0

    def record(scores: list[tuple[int, float, bool]]) -> None:
        nonlocal done
        for r, lp, g in scores:
            results[r] = (lp, g)
        done += len(scores)
        if progress is not None:
            progress(done, len(pairs))

    with torch.inference_mode():
        for pieces in prefix_batches:
            if _PREFIX_PATH_OK.get(key) is False:  # the check below failed: run the remaining groups whole
                plain += [i for _, members in pieces for i in members]
                continue
            fast = _prefix_batch(parts, plan, pieces, pairs, pad_id)
            if key not in _PREFIX_PATH_OK:  # first use for this model class and dtype: check against the plain run
                probe = pieces[0][1][:CHECK_INPUTS]
                reference = _plain_batch(model, plan, probe, pairs, pad_id, keep_logits)
                want = {r: lp for r, lp, _ in reference}
                got = torch.tensor([lp for r, lp, _ in sorted(fast) if r in want])
                _PREFIX_PATH_OK[key] = bool(torch.allclose(got, torch.tensor([want[r] for r in sorted(want)]),
                                                           atol=1e-4, rtol=1e-4))
                if not _PREFIX_PATH_OK[key]:
                    record(reference)
                    plain += [i for _, members in pieces for i in members if i not in probe]
                    continue
            record(fast)
        # Longest first: similar lengths share a batch (little padding) and an out-of-memory shows up at once.
        order = sorted(plain, key=lambda i: -len(plan.inputs[i]))
        for start in range(0, len(order), batch_size):
            record(_plain_batch(model, plan, order[start:start + batch_size], pairs, pad_id, keep_logits))
    return [r for r in results if r is not None]


def loglikelihood(model: torch.nn.Module, tokenizer: Any, requests: Sequence[Request], *, batch_size: int,
                  max_length: int, add_special_tokens: bool = True, share_prefixes: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """Per (context, continuation): (sum of the continuation's token log-probs, whether greedy decoding would
    produce exactly it). `add_special_tokens=False` for text already rendered through a chat template (which
    writes its own BOS); `share_prefixes=False` runs every input whole. See the module docstring for the
    guarantees."""
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
                                        pad_id=int(pad or 0), share_prefixes=share_prefixes, progress=report)
    return results


# ------------------------------------------------------------------------------- multiple-choice helpers

def score_choices(model: torch.nn.Module, tokenizer: Any, questions: Sequence[tuple[str, Sequence[str]]], *,
                  batch_size: int, max_length: int, add_special_tokens: bool = True, share_prefixes: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> list[list[float]]:
    """For each (context, continuations) question, the log-likelihood of every continuation, in order."""
    flat = [(ctx, cont) for ctx, conts in questions for cont in conts]
    scores = loglikelihood(model, tokenizer, flat, batch_size=batch_size, max_length=max_length,
                           add_special_tokens=add_special_tokens, share_prefixes=share_prefixes, progress=progress)
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
    # `datasets` alone may retry for minutes before failing offline; the one bounded probe lives with model loading.
    from ..models.loading import hub_reachable

    return hub_reachable(timeout)


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
