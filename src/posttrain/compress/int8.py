"""Int8 weight-only round-to-nearest quantization (per output channel, symmetric), saved, reloaded, measured.

Guarantees:
- every `nn.Linear` weight W is stored as int8 q = round(W / s) clamped to [-127, 127] with one fp32 scale per
  output row s = max|W_row| / 127 (a zero row gets s = 1 so it dequantizes to exactly 0); the dequantized weight
  differs from W by at most s/2 per element;
- the artifact is a directory: `model.safetensors` holding the int8 tensors, the scales and every other tensor
  unchanged, plus `config.json`, the tokenizer, and `quantization.json` describing the scheme;
- `load_int8` rebuilds the model from its config and replaces the linears by `Int8Linear` modules that keep the
  int8 weights in memory and dequantize on the fly, so the reloaded model computes with the quantized weights. It
  reloads as the class that was quantized (the config's `architectures` is that class): a causal LM as a causal
  LM, a reward model (`*ForSequenceClassification`) as a sequence-classification model;
- the files get the permissions the umask gives any new file (safetensors writes through a 0600 temporary file,
  so `model.safetensors` is re-moded to match).
Embeddings and norms stay in full precision (quantizing them costs accuracy for little size on small models), and
so does a sequence-classification model's `score` head: it is one row per label (a reward model's is 1 x hidden),
so int8 would save almost nothing and its rounding would go straight into every score.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.files import give_umask_modes

SCHEME = {"format": "posttrain-int8-rtn", "version": 1, "bits": 8, "granularity": "per-output-channel",
          "symmetric": True, "modules": "nn.Linear"}


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], fp32 scales [out]) for a 2-D weight."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with per-row scales; computes in the input's dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return nn.functional.linear(x, weight, self.bias)


# Heads kept in float, by the model class's name suffix (see the module docstring).
FLOAT_HEADS = {"ForSequenceClassification": "score"}


def float_modules(model: nn.Module) -> list[str]:
    """The linears of `model` that stay in float: a sequence-classification model's `score` head."""
    name = type(model).__name__
    return [head for suffix, head in FLOAT_HEADS.items() if name.endswith(suffix) and hasattr(model, head)]


def _linear_names(model: nn.Module) -> list[str]:
    keep = set(float_modules(model))
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name not in keep]


def quantize_model_to_dir(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Quantize every linear of `model` (but `float_modules`) and write the artifact to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    linears = set(_linear_names(model))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in linears and leaf == "weight":
            q, s = quantize_tensor(tensor)
            tensors[f"{module}.qweight"] = q.contiguous()
            tensors[f"{module}.scale"] = s.contiguous()
        else:
            tensors[name] = tensor.detach().contiguous().clone()
    weights = out_dir / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt", "quantization": SCHEME["format"]})
    give_umask_modes(out_dir)  # safetensors replaced the file by its own 0600 temporary one
    # The class that was quantized is the one load_int8 rebuilds (a causal LM loaded from a reward model's
    # checkpoint would otherwise keep the checkpoint's architectures and reload with a head it never had).
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "quantization.json").write_text(json.dumps({**SCHEME, "linears": sorted(linears),
                                                           "float_modules": float_modules(model)}, indent=2))
    return out_dir


def is_int8_artifact(path: str | Path) -> bool:
    marker = Path(path) / "quantization.json"
    return marker.exists() and json.loads(marker.read_text()).get("format") == SCHEME["format"]


def load_int8(path: str | Path) -> nn.Module:
    """Rebuild the model from the artifact's config with `Int8Linear` layers holding the stored int8 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    meta = json.loads((path / "quantization.json").read_text())
    config = AutoConfig.from_pretrained(path)
    # Built on the CPU, not the meta device: non-persistent buffers (rotary frequencies) must be real tensors.
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in archs) \
        else AutoModelForCausalLM
    model = auto.from_config(config)
    state = load_file(str(path / "model.safetensors"))
    for name in meta["linears"]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = state.pop(f"{name}.bias", None)
        setattr(parent, child, Int8Linear(state.pop(f"{name}.qweight"), state.pop(f"{name}.scale"), bias))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith((".qweight", ".scale"))]
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if missing or unexpected:
        raise ValueError(f"{path}: int8 artifact does not match its config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.eval()
    return model
