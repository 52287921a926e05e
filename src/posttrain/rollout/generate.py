"""Batched generation with the KV cache (HF ``model.generate``), cut at the first end-of-sequence token.

Guarantees:
- Prompts are left-padded together with an attention mask, so every prompt's continuation starts right after
  its own last token; ``pad_token_id`` is always set (the tokenizer's pad, else the first eos).
- Sampling uses exactly the ``temperature``/``top_k``/``top_p`` given and nothing else: ``top_k=0`` and
  ``top_p=1.0`` are off, and no other logits processor (repetition penalty, min-p, typical-p, bad words, ...)
  can slip in from the model's ``generation_config``: for the duration of the call the model's
  ``generation_config`` is replaced by a neutral one (and restored afterwards, even on error), and every knob
  is passed explicitly. Greedy decoding (``do_sample=False``) ignores the sampling knobs.
- ``seed`` given: the call is deterministic for a given model, inputs, machine and torch build. Sampling then
  runs inside ``torch.random.fork_rng`` seeded with ``seed``, so the caller's global RNG state is the same
  after the call as before it. ``seed=None``: the global RNG is used (and advanced) as is.
- Each returned ``Generation`` holds the prompt ids (unpadded), the completion ids cut right after the first
  end-of-sequence token (eos INCLUDED, ``finished=True``) or all generated tokens when none was produced
  (``finished=False``), and the decoded completion without special tokens.
- Order: prompt 0's ``num_return_sequences`` generations, then prompt 1's, and so on.
- The model is put in eval mode for the call (no dropout in rollouts) and its previous mode is restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig


@dataclass(frozen=True)
class Generation:
    """One generated continuation of ``prompt_ids`` (see the module docstring for what each field holds)."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finished: bool


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a generation: the tokenizer's eos plus any the model's generation config lists
    (chat models often stop on an end-of-turn token the tokenizer does not call eos)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        for i in configured if isinstance(configured, (list, tuple)) else [configured]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an eos token")
    return ids


def _pad_left(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def _neutral_generation_config(model: Any) -> Iterator[None]:
    # generate() fills every knob we leave unset from model.generation_config; swapping in an empty config means
    # only what we pass (plus transformers' own neutral global defaults) can shape the distribution.
    # A wrapper (e.g. a peft model) delegates generate() to the model it wraps, which reads its own config.
    owners: list[Any] = [model]
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else None
    if base is not None and base is not model:
        owners.append(base)
    saved = [owner.generation_config for owner in owners]
    try:
        for owner in owners:
            owner.generation_config = GenerationConfig()
        yield
    finally:
        for owner, config in zip(owners, saved):
            owner.generation_config = config


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate(model: Any, tokenizer: Any, prompt_ids: list[list[int]], *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_return_sequences: int = 1, seed: int | None = None) -> list[Generation]:
    """Generate up to ``max_new_tokens`` tokens after each prompt (a list of token-id lists, unpadded).

    Returns ``len(prompt_ids) * num_return_sequences`` generations in prompt order. Raises ``ValueError`` for an
    empty prompt or invalid sampling settings.
    """
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError("max_new_tokens and num_return_sequences must be >= 1")
    if do_sample and (temperature <= 0 or top_k < 0 or not 0 < top_p <= 1):
        raise ValueError(f"bad sampling settings temperature={temperature} top_k={top_k} top_p={top_p}")

    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    input_ids, attention_mask = _pad_left([list(p) for p in prompt_ids], pad_id, device)

    knobs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1,
        num_return_sequences=num_return_sequences, eos_token_id=eos_ids, pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id, use_cache=True, repetition_penalty=1.0, no_repeat_ngram_size=0,
    )
    if do_sample:
        # Explicit "off" values: top_k=None would be filled with transformers' default of 50.
        knobs.update(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), typical_p=1.0,
                     epsilon_cutoff=0.0, eta_cutoff=0.0)
    config = GenerationConfig(**knobs)

    was_training = model.training
    model.eval()
    try:
        with _neutral_generation_config(model), _seeded(seed, device), torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.train(was_training)

    new_tokens = out[:, input_ids.shape[1]:].tolist()
    eos_set = set(eos_ids)
    results: list[Generation] = []
    for row, tokens in enumerate(new_tokens):
        index = row // num_return_sequences
        cut = next((i for i, t in enumerate(tokens) if t in eos_set), None)
        completion = tokens if cut is None else tokens[:cut + 1]
        results.append(Generation(
            prompt_index=index,
            prompt_ids=list(prompt_ids[index]),
            completion_ids=completion,
            text=tokenizer.decode(completion, skip_special_tokens=True),
            finished=cut is not None,
        ))
    return results
