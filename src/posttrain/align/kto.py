"""KTO (Ethayarajh et al. 2024): alignment from unpaired binary feedback, with a batch-estimated KL reference point.

Guarantees:
- rows are normalised unpaired rows ({"prompt", "completion", "label": bool}); rows whose completion is emptied by
  truncation are dropped and counted (ALGORITHMS.md pitfall 14);
- every micro-batch holds distinct rows (an epoch boundary never puts a row twice in one micro-batch), drawn from a
  seeded reshuffle of all rows each epoch, so batches mix labels whatever the order of the file;
- the KL reference point z₀ of a micro-batch is estimated on mismatched pairs: example i's prompt with the
  completion of example `kl_partners(n)[i]` = (i − 1) mod n of the same micro-batch (TRL's rotation), so no example
  is ever paired with its own completion for any batch size ≥ 2; batch size 1 is refused (pitfall 11). z₀ is
  computed without gradient and clamped at 0;
- each example's loss depends only on its own log-ratio and z₀, so a micro-batch holding one label is finite and
  meaningful (pitfall 12); the loss of a step is the mean over the window's examples;
- the reference equals the initial policy in both modes ("copy": a frozen copy; "precompute": reference log-probs of
  the whole training schedule computed by the initial policy before the first update, no second model held), so at
  step 0 the loss is exactly 0.5 (for λ_D = λ_U = 1) and kl is 0 (pitfall 17), and the two modes train alike.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data.collate import CompletionBatch, collate_completions
from ..data.tokenize import EncodedCompletion, encode_completion
from .batching import cycle_batches
from .engine import Engine, LossOutput, TrainOptions, TrainResult, disable_dropout, set_seed, train_loop
from .logprobs import sequence_logprobs, shared_prompt_logprobs
from .losses import kto_kl_baseline, kto_loss
from .reference import ReferenceMode, make_reference, run_frozen
from .sft import pad_id_of


@dataclass
class KTOSettings:
    """Hyper-parameters; defaults are the paper's (β = 0.1, λ_D = λ_U = 1)."""

    beta: float = 0.1
    desirable_weight: float = 1.0  # λ_D
    undesirable_weight: float = 1.0  # λ_U
    reference: ReferenceMode = "copy"


@dataclass(frozen=True)
class EncodedExample:
    encoded: EncodedCompletion
    label: bool
    index: int  # position among the kept examples: the identity used to keep micro-batch rows distinct


@dataclass
class KTOMicroBatch:
    examples: list[EncodedExample]
    ref: torch.Tensor | None = None  # precomputed reference log-probs of the examples ("precompute" mode)
    kl_ref: torch.Tensor | None = None  # ... and of their KL pairs


def unpair_preferences(rows: Sequence[dict], seed: int = 0) -> list[dict]:
    """Preference rows -> unpaired rows: each pair gives a True row (chosen) and a False row (rejected).

    The result is shuffled with `seed`, so consecutive rows (and hence batches cut from them in order) are not
    single-label, unlike a chosen-block-then-rejected-block conversion."""
    out: list[dict] = []
    for row in rows:
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    random.Random(seed).shuffle(out)
    return out


def kl_partners(n: int) -> list[int]:
    """For a micro-batch of n examples, the example whose completion is paired with example i's prompt to
    estimate z₀: (i − 1) mod n, i.e. (x_1, y_n), (x_2, y_1), ... Never i itself for n ≥ 2; n < 2 is refused."""
    if n < 2:
        raise ValueError(f"KTO needs at least 2 examples per micro-batch to pair prompts with other examples' "
                         f"completions for its KL reference point, got {n}")
    return [(i - 1) % n for i in range(n)]


def encode_unpaired(tokenizer: Any, rows: Sequence[dict],
                    options: TrainOptions) -> tuple[list[EncodedExample], dict[str, int]]:
    examples: list[EncodedExample] = []
    dropped: dict[str, int] = {}
    for row in rows:
        enc = encode_completion(tokenizer, row["prompt"], row["completion"], max_length=options.max_length,
                                max_prompt_length=options.max_prompt_length)
        if enc is None:
            dropped["empty_after_truncation"] = dropped.get("empty_after_truncation", 0) + 1
        else:
            examples.append(EncodedExample(enc, bool(row["label"]), len(examples)))
    return examples, dropped


def collate_examples(examples: Sequence[EncodedExample], pad: int) -> CompletionBatch:
    return collate_completions([(e.encoded.prompt_ids, e.encoded.completion_ids) for e in examples], pad)


def collate_kl_pairs(examples: Sequence[EncodedExample], pad: int, max_length: int) -> CompletionBatch:
    """Row i: example i's prompt ids + the completion ids of example `kl_partners(n)[i]`, cut to the row's budget.

    The spliced completion is example j's own completion ids: encode_completion tokenizes prompt and completion
    separately, so no token straddles the new boundary and no re-tokenization is needed. Example i's own completion
    fitted after its prompt, so the budget max_length − len(prompt_i) is ≥ 1 and no KL row is empty."""
    rows = []
    for e, j in zip(examples, kl_partners(len(examples))):
        prompt = e.encoded.prompt_ids
        rows.append((prompt, examples[j].encoded.completion_ids[:max_length - len(prompt)]))
    return collate_completions(rows, pad)


def example_and_kl_logprobs(model: Any, examples: Sequence[EncodedExample], pad: int,
                            max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of each example and of its KL row (its prompt + its partner's completion, as in
    `collate_kl_pairs`), with each prompt run once for both (`shared_prompt_logprobs`, K = 2)."""
    partners = kl_partners(len(examples))
    completions = [[e.encoded.completion_ids,
                    examples[j].encoded.completion_ids[:max_length - len(e.encoded.prompt_ids)]]
                   for e, j in zip(examples, partners)]
    sums, _ = shared_prompt_logprobs(model, [e.encoded.prompt_ids for e in examples], completions, pad)
    pairs = sums.view(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def policy_logprobs(model: Any, examples: Sequence[EncodedExample], pad: int,
                    max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's summed completion log-probs of each example (with gradients) and of its KL row (without: z₀ is
    not back-propagated). Two passes rather than one shared-prompt pass: in a joint pass the KL rows would sit in
    the same tensors as the examples and the backward would run over them too, at zero gradient."""
    own = collate_completions([(e.encoded.prompt_ids, e.encoded.completion_ids) for e in examples], pad)
    logps, _ = sequence_logprobs(model, own)
    with torch.no_grad():
        kl_logps, _ = sequence_logprobs(model, collate_kl_pairs(examples, pad, max_length))
    return logps, kl_logps


def distinct_micro_batches(examples: Sequence[EncodedExample], batch_size: int,
                           seed: int) -> Iterator[list[EncodedExample]]:
    """Endless micro-batches of `batch_size` distinct examples in seeded, per-epoch reshuffled order.

    Built on `cycle_batches`' epoch order; a row drawn while its earlier copy (from the previous epoch) is already
    in the micro-batch is held back for the next one, so rows are never duplicated inside a micro-batch (a
    duplicate could be paired with its own completion). Needs at least `batch_size` examples."""
    if len(examples) < batch_size:
        raise ValueError(f"KTO needs at least batch_size={batch_size} examples to fill a micro-batch with distinct "
                         f"rows, got {len(examples)}")
    items = (b[0] for b in cycle_batches(examples, 1, seed))
    held: list[EncodedExample] = []
    while True:
        batch: list[EncodedExample] = []
        seen: set[int] = set()
        waiting, held = held, []
        for e in waiting:
            if e.index in seen or len(batch) == batch_size:
                held.append(e)
            else:
                batch.append(e)
                seen.add(e.index)
        while len(batch) < batch_size:  # ends: every epoch offers all >= batch_size distinct rows
            e = next(items)
            if e.index in seen:
                held.append(e)
            else:
                batch.append(e)
                seen.add(e.index)
        yield batch


def _warn_if_imbalanced(examples: Sequence[EncodedExample], settings: KTOSettings) -> None:
    n_d = sum(e.label for e in examples)
    n_u = len(examples) - n_d
    if n_d == 0 or n_u == 0:
        warnings.warn(f"KTO data holds a single label ({n_d} desirable, {n_u} undesirable); the loss is defined "
                      "but only one side of the value function is trained", stacklevel=3)
        return
    ratio = settings.desirable_weight * n_d / (settings.undesirable_weight * n_u)
    if not 1.0 <= ratio <= 4.0 / 3.0:
        # Ethayarajh et al. 2024 (bounds from eq. 8): λ_D·n_D / (λ_U·n_U) in [1, 4/3] is the recommended range.
        warnings.warn(f"λ_D·n_D / (λ_U·n_U) = {ratio:.3f} is outside the paper's recommended [1, 4/3] "
                      f"({n_d} desirable, {n_u} undesirable); consider adjusting desirable/undesirable_weight",
                      stacklevel=3)


def train_kto(model: Any, tokenizer: Any, rows: Sequence[dict], options: TrainOptions,
              settings: KTOSettings | None = None,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train `model` in place with KTO on normalised unpaired rows ({"prompt", "completion", "label"}).

    Metrics per step: loss, kl (z₀, mean over micro-batches), rewards/chosen and rewards/rejected (β·ρ means,
    present when the window holds that label), rewards/margins (mean over micro-batches holding both labels),
    logps/chosen, logps/rejected, count/desirable and count/undesirable (examples in the window)."""
    settings = settings or KTOSettings()
    if options.batch_size < 2:
        raise ValueError("KTO needs batch_size >= 2: its KL reference point pairs each prompt with another "
                         "example's completion in the same micro-batch, and with one example the only completion "
                         "is its own (the KL term would equal the reward; ALGORITHMS.md pitfall 11)")
    set_seed(options.seed)
    disable_dropout(model)
    examples, dropped = encode_unpaired(tokenizer, rows, options)
    if not examples:
        raise ValueError(f"no KTO rows left to train on after tokenization (dropped: {dropped})")
    _warn_if_imbalanced(examples, settings)
    pad = pad_id_of(tokenizer)
    batches = distinct_micro_batches(examples, options.batch_size, options.seed)

    def next_window() -> list[KTOMicroBatch]:
        return [KTOMicroBatch(next(batches)) for _ in range(options.grad_accum)]

    ref_model = None
    if settings.reference == "precompute":
        # Pairs change with every micro-batch, so the whole schedule is drawn first and scored by the initial policy.
        schedule = [next_window() for _ in range(options.steps)]
        for m in (m for window in schedule for m in window):  # one micro-batch at a time: only floats are kept
            m.ref, m.kl_ref = run_frozen(
                model, lambda net, ex=m.examples: example_and_kl_logprobs(net, ex, pad, options.max_length))
        feed: Iterator[list[KTOMicroBatch]] = iter(schedule)
    else:
        ref_model = make_reference(model, settings.reference)
        feed = (next_window() for _ in range(options.steps))

    def loss_fn(micro: KTOMicroBatch) -> LossOutput:
        n = len(micro.examples)
        logps, kl_logps = policy_logprobs(model, micro.examples, pad, options.max_length)
        if ref_model is not None:
            ref, kl_ref = ref_model.run(lambda net: example_and_kl_logprobs(net, micro.examples, pad,
                                                                            options.max_length))
        else:
            ref, kl_ref = micro.ref, micro.kl_ref
        z0 = kto_kl_baseline(kl_logps, kl_ref)
        labels = torch.tensor([e.label for e in micro.examples], dtype=torch.bool, device=logps.device)
        losses, rewards = kto_loss(logps, ref, labels, z0, settings.beta, settings.desirable_weight,
                                   settings.undesirable_weight)
        out = LossOutput(losses.sum(), float(n))
        out.add_metric("kl", float(z0), 1)
        chosen, rejected = rewards[labels], rewards[~labels]
        for name, mask, r in (("chosen", labels, chosen), ("rejected", ~labels, rejected)):
            if r.numel():
                out.add_metric(f"rewards/{name}", float(r.sum()), r.numel())
                out.add_metric(f"logps/{name}", float(logps.detach()[mask].sum()), r.numel())
        if chosen.numel() and rejected.numel():
            out.add_metric("rewards/margins", float(chosen.mean() - rejected.mean()), 1)
        # Averaged per micro-batch by the engine, multiplied back to window totals after the step.
        out.add_metric("count/desirable", float(chosen.numel()), 1)
        out.add_metric("count/undesirable", float(rejected.numel()), 1)
        return out

    engine = Engine(model, options, tokenizer=tokenizer)
    result = TrainResult(steps=0, dropped=dropped, rows=len(examples))

    def finish(metrics: dict[str, float], window: list) -> None:
        for key in ("count/desirable", "count/undesirable"):
            metrics[key] = float(round(metrics[key] * len(window)))

    return train_loop(engine, feed, loss_fn, options.steps, result, on_step, finish)
