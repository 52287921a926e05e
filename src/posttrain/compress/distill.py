"""Distilling a teacher into a student through the shared training engine: logit, feature and progressive KD,
teacher-assistant chains, and prune-then-distill.

Guarantees:
- Teacher and student must share a tokenizer: both LM heads must cover the tokenizer, and when the teacher's own
  tokenizer is given it must have the same size and the same token → id map; otherwise `VocabMismatchError` says what
  differs. When the two heads are padded to different sizes (same tokenizer), logits are compared over the
  tokenizer's ids only.
- The loss over a micro-batch is a sum over supervised tokens (completion tokens of normalised SFT rows, every
  token after the first of a plain text) and `engine.train_loop` normalises it by the window's token count, so the
  micro-batch split does not change the update. The teacher runs in eval mode without gradients and is never
  changed; the student's dropout is switched off (in place, as TRL does for its distillation trainers) unless
  `disable_dropout=False`.
- Feature KD trains the projections with the student: the engine is given one module holding both, whose
  `save_pretrained` writes the student as a plain HF model plus the projections beside it; the engine itself is not
  changed.
- Progressive KD anneals τ linearly from `temperature` (first step) to `final_temperature` (last step) and, when
  `freeze_bottom_up`, splits the run into one stage per student block and freezes blocks 0..k−1 during stage k (the
  lower blocks are distilled first and then held; their projections too). Frozen parameters get no gradient, so
  AdamW leaves them untouched; every parameter's `requires_grad` is restored afterwards.
- Teacher-assistant chains (TAKD, Mirzadeh et al. 2020) distil teacher → assistant → … → student in turn;
  prune-then-distill (Minitron, Muralidharan et al. 2024) copies the teacher, removes layers (Block Influence) and
  width (activation importance) from one calibration pass, then retrains it with logit-only forward-KL KD.
- Rows of every kind the pipeline has are accepted (`as_distillation_rows`): demonstrations and KTO rows by their
  completion, preference pairs by the chosen completion, prompts without a completion (verifiable prompts, whose
  `answer` holds only the normalised final answer, or prompt-only rows) by the teacher's own greedy completion
  (sequence-level KD), plain texts on every token.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..align.batching import windows
from ..align.engine import Engine, LossOutput, TrainOptions, TrainResult, disable_dropout, set_seed, train_loop
from ..align.sft import encode_sft_rows, pad_id_of
from ..data.collate import CompletionBatch, collate_masked
from ..data.tokenize import encode_prompt
from ..rollout.generate import generate
from .distill_losses import (Divergence, FeatureProjector, distillation_terms, hidden_state_loss, token_divergence,
                             uniform_layer_map)
from .structured import HeadMode, Importance, compute_importance, decoder_layers, prune_depth, prune_width

StepCallback = Callable[[int, dict[str, float]], None]


class VocabMismatchError(ValueError):
    """Teacher and student do not share a vocabulary, so their token distributions cannot be compared."""


class DistillSettings(BaseModel):
    """What to distil and how; the loop's own settings (steps, lr, batch) are `TrainOptions`.

    kind "logit": α · CE + (1 − α) · τ² · divergence on the logits. "feature": logit_weight × that + feature_weight
    × the hidden-state loss through learned projections. "progressive": as "feature" (logits only when
    feature_weight = 0), with τ annealed to final_temperature and blocks frozen bottom-up."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["logit", "feature", "progressive"] = "logit"
    loss: Divergence = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="GJSD mixture weight of the teacher (0 = forward KL, "
                                                     "1 = reverse KL); the GKD paper's and TRL GKD's default 0.5")
    temperature: float = Field(1.0, gt=0, description="τ of the divergence (× τ²); first-step τ when annealed")
    final_temperature: float | None = Field(None, gt=0, description="progressive: last-step τ (default 1.0)")
    alpha: float = Field(0.0, ge=0, le=1, description="weight of CE on the data's tokens; 1 − α on the divergence")
    logit_weight: float = Field(1.0, ge=0, description="feature/progressive: weight of the logit term")
    feature_weight: float = Field(1.0, ge=0, description="feature/progressive: weight of the hidden-state term")
    feature_loss: Literal["mse", "cosine"] = "mse"
    layer_map: list[tuple[int, int]] | None = Field(None, description="(student layer, teacher layer) pairs; "
                                                                      "uniform when None")
    projection: Literal["linear", "identity"] = "linear"
    freeze_bottom_up: bool = True
    disable_dropout: bool = True
    teacher_max_new_tokens: int = Field(64, ge=1, description="rows without a completion: the length cap of the "
                                                              "teacher's greedy completion distilled on")


# -- vocabulary --------------------------------------------------------------------------------------------------
def _head_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_shared_vocab(teacher: nn.Module, student: nn.Module, tokenizer: Any, teacher_tokenizer: Any = None) -> int:
    """Raise `VocabMismatchError` unless teacher and student share the vocabulary; returns how many logits to
    compare (the common head size, or the tokenizer's size when the heads are padded differently)."""
    n = len(tokenizer)
    if teacher_tokenizer is not None and teacher_tokenizer is not tokenizer:
        t_vocab, s_vocab = teacher_tokenizer.get_vocab(), tokenizer.get_vocab()
        if t_vocab != s_vocab:
            differ = sorted(tok for tok in set(t_vocab) | set(s_vocab) if t_vocab.get(tok) != s_vocab.get(tok))
            examples = ", ".join(f"{tok!r}: teacher {t_vocab.get(tok)} / student {s_vocab.get(tok)}"
                                 for tok in differ[:5])
            raise VocabMismatchError(
                f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens; {len(differ)} "
                f"tokens map to different ids, e.g. {examples}): logit distillation needs one shared tokenizer")
    t_size, s_size = _head_size(teacher), _head_size(student)
    for who, size in (("teacher", t_size), ("student", s_size)):
        if size < n:
            raise VocabMismatchError(f"the {who}'s LM head has {size} outputs but the tokenizer has {n} tokens: "
                                     "it was not built for this tokenizer")
    return t_size if t_size == s_size else n


# -- data --------------------------------------------------------------------------------------------------------
def as_distillation_rows(teacher: nn.Module, tokenizer: Any, rows: Sequence[dict | str], *, max_new_tokens: int = 64,
                         batch_size: int = 32) -> tuple[list[dict | str], dict[str, int], dict[str, int]]:
    """Normalised rows of any kind -> what distillation trains on (SFT rows and plain texts), in order.

    Returns (rows, sources, dropped): `sources` counts where the supervised tokens came from ("completion": SFT and
    KTO rows, whose label does not matter because the target is the teacher's distribution, not the tokens;
    "chosen": preference pairs; "teacher": rows with a prompt and no completion; "text": plain strings).
    A verifiable row's `answer` is only the normalised final answer (e.g. "42", see data/schema.py), not the worked
    solution the task's demonstrations hold (tasks.arithmetic.sft_rows), so it is not used as a completion: such
    rows, and prompt-only rows, are completed by the teacher (greedy, up to `max_new_tokens`; Kim & Rush 2016's
    sequence-level KD), and the student learns the teacher's distribution on what the teacher actually says. An
    empty teacher completion drops the row ("empty_teacher_completion" in `dropped`). A row with neither a prompt nor
    a completion is refused naming its 1-based number and fields."""
    out: list[dict | str | None] = []
    sources: dict[str, int] = {}
    pending: list[tuple[int, dict]] = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(row)
            source = "text"
        elif isinstance(row, dict) and row.get("completion"):
            out.append({"prompt": row.get("prompt", []), "completion": row["completion"]})
            source = "completion"
        elif isinstance(row, dict) and row.get("chosen"):
            out.append({"prompt": row.get("prompt", []), "completion": row["chosen"]})
            source = "chosen"
        elif isinstance(row, dict) and row.get("prompt"):
            out.append(None)
            pending.append((i, row))
            source = "teacher"
        else:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"distillation row {i + 1}: expected a text or a normalised row with 'prompt' and "
                             f"'completion', 'chosen' (pairs) or only 'prompt'; got {fields}")
        sources[source] = sources.get(source, 0) + 1
    dropped: dict[str, int] = {}
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        gens = generate(teacher, tokenizer, [encode_prompt(tokenizer, row["prompt"]) for _, row in chunk],
                        max_new_tokens=max_new_tokens)
        for (i, row), gen in zip(chunk, gens):
            if gen.text.strip():
                out[i] = {"prompt": row["prompt"], "completion": [{"role": "assistant", "content": gen.text}]}
            else:
                dropped["empty_teacher_completion"] = dropped.get("empty_teacher_completion", 0) + 1
    return [r for r in out if r is not None], sources, dropped


def encode_rows(tokenizer: Any, rows: Sequence[dict | str],
                options: TrainOptions) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """(ids, supervision mask) per row: SFT rows supervise their completion; texts every token (the first token has
    no prediction, so a text needs two). Other kinds go through `as_distillation_rows` first."""
    encoded, dropped = [], {}
    for i, row in enumerate(rows):
        if not isinstance(row, str) and not (isinstance(row, dict) and row.get("completion")):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"distillation row {i + 1} has no completion (got {got}): convert it with "
                             "as_distillation_rows (pairs: the chosen side; prompts: the teacher's completion)")
        if isinstance(row, str):
            ids = list(tokenizer(row)["input_ids"])[:options.max_length]
            if len(ids) < 2:
                dropped["too_short"] = dropped.get("too_short", 0) + 1
                continue
            encoded.append((ids, [1] * len(ids)))
        else:
            enc, drop = encode_sft_rows(tokenizer, [row], options)
            encoded.extend(enc)
            for k, v in drop.items():
                dropped[k] = dropped.get(k, 0) + v
    return encoded, dropped


class _BlockOutputs:
    """Captures each decoder block's output hidden states while a forward runs (hooks, so the raw block outputs
    are taken the same way on every transformers version)."""

    def __init__(self, model: nn.Module):
        self.outputs: list[torch.Tensor | None] = []
        self._layers = decoder_layers(model)
        self._handles: list[Any] = []

    def __enter__(self) -> "_BlockOutputs":
        self.outputs = [None] * len(self._layers)

        def hook(i: int):
            def record(_module, _args, out):
                self.outputs[i] = out[0] if isinstance(out, (tuple, list)) else out
            return record

        self._handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self._layers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def _forward(model: nn.Module, batch: CompletionBatch, capture: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits [B, T-1, V] predicting tokens 1.., block outputs at the same positions when `capture`)."""
    batch = batch.to(next(model.parameters()).device)
    blocks = _BlockOutputs(model) if capture else None
    with blocks if blocks is not None else contextlib.nullcontext():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
    return logits[:, :-1], [h[:, :-1] for h in blocks.outputs] if blocks is not None else []


class StudentWithProjector(nn.Module):
    """What the engine trains in feature KD: the student and its projections. `save_pretrained` writes the student
    as a plain HF model and the projections beside it (`distill_projector.safetensors`)."""

    def __init__(self, student: nn.Module, projector: FeatureProjector):
        super().__init__()
        self.student = student
        self.projector = projector

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        from safetensors.torch import save_file

        from ..models.files import give_umask_modes

        self.student.save_pretrained(directory, **kwargs)
        state = {k: v.detach().contiguous() for k, v in self.projector.state_dict().items()}
        if state:
            save_file(state, str(Path(directory) / "distill_projector.safetensors"))
        give_umask_modes(directory)


# -- the trainer -------------------------------------------------------------------------------------------------
def distill(teacher: nn.Module, student: nn.Module, tokenizer: Any, rows: Sequence[dict | str],
            options: TrainOptions, settings: DistillSettings | None = None, on_step: StepCallback | None = None, *,
            teacher_tokenizer: Any = None) -> TrainResult:
    """Train `student` in place to match `teacher` on `rows` (normalised SFT rows or plain texts)."""
    settings = settings or DistillSettings()
    if settings.final_temperature is not None and settings.kind != "progressive":
        raise ValueError("final_temperature anneals τ in progressive KD only; set kind='progressive' or drop it")
    vocab = check_shared_vocab(teacher, student, tokenizer, teacher_tokenizer)
    set_seed(options.seed)
    rows, _, generation_dropped = as_distillation_rows(teacher, tokenizer, rows,
                                                       max_new_tokens=settings.teacher_max_new_tokens)
    encoded, dropped = encode_rows(tokenizer, rows, options)
    for k, v in generation_dropped.items():
        dropped[k] = dropped.get(k, 0) + v
    if not encoded:
        raise ValueError(f"no rows left to distil on after tokenization (dropped: {dropped})")
    pad = pad_id_of(tokenizer)
    teacher.eval()
    if settings.disable_dropout:
        disable_dropout(student)
    progressive = settings.kind == "progressive"
    features = settings.kind == "feature" or (progressive and settings.feature_weight > 0)
    s_blocks = decoder_layers(student)
    projector, layer_map = None, []
    trainable: nn.Module = student
    if features:
        n_t = len(decoder_layers(teacher))
        layer_map = settings.layer_map or uniform_layer_map(len(s_blocks), n_t)
        bad = [(s, t) for s, t in layer_map if not (0 <= s < len(s_blocks) and 0 <= t < n_t)]
        if bad:
            raise ValueError(f"layer map pairs {bad} are outside student 0..{len(s_blocks) - 1} / "
                             f"teacher 0..{n_t - 1}")
        projector = FeatureProjector(student.config.hidden_size, teacher.config.hidden_size, len(layer_map),
                                     settings.projection).to(next(student.parameters()).device)
        trainable = StudentWithProjector(student, projector)
    engine = Engine(trainable, options, tokenizer=tokenizer)
    result = TrainResult(steps=0, dropped=dropped, rows=len(encoded))
    state = {"temperature": settings.temperature, "frozen": 0}

    def loss_fn(micro: list[tuple[list[int], list[int]]]) -> LossOutput:
        batch = collate_masked(micro, pad)
        with torch.no_grad():
            t_logits, t_hidden = _forward(teacher, batch, features)
        s_logits, s_hidden = _forward(student, batch, features)
        mask = batch.completion_mask[:, 1:].bool().to(s_logits.device)
        labels = batch.input_ids[:, 1:].to(s_logits.device)
        terms = distillation_terms(s_logits[..., :vocab], t_logits[..., :vocab].to(s_logits.device), mask,
                                   labels=labels, kind=settings.loss, beta=settings.beta,
                                   temperature=state["temperature"], alpha=settings.alpha, reduction="sum")
        count = float(mask.sum())
        total = terms["total"]
        out = LossOutput(total, count)
        if features:
            hidden = hidden_state_loss(s_hidden, t_hidden, projector, layer_map, mask, kind=settings.feature_loss,
                                       reduction="sum")
            out.loss_sum = settings.logit_weight * total + settings.feature_weight * hidden
            out.add_metric("hidden", float(hidden.detach()), count)
        out.add_metric("divergence", float(terms["divergence"].detach()), count)
        if "ce" in terms:
            out.add_metric("ce", float(terms["ce"].detach()), count)
        with torch.no_grad():
            agree = (s_logits[mask][:, :vocab].argmax(-1) == t_logits[mask.to(t_logits.device)][:, :vocab]
                     .argmax(-1).to(s_logits.device)).sum()
        out.add_metric("top1_agreement", float(agree), count)
        out.add_metric("tokens", count, 1)
        out.add_metric("temperature", state["temperature"], 1)
        if progressive:
            out.add_metric("frozen_blocks", state["frozen"], 1)
        return out

    feed: Iterator[Any] = windows(encoded, options.batch_size, options.grad_accum, options.seed)
    saved_flags = [p.requires_grad for p in trainable.parameters()]
    if progressive:
        trainable_ids = {id(p) for p in trainable.parameters() if p.requires_grad}
        feed = _progressive(feed, settings, options.steps, s_blocks, projector, layer_map, state, trainable_ids)
    try:
        return train_loop(engine, feed, loss_fn, options.steps, result, on_step)
    finally:
        for p, flag in zip(trainable.parameters(), saved_flags):
            p.requires_grad_(flag)


def _progressive(feed: Iterator[Any], settings: DistillSettings, steps: int, blocks: nn.ModuleList,
                 projector: FeatureProjector | None, layer_map: list[tuple[int, int]],
                 state: dict[str, Any], trainable: set[int]) -> Iterator[Any]:
    """The feed, with the schedule applied before each step (train_loop takes one window per step). Only
    parameters that were trainable to begin with are ever switched back on (a LoRA student keeps its base frozen)."""

    def train(module: nn.Module, on: bool) -> None:
        for p in module.parameters():
            p.requires_grad_(on and id(p) in trainable)

    start = settings.temperature
    end = settings.final_temperature if settings.final_temperature is not None else 1.0
    for step in range(steps):
        state["temperature"] = start + (end - start) * step / max(1, steps - 1)
        if settings.freeze_bottom_up:
            frozen = step * len(blocks) // steps
            state["frozen"] = frozen
            for i, block in enumerate(blocks):
                train(block, i >= frozen)
            if projector is not None:
                for k, (s_idx, _) in enumerate(layer_map):
                    train(projector.maps[k], s_idx >= frozen)
        yield next(feed)


def distill_chain(teacher: nn.Module, chain: Sequence[nn.Module], tokenizer: Any, rows: Sequence[dict | str],
                  options: TrainOptions, settings: DistillSettings | None = None,
                  on_step: StepCallback | None = None) -> list[TrainResult]:
    """Teacher-assistant KD (Mirzadeh et al. 2020): distil `teacher` into chain[0], then chain[0] into chain[1], and
    so on (e.g. [assistant, student]); one TrainResult per link. `on_step` metrics carry the link as "link"."""
    if not chain:
        raise ValueError("the chain needs at least one model to distil into")
    results, previous = [], teacher
    for link, model in enumerate(chain):
        report = None if on_step is None else (lambda step, m, link=link: on_step(step, {**m, "link": link}))
        results.append(distill(previous, model, tokenizer, rows, options, settings, report))
        previous = model
    return results


def prune_then_distill(teacher: nn.Module, tokenizer: Any, rows: Sequence[dict | str], options: TrainOptions,
                       settings: DistillSettings | None = None, on_step: StepCallback | None = None, *,
                       ffn_fraction: float = 0.0, head_fraction: float = 0.0, head_mode: HeadMode = "kv_groups",
                       n_layers: int = 0, calib_batches: Sequence[Any] | None = None
                       ) -> tuple[nn.Module, TrainResult, dict[str, Any]]:
    """Minitron: copy `teacher`, prune the copy (depth by Block Influence, then width by activation importance, both
    from one calibration pass on the unpruned copy) and retrain it by logit KD from `teacher` (forward KL unless
    `settings` says otherwise). Calibration defaults to the first `options.batch_size` rows. Returns (student,
    TrainResult, pruning stats)."""
    student = copy.deepcopy(teacher)
    settings = settings or DistillSettings(kind="logit", loss="forward_kl")
    rows, _, _ = as_distillation_rows(teacher, tokenizer, rows, max_new_tokens=settings.teacher_max_new_tokens)
    if calib_batches is None:
        encoded, _ = encode_rows(tokenizer, rows[:options.batch_size], options)
        calib_batches = [collate_masked(encoded, pad_id_of(tokenizer))]
    imp = compute_importance(student, calib_batches)
    stats: dict[str, Any] = {}
    kept = list(range(len(decoder_layers(student))))
    if n_layers:
        stats["depth"] = prune_depth(student, None, n_layers, importance=imp)
        kept = stats["depth"]["kept"]
    if ffn_fraction or head_fraction:
        sub = Importance(heads=imp.heads[kept], neurons=imp.neurons[kept], layers=imp.layers[kept],
                         sequences=imp.sequences)
        stats["width"] = prune_width(student, None, ffn_fraction, head_fraction, head_mode=head_mode,
                                     importance=sub)
    result = distill(teacher, student, tokenizer, rows, options, settings, on_step)
    return student, result, stats


@torch.no_grad()
def kd_metrics(teacher: nn.Module, student: nn.Module, tokenizer: Any, rows: Sequence[dict | str],
               options: TrainOptions) -> dict[str, float]:
    """Held-out agreement: mean forward KL(p_T ‖ p_S) at τ = 1 per supervised token and the share of those tokens
    where both models' argmax agree. Raises ValueError when no token is scored (never a made-up 0)."""
    vocab = check_shared_vocab(teacher, student, tokenizer)
    rows, _, _ = as_distillation_rows(teacher, tokenizer, rows)
    encoded, _ = encode_rows(tokenizer, rows, options)
    pad = pad_id_of(tokenizer)
    kl = agree = tokens = 0.0
    for start in range(0, len(encoded), options.batch_size):
        batch = collate_masked(encoded[start:start + options.batch_size], pad)
        t_logits, _ = _forward(teacher.eval(), batch, False)
        s_logits, _ = _forward(student.eval(), batch, False)
        mask = batch.completion_mask[:, 1:].bool()
        s = s_logits[mask.to(s_logits.device)][:, :vocab].float()
        t = t_logits[mask.to(t_logits.device)][:, :vocab].float().to(s.device)
        kl += float(token_divergence(s, t, kind="forward_kl").sum())
        agree += float((s.argmax(-1) == t.argmax(-1)).sum())
        tokens += float(mask.sum())
    if tokens == 0:  # nothing was scored: a KL or agreement here would be an invented number
        raise ValueError("no supervised tokens in the held-out rows: KL and top-1 agreement cannot be measured")
    return {"kl": kl / tokens, "top1_agreement": agree / tokens, "tokens": tokens}
