"""Reward modeling with the Bradley–Terry loss: a scalar head on a language model, trained on preference pairs.

Guarantees:
- the model is a transformers sequence-classification model with one label (`load_reward_model` builds one from a
  causal-LM checkpoint or model: same config and backbone weights, a fresh `score` head);
- a sequence's score is read at its last real token, found from the attention mask (the rightmost position whose
  mask is 1), never from `pad_token_id`: correct for right or left padding and when pad == eos (ALGORITHMS.md
  pitfall 8). transformers' own pooling looks for the last token != pad_token_id, which with pad == eos skips the
  final EOS; we therefore call the backbone ourselves and apply the head at that position;
- prompt + chosen and prompt + rejected are tokenized through the chat template with one shared prompt
  (`preference.encode_pairs`: pairs emptied by truncation or identical after it are dropped and counted) and
  scored in one forward (2B rows); the loss of a step is the mean over the window's pairs;
- metrics: accuracy (chosen score strictly above rejected: ties count as wrong), margin (mean r_w − r_l),
  rewards/chosen, rewards/rejected, rewards/mean and rewards/std (over all scores of the window).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..data.collate import CompletionBatch, collate_completions
from ..data.tokenize import encode_completion
from ..models.loading import ModelSourceError, int8_artifact, locate, refuse_new_weights
from .batching import windows
from .engine import Engine, LossOutput, TrainOptions, TrainResult, disable_dropout, set_seed, train_loop
from .logprobs import shared_prompt_hidden
from .losses import bradley_terry_loss
from .preference import EncodedPair, collate_pairs, encode_pairs
from .sft import pad_id_of


@dataclass
class RewardSettings:
    """`margin_field`: a numeric field of each row used as the Llama-2 margin m; `center_coefficient`: Eisenstein
    et al.'s c (None leaves the centering term out; 0.01 is TRL's recommendation)."""

    margin_field: str | None = None
    center_coefficient: float | None = None


@dataclass
class RewardTrainResult(TrainResult):
    model: Any = None  # the trained reward model (a new object when a path or a causal LM was passed)


def _backbone(model: Any) -> torch.nn.Module:
    """The transformer under the score head (through a peft wrapper, whose own `base_model` is the adapter layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


def _score_head(model: Any) -> torch.nn.Module:
    head = getattr(model, "score", None)
    # Any linear-like head with `out_features` (nn.Linear, or a quantized linear such as compress.int8.Int8Linear).
    if not isinstance(head, torch.nn.Module) or not hasattr(head, "out_features"):
        raise ValueError(f"{type(model).__name__} has no linear `score` head; pass a sequence-classification "
                         "model or build one with load_reward_model")
    if head.out_features != 1:
        raise ValueError(f"a reward model needs one output (num_labels=1), this head has {head.out_features}")
    return head


def reward_model_from_causal_lm(causal_lm: Any) -> Any:
    """A sequence-classification model (num_labels=1) with `causal_lm`'s config and backbone weights (copied) and a
    fresh `score` head initialised by transformers from the torch RNG; the LM head is not used."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(causal_lm.base_model.state_dict())  # strict: the backbones must match
    return model.to(dtype=next(causal_lm.parameters()).dtype)


def load_reward_model(path_or_model: Any, *, dtype: torch.dtype = torch.float32) -> Any:
    """A one-label sequence-classification model from a path ("embedded", a local directory, a hub id) or a model.

    A causal-LM checkpoint gets its backbone loaded and a new `score` head (its lm_head is ignored); a reward-model
    checkpoint (e.g. one saved by `train_reward_model`) loads as it was saved, and one lacking any weight (its
    `score` head included) is refused with `models.loading.UninitialisedWeightsError` naming the path and the
    weights, as is a causal-LM checkpoint lacking any backbone weight. A posttrain int8 artifact of a reward model
    loads through `compress.int8.load_int8` (transformers alone would drop its int8 linears); one of a causal LM is
    refused (a reward model is built from the unquantized checkpoint). A model object that already has a one-output
    `score` head is returned as is; a causal LM object goes through `reward_model_from_causal_lm`."""
    if isinstance(path_or_model, (str, Path)):
        from transformers import AutoModelForSequenceClassification

        path = locate(str(path_or_model))  # a missing directory or malformed id: a clear error before loading
        if int8_artifact(path):
            return _load_int8_reward_model(path, str(path_or_model), dtype)
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                             output_loading_info=True)
        except ModelSourceError:
            raise
        except Exception as exc:  # transformers raises many types; the user needs to know what was asked for
            raise OSError(f"could not load a reward model from {path_or_model!r} ({path}): {exc}") from exc
        # The checkpoint's own architectures (kept by from_pretrained): only a causal LM's gets a fresh head.
        archs = getattr(model.config, "architectures", None) or []
        saved_as_reward_model = any(a.endswith("ForSequenceClassification") for a in archs)
        if saved_as_reward_model:
            refuse_new_weights(model, info, str(path_or_model))
        else:  # a causal LM: the head is new and its lm_head is dropped, as documented
            refuse_new_weights(model, info, str(path_or_model), allowed=("score.weight", "score.bias"),
                               ignored=("lm_head.weight", "lm_head.bias"))
        _score_head(model)
        return model
    if getattr(path_or_model, "score", None) is not None:
        _score_head(path_or_model)
        return path_or_model
    return reward_model_from_causal_lm(path_or_model)


def _load_int8_reward_model(path: str, name: str, dtype: torch.dtype) -> Any:
    from ..compress.int8 import load_int8

    model = load_int8(path)
    if getattr(model, "score", None) is None:
        raise ModelSourceError(f"{name}: an int8-quantized causal LM artifact, not a reward model; build the reward "
                               "model from the unquantized checkpoint it came from")
    _score_head(model)
    return model.to(dtype=dtype)  # int8 tensors stay int8: only floating-point ones are cast


def last_real_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's rightmost position with attention_mask == 1 (right or left padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(dim=1)


def sequence_scores(model: Any, batch: CompletionBatch) -> torch.Tensor:
    """[B] scalar rewards, each read at its row's last real token (see the module guarantees)."""
    head = _score_head(model)
    batch = batch.to(next(model.parameters()).device)
    hidden = _backbone(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False).last_hidden_state
    last = last_real_token_index(batch.attention_mask)
    # The head acts on each position independently, so gathering the hidden state first gives the same score as
    # applying it at every position and gathering, without the [B, T] intermediate.
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked).squeeze(-1).float()


# Whether the shared-prompt path reproduces `sequence_scores`, per model class (checked once, on real inputs).
_SHARED_OK: dict[type, bool] = {}


def pair_scores(model: Any, pairs: Sequence[EncodedPair], pad: int) -> torch.Tensor:
    """[2B] rewards, chosen rows first: each pair's prompt runs once and both completions run on its cached keys
    and values; each score is read at the completion's last real token. Checked against `sequence_scores` on the
    first batch of each model class, with a fallback to it."""
    key = type(model)
    if _SHARED_OK.get(key) is False:
        return sequence_scores(model, collate_pairs(pairs, pad))
    head = _score_head(model)
    completions = [[p.chosen.completion_ids, p.rejected.completion_ids] for p in pairs]
    lengths = torch.tensor([len(c) for cs in completions for c in cs])
    # Only each completion's last state is read: the last layer need not compute the others (logprobs.keep).
    keep = torch.zeros((len(lengths), int(lengths.max())), dtype=torch.bool)
    keep[torch.arange(len(lengths)), lengths - 1] = True
    backbone = _backbone(model)
    states = shared_prompt_hidden(backbone, [p.chosen.prompt_ids for p in pairs], completions, pad,
                                  keep=keep.to(next(backbone.parameters()).device))
    last = states.mask.sum(1) - 1
    picked = states.hidden[torch.arange(states.hidden.shape[0], device=last.device), last]
    scores = head(picked).squeeze(-1).float()
    scores = scores.view(-1, 2).T.reshape(-1)  # (c0, r0, c1, r1, ...) -> (c0, c1, ..., r0, r1, ...)
    if key not in _SHARED_OK:
        with torch.no_grad():
            plain = sequence_scores(model, collate_pairs(pairs, pad))
        _SHARED_OK[key] = bool(torch.allclose(scores.detach(), plain, atol=1e-4, rtol=1e-4))
        if not _SHARED_OK[key]:
            return sequence_scores(model, collate_pairs(pairs, pad))
    return scores


@torch.no_grad()
def score_sequences(model: Any, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 16,
                    max_length: int | None = None, max_prompt_length: int | None = None) -> torch.Tensor:
    """[N] scores of rows {"prompt": messages, "completion": messages}, in eval mode, tokenized like training.

    Raises when truncation leaves a row with no completion token (its score would not be of the completion)."""
    pad = pad_id_of(tokenizer)
    encoded = []
    for i, row in enumerate(rows):
        enc = encode_completion(tokenizer, row["prompt"], row["completion"], max_length=max_length,
                                max_prompt_length=max_prompt_length)
        if enc is None:
            raise ValueError(f"row {i + 1}: no completion token left after truncation to max_length={max_length}")
        encoded.append((enc.prompt_ids, enc.completion_ids))
    was_training = model.training
    model.eval()
    try:
        parts = [sequence_scores(model, collate_completions(encoded[i:i + batch_size], pad))
                 for i in range(0, len(encoded), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0)


def _encode(tokenizer: Any, rows: Sequence[dict], options: TrainOptions,
            margin_field: str | None) -> tuple[list[EncodedPair], list[float], dict[str, int]]:
    pairs: list[EncodedPair] = []
    margins: list[float] = []
    dropped: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        margin = 0.0
        if margin_field is not None:
            value = row.get(margin_field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"row {number}, field {margin_field!r}: expected a finite number (the margin), "
                                 f"got {value!r}")
            margin = float(value)
        # One row at a time, so each kept pair keeps its own row's margin.
        kept, why = encode_pairs(tokenizer, [row], options)
        for reason, count in why.items():
            dropped[reason] = dropped.get(reason, 0) + count
        for pair in kept:
            pairs.append(EncodedPair(pair.chosen, pair.rejected, len(pairs)))
            margins.append(margin)
    return pairs, margins, dropped


def train_reward_model(model_name_or_model: Any, tokenizer: Any, rows: Sequence[dict], options: TrainOptions,
                       settings: RewardSettings | None = None,
                       on_step: Callable[[int, dict[str, float]], None] | None = None) -> RewardTrainResult:
    """Train a Bradley–Terry reward model on normalised preference rows ({"prompt", "chosen", "rejected"}).

    `model_name_or_model` goes through `load_reward_model` after seeding (a reward model passed in is trained in
    place); the trained model is `result.model`. It is saved like any model (`engine.save_pretrained`) and reloads
    with `load_reward_model(directory)`."""
    settings = settings or RewardSettings()
    set_seed(options.seed)
    model = load_reward_model(model_name_or_model)
    disable_dropout(model)
    pairs, margins, dropped = _encode(tokenizer, rows, options, settings.margin_field)
    if not pairs:
        raise ValueError(f"no preference pairs left to train on after tokenization (dropped: {dropped})")
    pad = pad_id_of(tokenizer)
    # Not used by our scoring; set so transformers' own forward can batch and a saved checkpoint records the pad.
    model.config.pad_token_id = pad

    def loss_fn(micro: list[EncodedPair]) -> LossOutput:
        n = len(micro)
        scores = pair_scores(model, micro, pad)
        chosen, rejected = scores[:n], scores[n:]
        margin = (torch.tensor([margins[p.index] for p in micro], dtype=scores.dtype, device=scores.device)
                  if settings.margin_field is not None else None)
        losses = bradley_terry_loss(chosen, rejected, margin, settings.center_coefficient)
        out = LossOutput(losses.sum(), float(n))
        c, r, s = chosen.detach(), rejected.detach(), scores.detach()
        out.add_metric("accuracy", float((c > r).float().sum()), n)
        out.add_metric("margin", float((c - r).sum()), n)
        out.add_metric("rewards/chosen", float(c.sum()), n)
        out.add_metric("rewards/rejected", float(r.sum()), n)
        out.add_metric("rewards/mean", float(s.sum()), 2 * n)
        out.add_metric("rewards/mean_sq", float((s ** 2).sum()), 2 * n)  # turned into rewards/std after the step
        return out

    engine = Engine(model, options, tokenizer=tokenizer)
    result = RewardTrainResult(steps=0, dropped=dropped, rows=len(pairs), model=model)
    feed = windows(pairs, options.batch_size, options.grad_accum, options.seed)

    def finish(metrics: dict[str, float], window: list) -> None:
        mean_sq = metrics.pop("rewards/mean_sq")
        metrics["rewards/std"] = math.sqrt(max(mean_sq - metrics["rewards/mean"] ** 2, 0.0))

    train_loop(engine, feed, loss_fn, options.steps, result, on_step, finish)
    return result
