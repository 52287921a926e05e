"""Per-token log-probabilities of completion tokens, with the label shift, padding-safe.

Guarantees: position t's logits score token t+1 (`logits[:, :-1]` against `input_ids[:, 1:]`); only completion
tokens count (the shifted completion mask); values outside the mask are exactly 0; logits are divided by the
sampling temperature when one is given (on-policy scoring, ALGORITHMS.md pitfall 18); no second [B, T, V] tensor
is materialised for fp32 (gather minus logsumexp).
"""

from __future__ import annotations

import torch

from ..data.collate import CompletionBatch


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without building the full log-softmax tensor when it is safe to."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    # Low precision: logsumexp subtraction loses digits; go row by row through log_softmax in fp32 instead.
    rows = [torch.gather(torch.log_softmax(l.float(), -1), -1, i.unsqueeze(-1)).squeeze(-1)
            for l, i in zip(logits, index)]
    return torch.stack(rows)


def token_logprobs(model: torch.nn.Module, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
    """[B, T-1] log-probs of each next token that is a completion token; 0 elsewhere."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    logits = out.logits[:, :-1, :]
    if temperature != 1.0:
        logits = logits / temperature
    labels = batch.input_ids[:, 1:]
    mask = batch.completion_mask[:, 1:].to(logits.dtype)
    return selective_log_softmax(logits, labels) * mask


def completion_mask(batch: CompletionBatch) -> torch.Tensor:
    """The mask aligned with `token_logprobs` (shifted by one)."""
    return batch.completion_mask[:, 1:].float()


def sequence_logprobs(model: torch.nn.Module, batch: CompletionBatch,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs [B], completion token counts [B])."""
    logps = token_logprobs(model, batch, temperature)
    return logps.sum(dim=-1), completion_mask(batch).sum(dim=-1)
