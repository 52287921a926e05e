"""Measuring a compressed artifact against the model it came from, on this machine.

Guarantees: every number is measured here and now — size on disk (weight files, or the single GGUF file), load time
(wall clock of loading the artifact), generation speed (greedy tokens per second on a fixed prompt, with the runtime
named: the median of `SPEED_REPEATS` timed generations after one untimed warm-up generation of the same length,
each timed run's speed kept in `tokens_per_s_repeats` so that their spread is visible), held-out perplexity of both
models on the same token ids, and top-1 agreement (the share of held-out positions where both models' argmax
agree). Perplexity is exp of the mean next-token NLL over the scored positions, so both models are scored on
exactly the same targets.

What is scored (`heldout_targets`, recorded as `scored_on` with the rows per source): a held-out row's completion
tokens after its chat-templated prompt — the completion of SFT and KTO rows, the chosen side of a preference pair
("completions") — or, for a row without a completion (a verifiable row, whose `answer` is only the bare final
answer, or a prompt-only row), the completion tokens of the aligned (uncompressed) model's own greedy completion of
its prompt, rendered through the chat template exactly as generation renders it, up to `max_new_tokens` new tokens
and cut after the first end-of-sequence token, which is scored too ("aligned_greedy_completions"). Prompt tokens are
never scored: a prompt is not what the model produces, so its perplexity says little about the model. "mixed" when
both sources occur. The completions are generated once (`heldout_targets`) and reused for every artifact measured on
those targets.

A reward model (a score head, no language-model head; it does not generate) is measured on held-out preference
pairs instead (`pair_targets`, `scored_on` "preference_pairs"): both models score the chosen and the rejected
completion of each pair, tokenized as reward-model training tokenizes them, and `reward` holds the pairs, each
model's pairwise accuracy (chosen scored strictly higher, a tie is wrong), the preference agreement (the share of
pairs where both models make the same call) and the mean and largest absolute score difference over every scored
completion. Perplexity, top-1 agreement and tokens/s do not apply to it: they are null, and `notes` says so.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..align.engine import TrainOptions
from ..align.preference import EncodedPair, collate_pairs, encode_pairs
from ..align.reward_model import sequence_scores
from ..align.sft import pad_id_of
from ..data.tokenize import encode_completion, encode_prompt
from ..models.loading import weights_size_bytes
from ..rollout.generate import generate

# `scored_on` values: what the held-out positions are (see the module docstring).
COMPLETIONS, ALIGNED_GREEDY, MIXED = "completions", "aligned_greedy_completions", "mixed"
PAIRS = "preference_pairs"  # a reward model's targets (`pair_targets`); `scored_rows` counts them as "pair"
NOT_FOR_REWARD_MODELS = ("perplexity, top-1 agreement and tokens/s do not apply to a reward model (a score head, no "
                         "language-model head, and it does not generate), so they are null; it is measured by its "
                         "scores on held-out preference pairs instead (reward)")
GENERATED = "aligned_greedy_completion"  # the `scored_rows` source of a row completed by the aligned model
MAX_NEW_TOKENS = 64  # default cap of those completions (compress.heldout_max_new_tokens in a run config)
SPEED_REPEATS = 3  # timed generations per artifact (after an untimed warm-up); tokens_per_s is their median
SPEED_NEW_TOKENS = 32  # tokens each of them generates


@dataclass
class ArtifactMeasurement:
    size_bytes: int
    base_size_bytes: int
    load_seconds: float
    tokens_per_s: float | None  # None: does not apply (a reward model does not generate)
    runtime: str
    perplexity: float | None  # None (and top1_agreement, positions): a reward model, see `reward`
    base_perplexity: float | None
    top1_agreement: float | None
    positions: int | None
    scored_on: str  # completions | aligned_greedy_completions | mixed | preference_pairs, or the caller's label
    scored_rows: dict[str, int]  # rows scored per source: completion, chosen, aligned_greedy_completion, pair
    max_new_tokens: int | None  # the cap of the aligned model's greedy completions; None when none was generated
    reward: dict[str, Any] | None = None  # a reward model's measurement (`compare_reward_models`)
    notes: list[str] = field(default_factory=list)  # what was not measured, and why
    tokens_per_s_repeats: list[float] | None = None  # each timed run's tokens/s, in order; tokens_per_s: the median

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def artifact_size(path: str | Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else weights_size_bytes(path)


@dataclass(frozen=True)
class HeldoutTargets:
    """The held-out token ids to score, each (ids, index of the first scored token), and what they are."""

    items: list[tuple[list[int], int]]
    scored_on: str
    scored_rows: dict[str, int]
    max_new_tokens: int | None = None
    dropped: dict[str, int] | None = None  # rows left with no scored token, by reason

    # Iterable as its items, so it is what `compare_on_texts` takes.
    def __iter__(self) -> Iterator[tuple[list[int], int]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def heldout_targets(tokenizer: Any, rows: Sequence[dict], *, model: Any = None, max_new_tokens: int = MAX_NEW_TOKENS,
                    max_length: int = 256, batch_size: int = 32) -> HeldoutTargets:
    """What to score on normalised held-out rows: each row's completion after its prompt, or, for a row with only a
    prompt, the completion of `model`'s (the aligned model's) greedy generation (see the module docstring). Each
    sequence is cut to `max_length` tokens; a row left with no completion token is dropped and counted. Raises
    ValueError naming the row when a row has no prompt and no completion, when rows need a generation and no model
    is given, or when no row is left to score."""
    items: list[tuple[list[int], int] | None] = []
    sources: list[str] = []
    pending: list[tuple[int, list[int]]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"held-out row {i + 1}: expected a normalised row (an object), got {type(row).__name__}")
        side = "completion" if row.get("completion") else "chosen" if row.get("chosen") else None
        if side is not None:
            enc = encode_completion(tokenizer, row.get("prompt") or [], row[side], max_length=max_length)
            items.append(None if enc is None else (enc.input_ids, len(enc.prompt_ids)))
            sources.append(side)
        elif row.get("prompt"):
            prompt = encode_prompt(tokenizer, row["prompt"])
            items.append(None)
            sources.append(GENERATED)
            if len(prompt) < max_length:  # else no room is left for a completion token: dropped below
                pending.append((i, prompt))
        else:
            raise ValueError(f"held-out row {i + 1}: expected 'prompt' with 'completion', 'chosen' (pairs) or no "
                             f"completion (verifiable, prompt-only); got fields {sorted(row)}")
    if pending and model is None:
        raise ValueError(f"{len(pending)} held-out rows have no completion (e.g. row {pending[0][0] + 1}): scoring "
                         "them needs the aligned model to generate their completions")
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        gens = generate(model, tokenizer, [ids for _, ids in chunk], max_new_tokens=max_new_tokens)
        for (i, prompt), gen in zip(chunk, gens):
            items[i] = (prompt + gen.completion_ids[:max_length - len(prompt)], len(prompt))
    kept, scored, dropped = [], {}, {}
    for item, source in zip(items, sources):
        if item is None:
            dropped["no_completion_token_within_max_length"] = dropped.get(
                "no_completion_token_within_max_length", 0) + 1
        else:
            kept.append(item)
            scored[source] = scored.get(source, 0) + 1
    if not kept:
        raise ValueError(f"none of the {len(rows)} held-out rows leaves a completion token to score within "
                         f"{max_length} tokens")
    kinds = {ALIGNED_GREEDY if source == GENERATED else COMPLETIONS for source in scored}
    return HeldoutTargets(kept, kinds.pop() if len(kinds) == 1 else MIXED, scored,
                          max_new_tokens if GENERATED in scored else None, dropped or None)


@dataclass(frozen=True)
class PairTargets:
    """Held-out preference pairs a reward model is measured on, tokenized as reward-model training does."""

    pairs: list[EncodedPair]
    pad: int
    dropped: dict[str, int] | None = None  # pairs not scored (emptied or made identical by truncation), by reason
    scored_on: str = PAIRS
    max_new_tokens: None = None  # nothing is generated

    @property
    def scored_rows(self) -> dict[str, int]:
        return {"pair": len(self.pairs)}

    def __len__(self) -> int:
        return len(self.pairs)


def pair_targets(tokenizer: Any, rows: Sequence[dict], *, max_length: int = 256) -> PairTargets:
    """A reward model's held-out targets: normalised preference rows, each cut to `max_length` tokens per side as
    `align.preference.encode_pairs` cuts them. Raises ValueError naming the first row that is not a pair, or when
    truncation leaves no pair to score."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(row.get(k) for k in ("prompt", "chosen", "rejected")):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"held-out row {i + 1}: measuring a reward model needs preference pairs ('prompt', "
                             f"'chosen', 'rejected'), got {got}")
    pairs, dropped = encode_pairs(tokenizer, rows, TrainOptions(max_length=max_length))
    if not pairs:
        raise ValueError(f"none of the {len(rows)} held-out pairs is left to score within {max_length} tokens "
                         f"(dropped: {dropped})")
    return PairTargets(pairs, pad_id_of(tokenizer), dropped or None)


@torch.no_grad()
def compare_reward_models(base: Any, candidate: Any, targets: PairTargets, batch_size: int = 16) -> dict[str, Any]:
    """Both reward models' scores of every held-out pair's chosen and rejected completion (the same batches, so the
    same padding): pairs, pairwise_accuracy and base_pairwise_accuracy (chosen strictly above rejected),
    preference_agreement (the share of pairs where both models' call, chosen above or not, is the same), and
    mean_abs_score_diff / max_abs_score_diff over every scored completion."""
    calls_b, calls_c, diffs = [], [], []
    for start in range(0, len(targets.pairs), batch_size):
        chunk = targets.pairs[start:start + batch_size]
        batch = collate_pairs(chunk, targets.pad)
        sb, sc = sequence_scores(base, batch).cpu(), sequence_scores(candidate, batch).cpu()
        n = len(chunk)
        calls_b.append(sb[:n] > sb[n:])
        calls_c.append(sc[:n] > sc[n:])
        diffs.append((sc - sb).abs())
    b, c, d = torch.cat(calls_b), torch.cat(calls_c), torch.cat(diffs).double()
    return {"pairs": len(targets.pairs), "pairwise_accuracy": float(c.double().mean()),
            "base_pairwise_accuracy": float(b.double().mean()),
            "preference_agreement": float((b == c).double().mean()),
            "mean_abs_score_diff": float(d.mean()), "max_abs_score_diff": float(d.max())}


@torch.no_grad()
def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float()


@torch.no_grad()
def compare_on_texts(base: Any, candidate: Any,
                     token_ids: Iterable[list[int] | tuple[list[int], int]]) -> tuple[float, float, float, int]:
    """(candidate perplexity, base perplexity, top-1 agreement, positions) over the same held-out token ids.

    An item is a list of ids (every token after the first is scored) or (ids, start): only tokens from index
    `start` on are scored — e.g. a completion after its prompt (`heldout_targets`)."""
    nll_c = nll_b = 0.0
    agree = positions = 0
    for item in token_ids:
        ids, start = (item, 1) if isinstance(item, list) else (list(item[0]), max(1, int(item[1])))
        if len(ids) <= start:
            continue
        target = torch.tensor(ids[start:])
        lb, lc = _logits(base, ids)[start - 1:-1].cpu(), _logits(candidate, ids)[start - 1:-1].cpu()
        nll_b += float(torch.nn.functional.cross_entropy(lb, target, reduction="sum"))
        nll_c += float(torch.nn.functional.cross_entropy(lc, target, reduction="sum"))
        agree += int((lb.argmax(-1) == lc.argmax(-1)).sum())
        positions += len(ids) - start
    if positions == 0:
        raise ValueError("no held-out text with at least two tokens to measure on")
    return math.exp(nll_c / positions), math.exp(nll_b / positions), agree / positions, positions


@dataclass(frozen=True)
class GenerationSpeed:
    """Greedy tokens/s: the median of the timed runs, and each run's, in the order they ran."""

    median: float
    repeats: list[float]


@torch.no_grad()
def greedy_tokens_per_s(model: Any, prompt_ids: list[int], new_tokens: int = SPEED_NEW_TOKENS,
                        repeats: int = SPEED_REPEATS) -> GenerationSpeed:
    """Greedy generation speed with the KV cache (HF generate), EOS ignored so every run makes `new_tokens`.

    One untimed warm-up generation of the same length comes first, so that one-time costs (lazy initialisation,
    kernel and allocator warm-up, first touches of freshly loaded weights, the cache growing to its full length)
    are not timed; then `repeats` timed generations. The median is robust to one run slowed by other work on the
    machine, and the repeats say how much the runs differed."""
    if repeats < 1 or new_tokens < 1:
        raise ValueError(f"need at least one timed run of at least one token, got repeats={repeats}, "
                         f"new_tokens={new_tokens}")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)

    def run() -> int:
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(device)
        return out.shape[1] - ids.shape[1]

    run()  # warm-up, untimed
    speeds = []
    for _ in range(repeats):
        started = time.perf_counter()
        made = run()
        speeds.append(made / (time.perf_counter() - started))
    return GenerationSpeed(statistics.median(speeds), speeds)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timed run ends when its tokens exist (`generate` returns them on the host
    already, so this is a second line of defence)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_artifact(base: Any, base_dir: str | Path, artifact: str | Path, load: Callable[[], Any],
                     targets: HeldoutTargets | PairTargets, prompt_ids: list[int], runtime: str) -> ArtifactMeasurement:
    """Load the artifact with `load` (timed), then measure it against `base` on `targets` (a reward model's on
    `PairTargets`: see the module docstring)."""
    started = time.perf_counter()
    candidate = load()
    load_seconds = time.perf_counter() - started
    candidate.eval()
    if isinstance(targets, PairTargets):
        return ArtifactMeasurement(artifact_size(artifact), weights_size_bytes(base_dir), round(load_seconds, 4),
                                   None, runtime, None, None, None, None, targets.scored_on, targets.scored_rows,
                                   None, reward=compare_reward_models(base, candidate, targets),
                                   notes=[NOT_FOR_REWARD_MODELS])
    ppl, base_ppl, agreement, positions = compare_on_texts(base, candidate, targets)
    speed = greedy_tokens_per_s(candidate, prompt_ids)
    return ArtifactMeasurement(artifact_size(artifact), weights_size_bytes(base_dir), round(load_seconds, 4),
                               round(speed.median, 2), runtime, ppl, base_ppl, agreement, positions,
                               targets.scored_on, dict(targets.scored_rows), targets.max_new_tokens,
                               tokens_per_s_repeats=[round(v, 2) for v in speed.repeats])
