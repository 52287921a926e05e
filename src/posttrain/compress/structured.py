"""Structured (width and depth) pruning of Llama-style decoders with physical slicing (Minitron-style).

Importance comes from activations on a small calibration batch, never from gradients (Minitron, Muralidharan et al.
2024): an attention head by the L2 norm of its attention output (the input of o_proj, split by head), an FFN neuron
by the L2 norm of its activation act_fn(gate) * up (the input of down_proj); each norm is taken over one sequence's
real tokens and averaged over the sequences. A layer is scored by Block Influence, BI = 1 - mean cos(x_in, x_out)
over all real tokens (ShortGPT, Men et al. 2024).

Guarantees:
- The result is an ordinary, smaller HF model: weights are sliced (gate/up rows and down columns; q/k/v rows and o
  columns; whole decoder layers removed) and the config is rewritten (intermediate_size; num_attention_heads,
  num_key_value_heads with head_dim written explicitly, since hidden_size / heads no longer gives it;
  num_hidden_layers and layer_types), so `save_pretrained` + `from_pretrained` rebuild the same model with the same
  parameter count.
- The same number of neurons / heads is removed in every layer (HF configs hold one width for all layers); which
  ones is chosen per layer. Kept units stay in their original order.
- With grouped-query attention, either whole KV groups are removed (with all their query heads), or the same number
  of query heads in every group, so every remaining query head still reads its own KV head.
- Units whose output is exactly zero contribute nothing, score 0 and go first, so removing them leaves the logits
  unchanged; likewise a layer that is exactly the identity (BI 0) is removed first by depth pruning.
- Not done: embedding-channel (hidden size) pruning, also part of Minitron; models not shaped like Llama
  (self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj in `model.layers`) are refused with a clear error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import nn

from .prune import run_calibration

HeadMode = Literal["kv_groups", "per_group"]


def layers_owner(model: nn.Module) -> nn.Module:
    """The decoder module that holds `.layers` (a peft wrapper is looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", base)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of blocks (`model.model.layers` for HF causal LMs)."""
    layers = getattr(layers_owner(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers (expected model.layers)")
    return layers


def _parts(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    need = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
    for module, names in need:
        if module is None or not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
            raise ValueError(f"{type(layer).__name__} is not Llama-shaped (self_attn.q/k/v/o_proj, "
                             "mlp.gate/up/down_proj): structured pruning does not know how to slice it")
    return attn, mlp


@dataclass
class Importance:
    heads: torch.Tensor    # [L, H] mean over sequences of each head's attention-output L2 norm
    neurons: torch.Tensor  # [L, I] mean over sequences of each FFN neuron's activation L2 norm
    layers: torch.Tensor   # [L] Block Influence 1 - mean cos(x_in, x_out)
    sequences: int


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def compute_importance(model: nn.Module, calib_batches: Iterable[Any]) -> Importance:
    """Head, neuron and layer importance from one calibration pass (see the module docstring)."""
    layers = decoder_layers(model)
    parts = [_parts(layer) for layer in layers]
    n_layers = len(layers)
    head_dim = int(parts[0][0].head_dim)
    n_heads = parts[0][0].o_proj.in_features // head_dim
    heads = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    neurons = torch.zeros(n_layers, parts[0][1].down_proj.in_features, dtype=torch.float64)
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    state: dict[str, Any] = {"tokens": 0, "sequences": 0}

    def head_hook(i: int):
        def record(_module, args):
            x = args[0].detach().double() * state["mask"][..., None]
            per_head = x.reshape(*x.shape[:2], n_heads, head_dim).pow(2).sum(dim=(1, 3)).sqrt()  # [B, H]
            heads[i] += per_head.sum(0).cpu()
        return record

    def neuron_hook(i: int):
        def record(_module, args):
            x = args[0].detach().double() * state["mask"][..., None]
            neurons[i] += x.pow(2).sum(1).sqrt().sum(0).cpu()  # [B, I] norms over the sequence, summed over B
        return record

    def block_hook(i: int):
        def record(_module, args, kwargs, out):
            x_in, x_out = _hidden_of(args, kwargs).double(), _output_of(out).double()
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)  # [B, T]
            cos_sum[i] += float(cos[state["mask"].bool()].sum())
        return record

    def before(mask: torch.Tensor) -> None:
        state["mask"] = mask.double()
        state["tokens"] += int(mask.sum())
        state["sequences"] += int(mask.shape[0])

    handles = []
    for i, (layer, (attn, mlp)) in enumerate(zip(layers, parts)):
        handles.append(attn.o_proj.register_forward_pre_hook(head_hook(i)))
        handles.append(mlp.down_proj.register_forward_pre_hook(neuron_hook(i)))
        handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
    try:
        run_calibration(model, calib_batches, before)
    finally:
        for h in handles:
            h.remove()
    if not state["tokens"]:
        raise ValueError("the calibration batches hold no tokens")
    seqs = state["sequences"]
    return Importance(heads=(heads / seqs).float(), neurons=(neurons / seqs).float(),
                      layers=(1.0 - cos_sum / state["tokens"]).float(), sequences=seqs)


def _check_config(config: Any, **changes: Any) -> None:
    """Refuse, before anything is sliced, sizes the config class itself would reject on save or load (transformers'
    LlamaConfig, for one, wants hidden_size to be a multiple of num_attention_heads even with head_dim explicit)."""
    trial = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(trial, name, value)
    validate = getattr(trial, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as exc:  # the config class's own error, re-raised with what to change
            raise ValueError(f"{type(config).__name__} rejects the pruned sizes {changes}: {exc}; choose another "
                             "fraction") from exc


# -- slicing ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = linear.bias[rows] if linear.bias is not None and rows is not None else linear.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (ties go to the lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _count_to_remove(total: int, fraction: float, what: str) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{what} fraction must be in [0, 1), got {fraction}")
    drop = int(round(total * fraction))
    if drop >= total:
        raise ValueError(f"removing {fraction:.0%} of {total} {what} would leave none")
    return drop


def prune_width(model: nn.Module, calib_batches: Iterable[Any] | None, ffn_fraction: float = 0.0,
                head_fraction: float = 0.0, *, head_mode: HeadMode = "kv_groups",
                importance: Importance | None = None) -> dict[str, Any]:
    """Remove the least important `ffn_fraction` of FFN neurons and `head_fraction` of attention heads from every
    layer, in place; returns before/after sizes.

    `head_mode="kv_groups"` removes round(n_kv * head_fraction) whole KV groups (each with its query heads);
    `"per_group"` removes round(group_size * head_fraction) query heads from every group and keeps every KV head.
    A group is scored by the sum of its query heads' scores. Pass `importance` to reuse a calibration pass."""
    config = model.config
    layers = decoder_layers(model)
    parts = [_parts(layer) for layer in layers]
    stats: dict[str, Any] = {"params_before": sum(p.numel() for p in model.parameters())}
    inter = parts[0][1].down_proj.in_features
    drop_n = _count_to_remove(inter, ffn_fraction, "FFN neurons")
    attn0 = parts[0][0]
    head_dim = int(attn0.head_dim)
    n_heads, n_kv = attn0.o_proj.in_features // head_dim, attn0.k_proj.out_features // head_dim
    group = n_heads // n_kv
    if head_mode == "kv_groups":
        drop_h = _count_to_remove(n_kv, head_fraction, "KV groups")
        new_heads, new_kv = (n_kv - drop_h) * group, n_kv - drop_h
    elif head_mode == "per_group":
        drop_h = _count_to_remove(group, head_fraction, "query heads per group")
        new_heads, new_kv = n_kv * (group - drop_h), n_kv
    else:
        raise ValueError(f"head_mode must be 'kv_groups' or 'per_group', got {head_mode!r}")
    _check_config(config, intermediate_size=inter - drop_n, num_attention_heads=new_heads,
                  num_key_value_heads=new_kv, head_dim=head_dim)
    imp = importance if importance is not None else compute_importance(model, calib_batches or [])
    if drop_n:
        for i, (_, mlp) in enumerate(parts):
            keep = _top(imp.neurons[i], inter - drop_n).to(mlp.down_proj.weight.device)
            mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, rows=keep), _sliced(mlp.up_proj, rows=keep)
            mlp.down_proj = _sliced(mlp.down_proj, cols=keep)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = inter - drop_n
        config.intermediate_size = inter - drop_n
    stats["intermediate_size"] = (inter, inter - drop_n)

    if drop_h:
        for i, (attn, _) in enumerate(parts):
            scores = imp.heads[i].reshape(n_kv, group)
            if head_mode == "kv_groups":
                kv_keep = _top(scores.sum(1), new_kv)
                q_keep = (kv_keep[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
            else:
                kv_keep = torch.arange(n_kv)
                q_keep = torch.cat([g * group + _top(scores[g], group - drop_h) for g in range(n_kv)])
            device = attn.q_proj.weight.device
            q_rows, kv_rows = _head_rows(q_keep, head_dim).to(device), _head_rows(kv_keep, head_dim).to(device)
            attn.q_proj = _sliced(attn.q_proj, rows=q_rows)
            attn.k_proj, attn.v_proj = _sliced(attn.k_proj, rows=kv_rows), _sliced(attn.v_proj, rows=kv_rows)
            attn.o_proj = _sliced(attn.o_proj, cols=q_rows)
            # The attention forward reads these per-module copies of the config values.
            attn.num_key_value_groups = new_heads // new_kv
            for name, value in (("num_heads", new_heads), ("num_key_value_heads", new_kv)):
                if hasattr(attn, name):
                    setattr(attn, name, value)
        config.num_attention_heads, config.num_key_value_heads = new_heads, new_kv
    config.head_dim = head_dim  # explicit: hidden_size // num_attention_heads no longer gives it
    stats["num_attention_heads"] = (n_heads, new_heads)
    stats["num_key_value_heads"] = (n_kv, new_kv)
    stats["params_after"] = sum(p.numel() for p in model.parameters())
    return stats


def prune_depth(model: nn.Module, calib_batches: Iterable[Any] | None, n_layers: int, *,
                importance: Importance | None = None) -> dict[str, Any]:
    """Remove the `n_layers` decoder layers with the lowest Block Influence (ShortGPT), in place; the rest are
    renumbered (each module's `layer_idx`, so the KV cache indexes them right) and the config's num_hidden_layers
    and layer_types follow. BI is measured once on the unpruned model, as ShortGPT does."""
    layers = decoder_layers(model)
    total = len(layers)
    if not 0 <= n_layers < total:
        raise ValueError(f"can remove 0..{total - 1} of {total} layers, not {n_layers}")
    imp = importance if importance is not None else compute_importance(model, calib_batches or [])
    removed = sorted(torch.sort(imp.layers, stable=True).indices[:n_layers].tolist())
    kept = [i for i in range(total) if i not in removed]
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    decoder = layers_owner(model)
    decoder.layers = new_layers
    config = model.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == total:
        config.layer_types = [config.layer_types[i] for i in kept]
    return {"removed": removed, "kept": kept, "block_influence": imp.layers.tolist()}


