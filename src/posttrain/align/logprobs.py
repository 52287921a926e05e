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


def _full_token_logprobs(model: torch.nn.Module, batch: CompletionBatch, temperature: float) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    logits = out.logits[:, :-1, :]
    if temperature != 1.0:
        logits = logits / temperature
    labels = batch.input_ids[:, 1:]
    mask = batch.completion_mask[:, 1:].to(logits.dtype)
    return selective_log_softmax(logits, labels) * mask


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model wraps in place
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if get_decoder is None or head is None:
        return None
    decoder = get_decoder()
    return (decoder, head) if decoder is not None and decoder is not base else None


def _selected_token_logprobs(parts: tuple[torch.nn.Module, torch.nn.Module], batch: CompletionBatch,
                             temperature: float) -> torch.Tensor:
    decoder, head = parts
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False).last_hidden_state[:, :-1]
    mask = batch.completion_mask[:, 1:].bool()
    logits = head(hidden[mask])  # the vocabulary projection only where a token is scored
    if temperature != 1.0:
        logits = logits / temperature
    picked = selective_log_softmax(logits, batch.input_ids[:, 1:][mask])
    out = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(mask, picked)


# Whether the fast path reproduces the model's own forward, per model class (checked once, on real inputs).
_FAST_PATH_OK: dict[type, bool] = {}


def token_logprobs(model: torch.nn.Module, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
    """[B, T-1] log-probs of each next token that is a completion token; 0 elsewhere.

    The vocabulary projection runs only on the scored positions (the decoder's hidden states are gathered first),
    which saves most of the lm_head's time and memory when prompts are long. Models whose forward does more than
    `lm_head(decoder(x))` (logit soft-capping, scaling) would differ: the first call for each model class checks
    the fast path against the model's own forward and falls back to the full forward if they disagree.
    """
    parts = _decoder_and_head(model)
    key = type(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if parts is None or _FAST_PATH_OK.get(key) is False:
        return _full_token_logprobs(model, batch, temperature)
    fast = _selected_token_logprobs(parts, batch, temperature)
    if key not in _FAST_PATH_OK:
        with torch.no_grad():
            full = _full_token_logprobs(model, batch, temperature)
        _FAST_PATH_OK[key] = bool(torch.allclose(fast.detach(), full, atol=1e-4, rtol=1e-4))
        if not _FAST_PATH_OK[key]:
            return _full_token_logprobs(model, batch, temperature)
    return fast


def completion_mask(batch: CompletionBatch) -> torch.Tensor:
    """The mask aligned with `token_logprobs` (shifted by one)."""
    return batch.completion_mask[:, 1:].float()


def sequence_logprobs(model: torch.nn.Module, batch: CompletionBatch,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs [B], completion token counts [B])."""
    logps = token_logprobs(model, batch, temperature)
    return logps.sum(dim=-1), completion_mask(batch).sum(dim=-1)
