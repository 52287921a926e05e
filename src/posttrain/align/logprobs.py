"""Per-token log-probabilities of completion tokens, with the label shift, padding-safe.

Guarantees: position t's logits score token t+1 (`logits[:, :-1]` against `input_ids[:, 1:]`); only completion
tokens count (the shifted completion mask); values outside the mask are exactly 0; logits are divided by the
sampling temperature when one is given (on-policy scoring, ALGORITHMS.md pitfall 18); no second [B, T, V] tensor
is materialised for fp32 (gather minus logsumexp).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _full_token_logprobs(model: torch.nn.Module, batch: CompletionBatch, temperature: float) -> torch.Tensor:
    batch = batch.to(model_device(model))
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    logits = out.logits[:, :-1, :]
    if temperature != 1.0:
        logits = logits / temperature
    labels = batch.input_ids[:, 1:]
    mask = batch.completion_mask[:, 1:].to(logits.dtype)
    return selective_log_softmax(logits, labels) * mask


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, LM head) when the model is `head(decoder(x))`-shaped (peft unwrapped), else None."""
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
    batch = batch.to(model_device(decoder))
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
    parts = decoder_and_head(model)
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


def completion_mask(batch: CompletionBatch, like: torch.Tensor | None = None) -> torch.Tensor:
    """The mask aligned with `token_logprobs` (shifted by one), on `like`'s device when given."""
    mask = batch.completion_mask[:, 1:].float()
    return mask.to(like.device) if like is not None else mask


def sequence_logprobs(model: torch.nn.Module, batch: CompletionBatch,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs [B], completion token counts [B])."""
    logps = token_logprobs(model, batch, temperature)
    return logps.sum(dim=-1), completion_mask(batch, logps).sum(dim=-1)


def shared_prompt_logprobs(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[list[int]]],
                           pad_id: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs when K completions share each prompt: the prompt is run once, its keys and values
    are repeated for the K completions, and only the completions are run again.

    `completions[i]` holds the K completion id lists of prompt i (K equal for all prompts). Returns (sums [B*K],
    counts [B*K]) in prompt-major order (p0c0, p0c1, ..., p1c0, ...). Equal, up to float rounding, to scoring each
    prompt+completion on its own; for pairs with long prompts it costs about half the compute. Falls back to the
    plain path for models without a separable decoder and head, or whose fast path failed its check.
    """
    k = len(completions[0])
    if any(len(c) != k for c in completions):
        raise ValueError("every prompt needs the same number of completions")
    parts = decoder_and_head(model)
    key = type(model.get_base_model() if hasattr(model, "get_base_model") else model)

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        from ..data.collate import collate_completions

        rows = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
        return sequence_logprobs(model, collate_completions(rows, pad_id), temperature)

    if parts is None or _FAST_PATH_OK.get(key) is False:
        return plain()
    fast = _shared_prompt(parts, model, prompts, completions, k, pad_id, temperature)
    if key not in _FAST_PATH_OK:  # first use for this model class: check against the model's own forward
        with torch.no_grad():
            reference = plain()
        _FAST_PATH_OK[key] = bool(torch.allclose(fast[0].detach(), reference[0], atol=1e-4, rtol=1e-4))
        if not _FAST_PATH_OK[key]:
            return plain()
    return fast


@dataclass
class SharedPromptHidden:
    """Decoder states when completions share a prompt (rows prompt-major: p0c0, p0c1, ..., p1c0, ...)."""

    prompt_last: torch.Tensor  # [R, H] the prompt's last hidden state (it predicts a completion's first token)
    hidden: torch.Tensor       # [R, C, H] the completion tokens' hidden states
    ids: torch.Tensor          # [R, C] completion ids, right-padded
    mask: torch.Tensor         # [R, C] 1 on real completion tokens

    def predictors(self) -> torch.Tensor:
        """[R, C+1, H]: column j is the state that predicts completion token j (column 0 is the prompt's last
        state); column len(completion) predicts the token after the completion."""
        return torch.cat([self.prompt_last[:, None], self.hidden], dim=1)


def shared_prompt_hidden(decoder: torch.nn.Module, prompts: list[list[int]], completions: list[list[list[int]]],
                         pad_id: int) -> SharedPromptHidden:
    """Run each prompt once (left-padded, so all end at the last column), repeat its keys and values for each of
    its completions, and run the completions (right-padded) on top, positions continuing from each prompt's length.

    `completions[i]` holds prompt i's completions (at least one; the count may differ between prompts: the
    evaluation's shared few-shot prefixes). Padding columns get position 0, so a model with a learned position
    table never indexes past `len(prompt) + len(completion)` of a real row."""
    counts = [len(cs) for cs in completions]
    if not counts or min(counts) < 1:
        raise ValueError("every prompt needs at least one completion")
    device = next(decoder.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    prompt_ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        prompt_ids[i, width - len(p):] = torch.tensor(p, device=device)
        prompt_mask[i, width - len(p):] = 1
    prompt_pos = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True)
    cache = _cache_of(out)
    repeats = torch.tensor(counts, device=device)
    if len(set(counts)) == 1:  # K completions per prompt (training's pairs and groups): repeat in place
        if counts[0] > 1:
            cache.batch_repeat_interleave(counts[0])
    else:  # gather each prompt's row once per completion
        cache.batch_select_indices(torch.arange(n, device=device).repeat_interleave(repeats))
    last = out.last_hidden_state[:, -1].repeat_interleave(repeats, dim=0)
    flat = [c for cs in completions for c in cs]
    c_width = max(len(c) for c in flat)
    comp_ids = torch.full((len(flat), c_width), pad_id, dtype=torch.long, device=device)
    comp_mask = torch.zeros((len(flat), c_width), dtype=torch.long, device=device)
    for i, c in enumerate(flat):
        comp_ids[i, :len(c)] = torch.tensor(c, device=device)
        comp_mask[i, :len(c)] = 1
    lengths = prompt_mask.sum(1).repeat_interleave(repeats)
    comp_pos = (lengths[:, None] + torch.arange(c_width, device=device)[None, :]) * comp_mask
    full_mask = torch.cat([prompt_mask.repeat_interleave(repeats, dim=0), comp_mask], dim=1)
    hidden = decoder(input_ids=comp_ids, attention_mask=full_mask, position_ids=comp_pos, use_cache=True,
                     **{_cache_kwarg(decoder): cache}).last_hidden_state
    return SharedPromptHidden(last, hidden, comp_ids, comp_mask)


def _shared_prompt(parts: tuple[torch.nn.Module, torch.nn.Module], model: torch.nn.Module, prompts: list[list[int]],
                   completions: list[list[list[int]]], k: int, pad_id: int,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    decoder, head = parts
    states = shared_prompt_hidden(decoder, prompts, completions, pad_id)
    predictors = states.predictors()[:, :-1]
    mask = states.mask.bool()
    logits = head(predictors[mask])
    if temperature != 1.0:
        logits = logits / temperature
    picked = selective_log_softmax(logits, states.ids[mask])
    per_token = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    return per_token.sum(-1), states.mask.sum(-1).to(per_token.dtype)


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); accept both.
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _cache_of(output) -> object:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
