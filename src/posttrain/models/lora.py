"""LoRA adapters: wrap a causal LM for parameter-efficient training, save the adapter and a merged model, reload.

Guarantees:
- `apply_lora` returns a `peft.PeftModel` whose only trainable parameters are the new adapter's (peft freezes the
  base); with peft's default init (B = 0) the wrapped model computes exactly what the base computed, so training
  starts from the base model's function.
- `save_lora` writes two HF-format directories: the active adapter alone (adapter_config.json +
  adapter_model.safetensors + tokenizer) that `load_adapter` reloads onto the same base, and a merged plain model
  (W + s·BA, safetensors + tokenizer) that `AutoModelForCausalLM.from_pretrained` reloads without peft. The merge
  runs on a copy, so the live model keeps its adapter and stays trainable. The merged model's logits equal the
  adapted model's up to float rounding (W·x + s·B(Ax) versus (W + s·BA)·x).
- A second, frozen adapter such as the reference's "ref" (`align.reference`) is never saved or merged: only the
  active adapter is.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from .files import give_umask_modes


class LoraOptions(BaseModel):
    """LoRA hyper-parameters (Hu et al. 2021). The update is W + (alpha / r)·B·A with A: r×in, B: out×r."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="rank of the update B·A")
    alpha: float = Field(32, gt=0, description="scale numerator: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input; 0 keeps the policy and "
                                                         "a reference computed in eval mode exactly equal at step 0")
    target_modules: str | list[str] = Field(
        "all-linear", description='"all-linear" (every linear layer except the output head) or a list of module '
                                  'names or name suffixes, e.g. ["q_proj", "v_proj"]')


def apply_lora(model: torch.nn.Module, options: LoraOptions | None = None) -> Any:
    """Wrap `model` with a fresh LoRA adapter named "default" and return the `PeftModel`.

    The base model is modified in place (its target layers are wrapped) and frozen; use the returned model from now
    on. A model that already is a `PeftModel` is refused: stacking adapters belongs to `load_adapter` /
    `add_adapter`, not here.
    """
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("the model already carries a peft adapter; apply_lora expects a plain causal LM")
    options = options or LoraOptions()
    # A reward model (sequence classification) trains its fresh `score` head in full next to the adapters.
    reward = callable(getattr(model, "score", None)) and not hasattr(model, "lm_head")
    config = LoraConfig(task_type=TaskType.SEQ_CLS if reward else TaskType.CAUSAL_LM, r=options.r,
                        lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=options.target_modules,
                        modules_to_save=["score"] if reward else None)
    return get_peft_model(model, config)


def load_adapter(base_model: torch.nn.Module, adapter_dir: str | Path, trainable: bool = True) -> Any:
    """Load a saved adapter onto `base_model` (the same base it was trained on) and return the `PeftModel`.

    With `trainable=True` the adapter's parameters require grad (and only they do); with False nothing does. The
    returned model is in eval mode, like `loading.load_model`; trainers switch to train mode themselves.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}: not a saved adapter directory")
    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)
    model.eval()
    return model


def active_adapter_name(model: Any) -> str:
    """The one active adapter of a `PeftModel`; several active adapters at once are refused (ambiguous to save,
    merge or copy)."""
    names = list(model.active_adapters)
    if len(names) != 1:
        raise ValueError(f"expected exactly one active adapter, found {names}")
    return names[0]


def save_lora(model: Any, tokenizer: Any, out_dir: str | Path) -> tuple[Path, Path]:
    """Write the active adapter and a merged model under `out_dir`; return (adapter_dir, merged_dir).

    adapter_dir is `out_dir/adapter` (peft puts an adapter not named "default" one level deeper, in
    `out_dir/adapter/<name>`; the returned path is where adapter_config.json actually is). merged_dir is
    `out_dir/merged`. The live model is not changed. Merging copies the whole model once, so peak memory is about
    twice the model's.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError("save_lora expects a PeftModel (see apply_lora / load_adapter)")
    out_dir = Path(out_dir)
    name = active_adapter_name(model)
    adapter_root = out_dir / "adapter"
    model.save_pretrained(adapter_root, selected_adapters=[name], safe_serialization=True)
    adapter_dir = adapter_root if name == "default" else adapter_root / name
    merged_dir = out_dir / "merged"
    # Merge a copy: merging in place and un-merging afterwards would not restore the base weights bit for bit.
    merged = copy.deepcopy(model).merge_and_unload(safe_merge=True, adapter_names=[name])
    merged.save_pretrained(merged_dir, safe_serialization=True)
    del merged
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(merged_dir)
    give_umask_modes(out_dir)
    return adapter_dir, merged_dir
