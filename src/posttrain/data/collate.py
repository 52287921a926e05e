"""Padding a list of (prompt ids, completion ids) into tensors, with masks built from lengths.

Guarantees: `attention_mask` and `completion_mask` come from each row's lengths, never from `token == pad_id`, so
pad == eos is safe (ALGORITHMS.md pitfall 7); `position_ids` count real tokens only, so the same row gets the same
log-probs whether it is left- or right-padded, and however much (pitfall 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch


@dataclass
class CompletionBatch:
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    completion_mask: torch.Tensor  # [B, T] 1 on completion tokens
    position_ids: torch.Tensor    # [B, T]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "CompletionBatch":
        if self.input_ids.device == torch.device(device):
            return self
        return CompletionBatch(self.input_ids.to(device), self.attention_mask.to(device),
                               self.completion_mask.to(device), self.position_ids.to(device))


def collate_masked(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                   padding_side: Literal["right", "left"] = "right") -> CompletionBatch:
    """Pad (ids, supervision mask) rows; the mask becomes `completion_mask` (e.g. assistant turns only)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ids) for ids, _ in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    supervised = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        start = 0 if padding_side == "right" else width - len(ids)
        input_ids[i, start:start + len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention[i, start:start + len(ids)] = 1
        supervised[i, start:start + len(ids)] = torch.tensor(list(mask), dtype=torch.long)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0) * attention
    return CompletionBatch(input_ids, attention, supervised, positions)


def collate_completions(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                        padding_side: Literal["right", "left"] = "right") -> CompletionBatch:
    """Pad (prompt ids, completion ids) rows; `completion_mask` is 1 on the completion tokens."""
    return collate_masked([(list(p) + list(c), [0] * len(p) + [1] * len(c)) for p, c in rows], pad_id, padding_side)
