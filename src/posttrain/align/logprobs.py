"""Per-token log-probabilities of completion tokens, with the label shift, padding-safe.

Guarantees: position t's logits score token t+1 (`logits[:, :-1]` against `input_ids[:, 1:]`); only completion
tokens count (the shifted completion mask); values outside the mask are exactly 0; logits are divided by the
sampling temperature when one is given (on-policy scoring, ALGORITHMS.md pitfall 18); no second [B, T, V] tensor
is materialised for fp32 (gather minus logsumexp).

Only the scored positions (those whose next token is scored) go through the LM head, and, on a verified Llama-family
decoder (`last_layer_plan`: Llama, Mistral, Qwen2), through the last layer's query, attention output, o_proj, MLP and
final norm; every position still gets its keys and values there, so the scored positions see exactly the same
context. Both shortcuts are checked against the model's own forward on first use (the last-layer one per model
class and dtype, values and then gradients) and switched off for good when they disagree; anything not verified
(GPT-2, q/k norms, soft-capping, attention dropout in training) runs the plain way.

On such a decoder, when every row of a batch starts with the same tokens (a chat template's header, a system
prompt) and enough of them (`MIN_SHARED_PREFIX_SAVING`), `token_logprobs` computes that prefix once for all rows,
and `shared_prompt_hidden` (pairs and groups sharing a prompt) runs prompts and completions in one packed pass with
the prompts' common prefix once (`prefix_sharing.tree_states`); both are checked the same way, once per decoder
class and dtype, against the decoder's own forward (`_PREFIX_OK`/`_PREFIX_GRADS_OK`, `_TREE_OK`/`_TREE_GRADS_OK`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data.collate import CompletionBatch
from .prefix_sharing import rotate as _rotate, tree_states


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


@dataclass(frozen=True)
class LastLayerPlan:
    """A decoder whose last layer can run restricted to some positions (`decoder_states_at`)."""

    layer: torch.nn.Module  # the last decoder layer the decoder's forward calls
    window: int | None      # that layer's sliding window (keys within `window` positions), None for full attention


@functools.cache
def _families() -> dict[type, tuple[type, type, Callable[[torch.nn.Module], int | None]]]:
    """decoder class -> (its layer class, its attention class, the layer's sliding window), for the architectures
    whose layer was read and verified: pre-norm residual blocks, q/k/v/o projections (biases inside the Linear
    modules), rotary keys and queries, softmax(q k^T * scaling) with no q/k norm and no soft-capping, position-wise
    MLP. Exact classes only: a subclass may change the forward."""
    families = {}
    for name, prefix, window in (("llama", "Llama", lambda attn: None),
                                 ("mistral", "Mistral", lambda attn: getattr(attn.config, "sliding_window", None)),
                                 ("qwen2", "Qwen2", lambda attn: getattr(attn, "sliding_window", None))):
        try:
            module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
            families[getattr(module, f"{prefix}Model")] = (getattr(module, f"{prefix}DecoderLayer"),
                                                          getattr(module, f"{prefix}Attention"), window)
        except (ImportError, AttributeError):
            continue
    return families


def last_layer_plan(decoder: torch.nn.Module) -> LastLayerPlan | None:
    """The plan when `decoder` is a verified Llama-family stack whose last layer can be restricted, else None
    (other architectures; attention dropout active in training, which no subset reproduces)."""
    family = _families().get(type(decoder))
    if family is None:
        return None
    layers = getattr(decoder, "layers", None)
    count = getattr(decoder.config, "num_hidden_layers", None)
    if layers is None or not count or len(layers) < count:
        return None
    layer_cls, attention_cls, window_of = family
    layer = layers[count - 1]
    attention = getattr(layer, "self_attn", None)
    if type(layer) is not layer_cls or type(attention) is not attention_cls:
        return None
    if attention.training and attention.attention_dropout > 0:
        return None
    try:
        window = window_of(attention)
    except RuntimeError:  # a heterogeneous config refusing a global per-layer read: not a verified layout
        return None
    return LastLayerPlan(layer, window)


class _LastLayerReached(Exception):
    """Raised by a pre-hook to stop the decoder's forward just before its last layer, carrying that layer's inputs."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.layer_args, self.layer_kwargs = args, kwargs


def _stop_before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    raise _LastLayerReached(args, kwargs)


def decoder_states_at(decoder: torch.nn.Module, keep: torch.Tensor, key_mask: torch.Tensor | None,
                      plan: LastLayerPlan | None, **inputs) -> tuple[torch.Tensor, object]:
    """(final hidden states [n, H] at the positions `keep` [B, T] marks, row-major; the cache the forward used).

    Without a plan: the decoder's forward, then the gather. With one: the decoder's own forward (embeddings, masks,
    rotary, layers 0..L-2, cache updates) up to its last layer, whose inputs are taken there; that layer then runs
    its keys and values on every position (written to the cache when there is one) and the rest only at `keep`
    (`_last_layer_at`), followed by the decoder's final norm. `key_mask` [B, S] is 1 on real keys, S counting the
    cached ones first."""
    if plan is not None:
        handle = plan.layer.register_forward_pre_hook(_stop_before, with_kwargs=True)
        try:
            decoder(**inputs)
        except _LastLayerReached as reached:
            args, kwargs = reached.layer_args, reached.layer_kwargs
        else:
            args = kwargs = None  # the forward never called its last layer: run it the plain way below
        finally:
            handle.remove()
        if kwargs is not None and kwargs.get("position_embeddings") is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            states = _last_layer_at(plan, hidden, kwargs["position_embeddings"], cache, key_mask, keep)
            return decoder.norm(states), cache
    out = decoder(**inputs)
    return out.last_hidden_state[keep], _cache_of(out) if inputs.get("use_cache") else None


def _last_layer_at(plan: LastLayerPlan, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   cache: object, key_mask: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """The last layer's outputs [n, H] (before the final norm) at the `keep` positions of `hidden` [B, T, H].

    Same arithmetic as the layer's forward, with the queries, attention output, o_proj, residual, post-attention
    norm and MLP computed only at the kept positions (per row, padded to the row with most; padded query slots
    attend to every key so their softmax stays finite, and are dropped). The attention mask is explicit: key j is
    seen from query i when it is real, j <= i (both in cache-index space) and, with a sliding window w, j > i - w."""
    layer, window = plan.layer, plan.window
    attention = layer.self_attn
    b, t, _ = hidden.shape
    d = attention.head_dim
    x = layer.input_layernorm(hidden)
    cos, sin = (e.expand(b, -1, -1) for e in position_embeddings)  # [B, T, d]
    keys = _rotate(attention.k_proj(x).view(b, t, -1, d).transpose(1, 2), cos[:, None], sin[:, None])
    values = attention.v_proj(x).view(b, t, -1, d).transpose(1, 2)
    if cache is not None:
        keys, values = cache.update(keys, values, attention.layer_idx)
    s = keys.shape[2]
    if window is not None and cache is not None and s > window:
        raise ValueError(f"a sliding window of {window} over {s} cached keys: the cache may have dropped keys")
    keep = keep.to(hidden.device).bool()
    counts = keep.sum(1)
    n = int(counts.max()) if b else 0
    if n == 0:
        return hidden.new_zeros((0, hidden.shape[-1]))
    cols = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]  # each row's kept columns first, in order
    valid = torch.arange(n, device=hidden.device)[None, :] < counts[:, None]

    def take(z: torch.Tensor) -> torch.Tensor:
        return torch.gather(z, 1, cols[..., None].expand(-1, -1, z.shape[-1]))

    queries = attention.q_proj(take(x)).view(b, n, -1, d).transpose(1, 2)
    queries = _rotate(queries, take(cos)[:, None], take(sin)[:, None])
    query_index = (s - t + cols)[:, :, None]  # [B, n, 1], cache-index space
    key_index = torch.arange(s, device=hidden.device)[None, None, :]
    allowed = key_index <= query_index
    if key_mask is not None:
        allowed = allowed & key_mask.to(hidden.device).bool()[:, None, :]
    if window is not None:
        allowed = allowed & (key_index > query_index - window)
    allowed = allowed | ~valid[:, :, None]
    groups = queries.shape[1] // keys.shape[1]  # grouped-query attention: kv head h serves query heads h*g..h*g+g-1
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    attended = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed[:, None],
                                                                scale=attention.scaling)
    out = take(hidden) + attention.o_proj(attended.transpose(1, 2).reshape(b, n, -1))
    out = out + layer.mlp(layer.post_attention_layernorm(out))
    return out[valid]


MIN_SHARED_PREFIX_SAVING = 12  # prefix tokens not recomputed, (rows - 1) * prefix, below which sharing is not used


def shared_prefix_length(batch: CompletionBatch) -> int:
    """How many leading tokens every row of `batch` shares: the common prefix of the rows' real tokens at positions
    0.., ending at or before each row's first scored token (the prefix's last state may predict one; no earlier
    prefix state does) and leaving every row at least one token of its own. 0 for left-padded rows."""
    ids, real = batch.input_ids, batch.attention_mask.bool()
    if len(ids) < 2 or not bool(real[:, 0].all()):
        return 0
    lengths = real.sum(1)
    scored = batch.completion_mask.bool() & real
    first_scored = torch.where(scored.any(1), scored.int().argmax(1), lengths)
    limit = int(torch.minimum(first_scored, lengths - 1).min())
    if limit <= 0:
        return 0
    same = (ids[:, :limit] == ids[:1, :limit]).all(0)
    same &= (batch.position_ids[:, :limit] == torch.arange(limit, device=ids.device)).all(0)
    return limit if bool(same.all()) else int(same.int().argmin())


def _packed_path_ok(decoder: torch.nn.Module, longest: int) -> bool:
    """Whether `prefix_sharing.tree_states` may run this decoder on sequences of up to `longest` tokens: a verified
    layer everywhere in the stack, no sliding window shorter than that, no gradient checkpointing."""
    plan = last_layer_plan(decoder)
    if plan is None or _checkpointing_drops_cache(decoder):
        return False
    layer_cls, attention_cls, window_of = _families()[type(decoder)]
    for layer in decoder.layers[:decoder.config.num_hidden_layers]:
        if type(layer) is not layer_cls or type(layer.self_attn) is not attention_cls:
            return False
        window = window_of(layer.self_attn)
        if window is not None and window < longest:
            return False
    return True


def _prefix_sharing_applies(decoder: torch.nn.Module, batch: CompletionBatch) -> int:
    """The shared prefix length to use on this batch, 0 when sharing does not apply (`_packed_path_ok`, a failed
    check) or saves too little."""
    if _PREFIX_OK.get(_decoder_key(decoder)) is False or not _packed_path_ok(decoder, batch.input_ids.shape[1]):
        return 0
    prefix = shared_prefix_length(batch)
    return prefix if (len(batch) - 1) * prefix >= MIN_SHARED_PREFIX_SAVING else 0


def _prefix_shared_token_logprobs(decoder: torch.nn.Module, head: torch.nn.Module, batch: CompletionBatch,
                                  prefix: int, temperature: float) -> torch.Tensor:
    """`_selected_token_logprobs` with the rows' common `prefix` computed once (`prefix_sharing`); same layout."""
    ids = batch.input_ids
    scored = batch.completion_mask.bool() & batch.attention_mask.bool()   # [B, T]: token t is scored
    first = scored[:, prefix]                                            # predicted by the prefix's last state
    keep_rest = torch.nn.functional.pad(scored[:, prefix + 1:], (0, 1))  # rest column j predicts token prefix+j+1
    tree = tree_states(decoder, ids[0, :prefix], ids[:, prefix:], batch.attention_mask[:, prefix:], keep_rest,
                       keep_prefix_last=bool(first.any()))
    prefix_last, states = tree.prefix_last, tree.rows
    out = torch.zeros(ids[:, 1:].shape, dtype=prefix_last.dtype, device=ids.device)
    if prefix_last.shape[0]:
        logits = head(prefix_last).expand(int(first.sum()), -1)
        logits = logits / temperature if temperature != 1.0 else logits
        out[:, prefix - 1] = torch.zeros_like(out[:, 0]).masked_scatter(
            first, selective_log_softmax(logits, ids[:, prefix][first]))
    logits = head(states)
    logits = logits / temperature if temperature != 1.0 else logits
    targets = torch.nn.functional.pad(ids[:, prefix + 1:], (0, 1))[keep_rest]
    rest = torch.zeros(keep_rest.shape, dtype=out.dtype, device=out.device)
    out[:, prefix:] = rest.masked_scatter(keep_rest, selective_log_softmax(logits, targets))[:, :-1]
    return out


def _decoder_key(decoder: torch.nn.Module) -> tuple[type, torch.dtype]:
    return type(decoder), next(decoder.parameters()).dtype


def _prefix_checked(key: tuple[type, torch.dtype], parts: tuple[torch.nn.Module, torch.nn.Module],
                    batch: CompletionBatch, temperature: float, fast: torch.Tensor, prefix: int) -> bool:
    """Whether `fast` (the prefix-shared log-probs) may be used. First use per decoder class and dtype: its values
    against the decoder's own forward on the same rows; first use with gradients: the gradients of their sum for the
    last layer's parameters and one earlier one (`_probe_parameters`), through a second backward over this batch,
    once. A disagreement switches sharing off for the key for good."""
    if _PREFIX_OK.get(key) and (key in _PREFIX_GRADS_OK or not fast.requires_grad):
        return True  # checked already (gradients too, or none needed here)
    plain = functools.partial(_selected_token_logprobs, parts, batch, temperature)
    if key not in _PREFIX_OK:
        with torch.no_grad():
            _PREFIX_OK[key] = bool(torch.allclose(fast.detach(), plain(), atol=1e-4, rtol=1e-4))
    params = _probe_parameters(parts[0])
    if _PREFIX_OK[key] and key not in _PREFIX_GRADS_OK and params and torch.is_grad_enabled() and fast.requires_grad:
        again = _prefix_shared_token_logprobs(parts[0], parts[1], batch, prefix, temperature).sum()
        ours = torch.autograd.grad(again, params, allow_unused=True)
        theirs = torch.autograd.grad(plain().sum(), params, allow_unused=True)
        ok = all((a is None) == (b is None) and (a is None or _grads_agree(a, b)) for a, b in zip(ours, theirs))
        _PREFIX_GRADS_OK[key] = _PREFIX_OK[key] = ok
    return _PREFIX_OK[key]


def _selected_token_logprobs(parts: tuple[torch.nn.Module, torch.nn.Module], batch: CompletionBatch,
                             temperature: float, last_layer: bool = False) -> torch.Tensor:
    decoder, head = parts
    batch = batch.to(model_device(decoder))
    prefix = _prefix_sharing_applies(decoder, batch) if last_layer else 0
    if prefix:
        fast = _prefix_shared_token_logprobs(decoder, head, batch, prefix, temperature)
        key = _decoder_key(decoder)
        if _prefix_checked(key, parts, batch, temperature, fast, prefix):
            return fast
    mask = batch.completion_mask[:, 1:].bool()
    keep = torch.nn.functional.pad(mask, (0, 1))  # position t predicts token t+1; the last one predicts nothing
    hidden, _ = decoder_states_at(decoder, keep, batch.attention_mask, last_layer_plan(decoder) if last_layer else None,
                                  input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, use_cache=False)
    logits = head(hidden)  # the vocabulary projection only where a token is scored
    if temperature != 1.0:
        logits = logits / temperature
    picked = selective_log_softmax(logits, batch.input_ids[:, 1:][mask])
    out = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(mask, picked)


# Whether the fast path reproduces the model's own forward, per model class (checked once, on real inputs).
_FAST_PATH_OK: dict[type, bool] = {}
# Whether the restricted last layer reproduces it, per (model class, dtype): values, then gradients (first use with
# gradients). Low-precision models usually fail the fp32 tolerance and keep the head-only path.
_LAST_LAYER_OK: dict[tuple[type, torch.dtype], bool] = {}
_LAST_LAYER_GRADS_OK: dict[tuple[type, torch.dtype], bool] = {}
# Whether the shared-prefix pass (`prefix_sharing`) reproduces the decoder's forward, per (decoder class, dtype).
_PREFIX_OK: dict[tuple[type, torch.dtype], bool] = {}
_PREFIX_GRADS_OK: dict[tuple[type, torch.dtype], bool] = {}
# Whether the packed shared-prompt pass reproduces the two-pass one, per (decoder class, dtype).
_TREE_OK: dict[tuple[type, torch.dtype], bool] = {}
_TREE_GRADS_OK: dict[tuple[type, torch.dtype], bool] = {}
PROBE_ROWS = 2  # rows of the first batch whose gradients the last-layer check compares


def _model_class(model: torch.nn.Module) -> type:
    return type(model.get_base_model() if hasattr(model, "get_base_model") else model)


def _last_layer_key(model: torch.nn.Module, decoder: torch.nn.Module) -> tuple[type, torch.dtype] | None:
    """The check key when the restricted last layer may run on this call, else None."""
    if last_layer_plan(decoder) is None:
        return None
    key = (_model_class(model), next(decoder.parameters()).dtype)
    return None if _LAST_LAYER_OK.get(key) is False else key


def token_logprobs(model: torch.nn.Module, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
    """[B, T-1] log-probs of each next token that is a completion token; 0 elsewhere.

    The vocabulary projection runs only on the scored positions (the decoder's hidden states are gathered first),
    which saves most of the lm_head's time and memory when prompts are long; on a verified Llama-family decoder so
    does most of the last layer (see the module docstring). Models whose forward does more than
    `lm_head(decoder(x))` (logit soft-capping, scaling) would differ: the first call for each model class checks
    the fast path against the model's own forward and falls back to the full forward if they disagree.
    """
    parts = decoder_and_head(model)
    key = _model_class(model)
    if parts is None or _FAST_PATH_OK.get(key) is False:
        return _full_token_logprobs(model, batch, temperature)
    last_key = _last_layer_key(model, parts[0])
    if last_key is not None:
        fast = _selected_token_logprobs(parts, batch, temperature, last_layer=True)
        probe = CompletionBatch(batch.input_ids[:PROBE_ROWS], batch.attention_mask[:PROBE_ROWS],
                                batch.completion_mask[:PROBE_ROWS], batch.position_ids[:PROBE_ROWS])

        def probe_sum(restricted: bool) -> torch.Tensor:
            if restricted:
                return _selected_token_logprobs(parts, probe, temperature, last_layer=True).sum()
            return _full_token_logprobs(model, probe, temperature).sum()

        if _last_layer_checked(last_key, parts[0], fast, lambda: _full_token_logprobs(model, batch, temperature),
                               probe_sum):
            return fast
    fast = _selected_token_logprobs(parts, batch, temperature)
    if key not in _FAST_PATH_OK:
        with torch.no_grad():
            full = _full_token_logprobs(model, batch, temperature)
        _FAST_PATH_OK[key] = bool(torch.allclose(fast.detach(), full, atol=1e-4, rtol=1e-4))
        if not _FAST_PATH_OK[key]:
            return _full_token_logprobs(model, batch, temperature)
    return fast


def _last_layer_checked(key: tuple[type, torch.dtype], decoder: torch.nn.Module, fast: torch.Tensor,
                        reference: Callable[[], torch.Tensor], probe_sum: Callable[[bool], torch.Tensor]) -> bool:
    """Whether `fast` (computed with the restricted last layer) may be used.

    First use per key: its values against `reference()`, the model's own forward on the same inputs. First use with
    gradients: the gradients of `probe_sum(True)` (restricted, on a few rows) against `probe_sum(False)` (the model's
    forward on them) for the last layer's trainable parameters and one earlier one; a backward over a few rows,
    once. A disagreement beyond fp32 tolerance switches the restriction off for the key for good."""
    if key not in _LAST_LAYER_OK:
        with torch.no_grad():
            _LAST_LAYER_OK[key] = bool(torch.allclose(fast.detach(), reference(), atol=1e-4, rtol=1e-4))
    if _LAST_LAYER_OK[key] and key not in _LAST_LAYER_GRADS_OK and torch.is_grad_enabled():
        params = _probe_parameters(decoder)
        got, want = (probe_sum(True), probe_sum(False)) if params else (None, None)
        if got is not None and got.requires_grad and want.requires_grad:
            ours = torch.autograd.grad(got, params, allow_unused=True)
            theirs = torch.autograd.grad(want, params, allow_unused=True)
            ok = all((a is None) == (b is None) and (a is None or _grads_agree(a, b)) for a, b in zip(ours, theirs))
            _LAST_LAYER_GRADS_OK[key] = _LAST_LAYER_OK[key] = ok
    return _LAST_LAYER_OK[key]


def _grads_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-4 * (1.0 + b.abs().max()))


def _probe_parameters(decoder: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The last layer's trainable parameters (where the restriction acts) and the first trainable one before it
    (its gradient flows back through the last layer's keys and values)."""
    plan = last_layer_plan(decoder)
    if plan is None:
        return []
    last = [p for p in plan.layer.parameters() if p.requires_grad]
    ids = {id(p) for p in last}
    earlier = next((p for p in decoder.parameters() if p.requires_grad and id(p) not in ids), None)
    return last + ([earlier] if earlier is not None else [])


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
    key = _model_class(model)

    def plain(prompts=prompts, completions=completions, full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        from ..data.collate import collate_completions

        batch = collate_completions([(p, c) for p, cs in zip(prompts, completions) for c in cs], pad_id)
        if full:  # the model's own forward, for the checks
            logps = _full_token_logprobs(model, batch, temperature)
            return logps.sum(-1), completion_mask(batch, logps).sum(-1)
        return sequence_logprobs(model, batch, temperature)

    if parts is None or _FAST_PATH_OK.get(key) is False or _checkpointing_drops_cache(parts[0]):
        return plain()
    last_key = _last_layer_key(model, parts[0])
    if last_key is not None and _window_allows(last_layer_plan(parts[0]), prompts, completions):
        fast = _shared_prompt(parts, prompts, completions, pad_id, temperature, last_layer=True)

        def probe_sum(restricted: bool) -> torch.Tensor:
            few = (prompts[:PROBE_ROWS], completions[:PROBE_ROWS])
            if restricted:
                return _shared_prompt(parts, *few, pad_id, temperature, last_layer=True)[0].sum()
            return plain(*few, full=True)[0].sum()

        if _last_layer_checked(last_key, parts[0], fast[0], lambda: plain(full=True)[0], probe_sum):
            return fast
    fast = _shared_prompt(parts, prompts, completions, pad_id, temperature)
    if key not in _FAST_PATH_OK:  # first use for this model class: check against the model's own forward
        with torch.no_grad():
            reference = plain(full=True)
        _FAST_PATH_OK[key] = bool(torch.allclose(fast[0].detach(), reference[0], atol=1e-4, rtol=1e-4))
        if not _FAST_PATH_OK[key]:
            return plain()
    return fast


def _checkpointing_drops_cache(decoder: torch.nn.Module) -> bool:
    """Gradient-checkpointed layers run without a cache while training with gradients (transformers drops it), so
    a prompt's keys and values cannot be kept for its completions."""
    return torch.is_grad_enabled() and decoder.training and any(
        getattr(m, "gradient_checkpointing", False) for m in decoder.modules())


def _window_allows(plan: LastLayerPlan | None, prompts: list[list[int]], completions: list[list[list[int]]]) -> bool:
    """Whether the shared-prompt path can restrict the last layer: a sliding window must cover every key (the cache
    of a sliding layer keeps only the last window - 1 keys, and the index arithmetic assumes all of them)."""
    if plan is None:
        return False
    longest = max(len(p) for p in prompts) + max(len(c) for cs in completions for c in cs)
    return plan.window is None or longest <= plan.window


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
                         pad_id: int, keep: torch.Tensor | None = None) -> SharedPromptHidden:
    """Run each prompt once (left-padded, so all end at the last column), repeat its keys and values for each of
    its completions, and run the completions (right-padded) on top, positions continuing from each prompt's length.

    `completions[i]` holds prompt i's completions (at least one; the count may differ between prompts: the
    evaluation's shared few-shot prefixes). Padding columns get position 0, so a model with a learned position
    table never indexes past `len(prompt) + len(completion)` of a real row.

    `keep` ([R, C] bool, C the longest completion), when given, marks the completion columns whose hidden state the
    caller reads; the others come back as zeros. On a decoder with a `last_layer_plan` (and a sliding window, if
    any, covering every key) the last layer then computes its outputs only there and at each prompt's last
    position, keys and values everywhere (`decoder_states_at`).

    On a decoder `prefix_sharing` can run (`_packed_path_ok`) the same states come from one packed pass instead
    (`_packed_shared_prompt`: the prompts' common prefix once too, no second weight-gradient matmul per layer),
    checked once per decoder class and dtype against the two-pass path, values and gradients (`_tree_checked`)."""
    counts = [len(cs) for cs in completions]
    if not counts or min(counts) < 1:
        raise ValueError("every prompt needs at least one completion")
    c_width = max(len(c) for cs in completions for c in cs)
    if keep is not None and tuple(keep.shape) != (sum(counts), c_width):
        raise ValueError(f"keep has shape {tuple(keep.shape)}; expected (completions, longest completion) = "
                         f"{(sum(counts), c_width)}")
    longest = max(len(p) for p in prompts) + c_width
    key = _decoder_key(decoder)
    if _TREE_OK.get(key) is not False and _packed_path_ok(decoder, longest):
        packed = _packed_shared_prompt(decoder, prompts, completions, pad_id, keep)
        if _tree_checked(key, decoder, packed, keep, lambda: _two_pass_shared_prompt(decoder, prompts, completions,
                                                                                       pad_id, None)):
            return packed
    return _two_pass_shared_prompt(decoder, prompts, completions, pad_id, keep)


def _packed_shared_prompt(decoder: torch.nn.Module, prompts: list[list[int]], completions: list[list[list[int]]],
                          pad_id: int, keep: torch.Tensor | None) -> SharedPromptHidden:
    """`shared_prompt_hidden` in one packed pass (`prefix_sharing.tree_states`): the prompts' common prefix once,
    each prompt's rest once, its completions on top; the same result layout (zeros where not kept)."""
    device = next(decoder.parameters()).device
    counts = torch.tensor([len(cs) for cs in completions], device=device)
    shortest = min(len(p) for p in prompts)
    prefix = 0  # the prompts' common prefix, leaving every prompt at least one token of its own
    while prefix < shortest - 1 and all(p[prefix] == prompts[0][prefix] for p in prompts):
        prefix += 1
    rests = [p[prefix:] for p in prompts]
    row_ids, row_mask = _right_padded(rests, pad_id, device)
    keep_rows = torch.zeros_like(row_mask, dtype=torch.bool)
    keep_rows[torch.arange(len(rests), device=device), row_mask.sum(1) - 1] = True  # each prompt's last state
    flat = [c for cs in completions for c in cs]
    comp_ids, comp_mask = _right_padded(flat, pad_id, device)
    keep_comps = comp_mask.bool() if keep is None else keep.to(device).bool() & comp_mask.bool()
    tree = tree_states(decoder, torch.tensor(prompts[0][:prefix], dtype=torch.long, device=device), row_ids,
                       row_mask, keep_rows, completion_ids=comp_ids, completion_mask=comp_mask,
                       owner=torch.arange(len(prompts), device=device).repeat_interleave(counts),
                       keep_completions=keep_comps)
    hidden = tree.completions.new_zeros((*comp_ids.shape, tree.completions.shape[-1]))
    hidden[keep_comps] = tree.completions
    return SharedPromptHidden(tree.rows.repeat_interleave(counts, dim=0), hidden, comp_ids, comp_mask)


def _right_padded(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
        mask[i, :len(seq)] = 1
    return ids, mask


def _tree_checked(key: tuple[type, torch.dtype], decoder: torch.nn.Module, packed: SharedPromptHidden,
                  keep: torch.Tensor | None, reference: Callable[[], SharedPromptHidden]) -> bool:
    """Whether `packed` may be used: first use per decoder class and dtype, its prompt-last and kept states against
    the two-pass path with the decoder's own forward (`reference()`); first use with gradients, also the gradients
    of their sum for `_probe_parameters` (one more forward and backward over this batch, once). A disagreement
    switches the packed path off for the key for good."""
    if _TREE_OK.get(key) and (key in _TREE_GRADS_OK or not packed.hidden.requires_grad):
        return True  # checked already (gradients too, or none needed here)
    kept = packed.mask.bool() if keep is None else keep.to(packed.mask.device).bool() & packed.mask.bool()

    def total(states: SharedPromptHidden) -> torch.Tensor:
        return states.prompt_last.sum() + states.hidden[kept].sum()

    if key not in _TREE_OK:
        with torch.no_grad():
            want = reference()
        _TREE_OK[key] = bool(torch.allclose(packed.prompt_last.detach(), want.prompt_last, atol=1e-4, rtol=1e-4)
                             and torch.allclose(packed.hidden.detach()[kept], want.hidden[kept], atol=1e-4,
                                                rtol=1e-4))
    params = _probe_parameters(decoder)
    if _TREE_OK[key] and key not in _TREE_GRADS_OK and params and torch.is_grad_enabled() \
            and packed.hidden.requires_grad:
        ours = torch.autograd.grad(total(packed), params, retain_graph=True, allow_unused=True)
        theirs = torch.autograd.grad(total(reference()), params, allow_unused=True)
        ok = all((a is None) == (b is None) and (a is None or _grads_agree(a, b)) for a, b in zip(ours, theirs))
        _TREE_GRADS_OK[key] = _TREE_OK[key] = ok
    return _TREE_OK[key]


def _two_pass_shared_prompt(decoder: torch.nn.Module, prompts: list[list[int]], completions: list[list[list[int]]],
                            pad_id: int, keep: torch.Tensor | None) -> SharedPromptHidden:
    """`shared_prompt_hidden` through the decoder's own forward: the prompts (left-padded), then the completions
    on their repeated key/value cache."""
    counts = [len(cs) for cs in completions]
    device = next(decoder.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    flat = [c for cs in completions for c in cs]
    c_width = max(len(c) for c in flat)
    plan = last_layer_plan(decoder) if keep is not None else None
    plan = plan if _window_allows(plan, prompts, completions) else None
    prompt_ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        prompt_ids[i, width - len(p):] = torch.tensor(p, device=device)
        prompt_mask[i, width - len(p):] = 1
    prompt_pos = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    prompt_keep = torch.zeros((n, width), dtype=torch.bool, device=device)
    prompt_keep[:, -1] = True  # only the prompt's last state is read (it predicts each completion's first token)
    last, cache = decoder_states_at(decoder, prompt_keep, prompt_mask, plan, input_ids=prompt_ids,
                                    attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True)
    if cache is None or _checkpointing_drops_cache(decoder):
        raise ValueError("shared prompts need the decoder's key/value cache, which gradient checkpointing turns off "
                         "in training; run the sequences whole (e.g. `sequence_logprobs`) or disable checkpointing")
    repeats = torch.tensor(counts, device=device)
    if len(set(counts)) == 1:  # K completions per prompt (training's pairs and groups): repeat in place
        if counts[0] > 1:
            cache.batch_repeat_interleave(counts[0])
    else:  # gather each prompt's row once per completion
        cache.batch_select_indices(torch.arange(n, device=device).repeat_interleave(repeats))
    last = last.repeat_interleave(repeats, dim=0)
    comp_ids = torch.full((len(flat), c_width), pad_id, dtype=torch.long, device=device)
    comp_mask = torch.zeros((len(flat), c_width), dtype=torch.long, device=device)
    for i, c in enumerate(flat):
        comp_ids[i, :len(c)] = torch.tensor(c, device=device)
        comp_mask[i, :len(c)] = 1
    lengths = prompt_mask.sum(1).repeat_interleave(repeats)
    comp_pos = (lengths[:, None] + torch.arange(c_width, device=device)[None, :]) * comp_mask
    full_mask = torch.cat([prompt_mask.repeat_interleave(repeats, dim=0), comp_mask], dim=1)
    inputs = {"input_ids": comp_ids, "attention_mask": full_mask, "position_ids": comp_pos, "use_cache": True,
              _cache_kwarg(decoder): cache}
    if keep is None:
        hidden = decoder(**inputs).last_hidden_state
    else:
        keep = keep.to(device).bool()
        states, _ = decoder_states_at(decoder, keep, full_mask, plan, **inputs)
        hidden = states.new_zeros((len(flat), c_width, states.shape[-1]))
        hidden[keep] = states
    return SharedPromptHidden(last, hidden, comp_ids, comp_mask)


def _shared_prompt(parts: tuple[torch.nn.Module, torch.nn.Module], prompts: list[list[int]],
                   completions: list[list[list[int]]], pad_id: int, temperature: float,
                   last_layer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    decoder, head = parts
    keep = None
    if last_layer:  # completion column j is read when it predicts completion token j + 1
        lengths = torch.tensor([len(c) for cs in completions for c in cs])
        keep = torch.arange(int(lengths.max()))[None, :] < (lengths - 1)[:, None]
    states = shared_prompt_hidden(decoder, prompts, completions, pad_id, keep=keep)
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
    return cache if cache is not None else getattr(output, "past_key_values", None)
