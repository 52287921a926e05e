"""Loading causal LMs and tokenizers: the embedded default, a local directory, or a hub id.

Guarantees: `trust_remote_code` is off unless the caller turns it on; weights load from safetensors where the
checkpoint has them (transformers' default); the name "embedded" resolves to the cached embedded model, built on
first use (no download, ever); a tokenizer without a pad token gets pad = eos (masks are built from lengths, so this
is safe); errors name what was asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

EMBEDDED = "embedded"


def resolve_model_path(name_or_path: str) -> str:
    """'embedded' -> the cached embedded model directory; anything else unchanged."""
    if name_or_path == EMBEDDED:
        from .embedded import embedded_model_dir

        return str(embedded_model_dir())
    return name_or_path


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a CUDA device is present, else 'cpu'; anything else is checked and returned."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device")
    return device


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types; the user needs to know what was asked for
        raise OSError(f"could not load a tokenizer from {name_or_path!r} ({path}): {exc}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               device: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise OSError(f"could not load a causal LM from {name_or_path!r} ({path}): {exc}") from exc
    if device is not None:
        model.to(device)
    model.eval()
    return model


def is_reward_model(name_or_path: str) -> bool:
    """True when the checkpoint's config names a sequence-classification architecture (a reward model)."""
    import json

    config = Path(resolve_model_path(name_or_path)) / "config.json"
    if not config.exists():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def weights_size_bytes(directory: str | Path) -> int:
    """Bytes of the weight files (*.safetensors, *.bin, *.gguf) in a model directory."""
    directory = Path(directory)
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.is_file() and p.suffix in {".safetensors", ".bin", ".gguf"})


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
