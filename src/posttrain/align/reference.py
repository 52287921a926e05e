"""Reference models for KL-anchored objectives: a frozen copy, or log-probs precomputed once.

Guarantees: the reference equals the policy *before the first update* in every mode, so at step 0 the log-ratios
are exactly 0 (DPO loss ln 2, KL 0; ALGORITHMS.md pitfall 17); the reference never receives gradients; its
forwards run under `torch.no_grad()`.
"""

from __future__ import annotations

import copy
from typing import Literal, Protocol

import torch

from ..data.collate import CompletionBatch
from .logprobs import sequence_logprobs, token_logprobs

ReferenceMode = Literal["copy", "precompute"]


class Reference(Protocol):
    """What a trainer needs from a reference model: log-probs of a batch, without gradients."""

    def sequence_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor: ...

    def token_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor: ...


def make_reference(policy: torch.nn.Module, mode: str) -> Reference:
    """The live reference for `mode` ("copy"). "precompute" is not a live model: trainers cache log-probs with
    `precompute_sequence_logprobs` instead."""
    if mode == "copy":
        return FrozenReference(policy)
    raise ValueError(f"unknown reference mode {mode!r}; expected one of: copy, precompute")


class FrozenReference:
    """A deep copy of the policy taken at construction, frozen and in eval mode."""

    def __init__(self, policy: torch.nn.Module):
        self.model = copy.deepcopy(policy)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def sequence_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
        return sequence_logprobs(self.model, batch, temperature)[0]

    @torch.no_grad()
    def token_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
        return token_logprobs(self.model, batch, temperature)


@torch.no_grad()
def precompute_sequence_logprobs(policy: torch.nn.Module, batches: list[CompletionBatch]) -> list[torch.Tensor]:
    """Summed completion log-probs of each batch under the current (initial) policy, in eval mode."""
    was_training = policy.training
    policy.eval()
    try:
        return [sequence_logprobs(policy, b)[0] for b in batches]
    finally:
        policy.train(was_training)
