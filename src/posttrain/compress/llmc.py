"""Thin wrappers around llm-compressor: GPTQ / AWQ / round-to-nearest W4A16 quantization, SparseGPT / Wanda pruning.

llm-compressor lives in the optional `quant` extra (`pip install 'posttrain[quant]'`) because it caps transformers
(llmcompressor 0.14.0.1 requires transformers>=5.15,<=5.17 and compressed-tensors==0.19.0); `make test` runs these
wrappers' tests in a separate venv, `.venv-quant`. This module imports llmcompressor only inside the functions that
need it, so `import posttrain.compress.llmc` works without the extra; calling a wrapper without it raises
`QuantExtraMissing`, an ImportError whose message names the install command.

Guarantees of every wrapper (`quantize_gptq`, `quantize_awq`, `quantize_rtn`, `prune_sparsegpt`, `prune_wanda`):
- the model and tokenizer load from `model_dir` with `posttrain.models.loading` (so "embedded" works), in float32;
- calibration uses only the texts given, tokenized by `calibration_dataset` (nothing is downloaded), in the given
  order (llm-compressor's shuffling is turned off), so a run is repeatable on the same machine;
- `out_dir` receives a checkpoint that plain `transformers.AutoModelForCausalLM.from_pretrained` loads, plus the
  tokenizer (chat template included) and llm-compressor's `recipe.yaml`; the return value is `out_dir`;
- every `nn.Linear` except `lm_head` is compressed; `lm_head` and the embeddings keep their float weights.

Quantization (`quantize_*`) writes compressed-tensors "pack-quantized" weights (`config.json` gains
`quantization_config` with quant_method "compressed-tensors", the group size and `ignore: ["lm_head"]`); loading it
needs the `compressed-tensors` package next to transformers (not llm-compressor). The scheme is symmetric int
weights with one scale per `group_size` input columns, activations left in 16/32-bit (W4A16 at the default 4 bits).
The groups are given explicitly (`config_groups`), not
via the "W4A16" preset, so group sizes below the preset's 128 work on small hidden sizes; every quantized layer's
input width must be a multiple of `group_size` (llm-compressor checks this before calibrating and raises a
ValueError listing the layers that are not).

Pruning (`prune_*`) writes an ordinary dense checkpoint whose pruned weights are zeros (no `quantization_config`):
no runtime skips those zeros, so there is no speed-up on CPU (torch's 2:4 semi-structured kernels are CUDA-only, and
llm-compressor no longer writes a 2:4 compressed format); the gain is what a later sparse-aware runtime makes of it.
Wanda's edge over magnitude pruning is its activation awareness: on the tiny test model without activation-outlier
channels it was no better than per-row magnitude pruning (tests/compress/test_llmc.py runs it on one with them).

Not thread-safe: llm-compressor keeps one global compression session, and the AWQ CPU guard patches a class
attribute; calls are serialised with a lock, which does not protect against other code using llm-compressor directly.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'posttrain[quant]'"

# llm-compressor's session is process-global; two oneshot calls at once would share it.
_ONESHOT_LOCK = threading.RLock()

Sample = str | dict[str, Any]


class QuantExtraMissing(ImportError):
    """llm-compressor (the `quant` extra) is not installed in this environment."""


def require_llmcompressor() -> Any:
    """Import and return the `llmcompressor` module, or raise `QuantExtraMissing` naming the install command."""
    try:
        import llmcompressor
    except ImportError as exc:
        raise QuantExtraMissing(
            f"llm-compressor is not installed: {INSTALL_HINT} (it needs transformers>=5.15,<=5.17, so install it in "
            f"a separate environment; `make test` builds one in .venv-quant) [{exc}]") from exc
    return llmcompressor


# --------------------------------------------------------------------------------------------------- calibration

def calibration_ids(tokenizer: Any, sample: Sample, max_seq_length: int) -> list[int]:
    """Token ids of one calibration sample, cut to its first `max_seq_length` tokens.

    A normalised row `{"prompt": messages, "completion": messages}` is rendered through the tokenizer's chat template
    exactly as training sees it (`posttrain.data.tokenize.encode_completion`: one BOS, end-of-turn included); a row
    with only a `prompt` gives the rendered prompt with the generation prompt; a plain string is tokenized as plain
    text with the tokenizer's own special-token rules.
    """
    from ..data.tokenize import encode_completion, encode_prompt

    if isinstance(sample, str):
        ids = list(tokenizer(sample, add_special_tokens=True)["input_ids"])
    elif isinstance(sample, dict) and "prompt" in sample:
        if sample.get("completion"):
            # No max_length here: calibration wants the first tokens of the whole conversation, and
            # encode_completion drops rows whose prompt alone fills max_length.
            ids = encode_completion(tokenizer, sample["prompt"], sample["completion"]).input_ids
        else:
            ids = encode_prompt(tokenizer, sample["prompt"])
    else:
        got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise ValueError(f"a calibration sample must be a string or a row with 'prompt' (and 'completion'); got {got}")
    return ids[:max_seq_length]


def calibration_dataset(tokenizer: Any, samples: Sequence[Sample], *, num_samples: int, max_seq_length: int) -> Any:
    """An in-memory `datasets.Dataset` with `input_ids` and `attention_mask` (all ones, no padding).

    Takes the first `num_samples` samples that give at least one token, in order, each cut to `max_seq_length`
    tokens (see `calibration_ids`); raises ValueError when none is left.
    """
    from datasets import Dataset

    if num_samples < 1 or max_seq_length < 1:
        raise ValueError(f"num_samples and max_seq_length must be >= 1 (got {num_samples}, {max_seq_length})")
    rows: list[list[int]] = []
    for sample in samples:
        ids = calibration_ids(tokenizer, sample, max_seq_length)
        if ids:
            rows.append(ids)
        if len(rows) == num_samples:
            break
    if not rows:
        raise ValueError("no calibration sample produced a token; give some calibration texts")
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


# ------------------------------------------------------------------------------------------------------- recipes

def weight_config_groups(*, bits: int, group_size: int) -> dict[str, Any]:
    """compressed-tensors `config_groups`: symmetric int `bits` weights, one scale per `group_size` input columns,
    on every Linear (activations untouched)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 (the widths pack-quantized stores), got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return {"group_0": {"targets": ["Linear"],
                        "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                                    "group_size": group_size}}}


def rtn_recipe(*, bits: int = 4, group_size: int = 128) -> list[Any]:
    """Round-to-nearest: `QuantizationModifier` alone (min-max scales, no calibration data used)."""
    require_llmcompressor()
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(config_groups=weight_config_groups(bits=bits, group_size=group_size),
                                 ignore=["lm_head"])]


def gptq_recipe(*, bits: int = 4, group_size: int = 128) -> list[Any]:
    """GPTQ: `GPTQModifier` with the same scheme as `rtn_recipe` (rounding corrected with calibration Hessians)."""
    require_llmcompressor()
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(config_groups=weight_config_groups(bits=bits, group_size=group_size), ignore=["lm_head"])]


def awq_recipe(*, bits: int = 4, group_size: int = 128) -> list[Any]:
    """AWQ: `AWQModifier()` (activation-aware smoothing scales, grid-searched per norm/linear mapping) followed by the
    `rtn_recipe` quantization. `llmcompressor.modifiers.awq.AWQModifier(scheme=...)` is a deprecated shim, hence the
    `transform.awq` import."""
    require_llmcompressor()
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(), *rtn_recipe(bits=bits, group_size=group_size)]


def _mask_structure(sparsity: float, pattern: str | None) -> str:
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    if pattern is None:
        return "0:0"  # llm-compressor's spelling of "unstructured"
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'N:M' (e.g. '2:4') or None, got {pattern!r}") from None
    if not 0 < n < m or abs(sparsity - (1 - n / m)) > 1e-9:
        raise ValueError(f"pattern {pattern!r} keeps {n} of every {m} weights, i.e. sparsity {1 - n / m:g}; "
                         f"got sparsity {sparsity:g}")
    # Our "N:M" is the usual one (N non-zeros kept per M, as in NVIDIA's 2:4); llm-compressor's mask_structure
    # "N:M" prunes N of every M (its top-k of the N smallest), so pass the complement.
    return f"{m - n}:{m}"


# llm-compressor's pruning modifiers name a directly targeted module "<name>." (trailing dot), so ignore=["lm_head"]
# does not match and lm_head (with tied embeddings: the embeddings too) gets pruned; a regex does match.
_PRUNE_IGNORE = ["re:.*lm_head"]


def sparsegpt_recipe(*, sparsity: float = 0.5, pattern: str | None = "2:4") -> list[Any]:
    """SparseGPT: pruning with GPTQ-style error compensation (the remaining weights are updated)."""
    require_llmcompressor()
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    return [SparseGPTModifier(sparsity=sparsity, mask_structure=_mask_structure(sparsity, pattern),
                              targets=["Linear"], ignore=_PRUNE_IGNORE)]


def wanda_recipe(*, sparsity: float = 0.5, pattern: str | None = None) -> list[Any]:
    """Wanda: drop the weights with the lowest |W_ij|·‖X_j‖ within each output row; no weight update."""
    require_llmcompressor()
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return [WandaPruningModifier(sparsity=sparsity, mask_structure=_mask_structure(sparsity, pattern),
                                 targets=["Linear"], ignore=_PRUNE_IGNORE)]


# ---------------------------------------------------------------------------------------------------- AWQ on CPU

def _accelerator_available() -> bool:
    import torch

    # The same test llm-compressor uses to pick its device (utils.dev.get_main_device).
    return bool(torch.accelerator.is_available())


def _no_pin_memory(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
    """Stand-in for `IntermediatesCache.pin_memory` on machines without an accelerator: pinning only speeds up
    host-to-device copies, and there is no device to copy to."""


@contextlib.contextmanager
def cpu_pin_memory_guard() -> Iterator[bool]:
    """Make `IntermediatesCache.pin_memory` a no-op for the duration of the block, only when no accelerator exists.

    Why: llm-compressor 0.14.0.1's AWQ smoothing pins its cached activations unconditionally, and pinning memory on a
    machine without an accelerator raises "Cannot access accelerator device when none is available", so AWQ cannot
    run on CPU. Yields True when the patch is in place; the original method is restored on exit, also on error.
    With an accelerator present nothing is changed (yields False).
    """
    require_llmcompressor()
    from llmcompressor.pipelines.cache import IntermediatesCache

    if _accelerator_available():
        yield False
        return
    original = IntermediatesCache.__dict__["pin_memory"]
    IntermediatesCache.pin_memory = _no_pin_memory
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


# ------------------------------------------------------------------------------------------------ run and save

def apply_recipe(model: Any, tokenizer: Any, recipe: list[Any], calibration: Sequence[Sample] | None, *,
                 num_samples: int = 128, max_seq_length: int = 512, cpu_guard: bool = True) -> Any:
    """Run llm-compressor's `oneshot` on `model` in place and return it.

    `calibration` None runs without data, which only data-free recipes (`rtn_recipe`) accept. The returned model
    computes with the quantized (fake-quantized, float) or pruned weights, so its logits are what the saved
    checkpoint reproduces. `cpu_guard` wraps the run in `cpu_pin_memory_guard` (needed for AWQ on a machine
    without an accelerator; harmless otherwise); turn it off only to observe the failure it prevents.
    """
    require_llmcompressor()
    from llmcompressor import oneshot

    data: dict[str, Any] = {}
    if calibration is not None:
        dataset = calibration_dataset(tokenizer, calibration, num_samples=num_samples, max_seq_length=max_seq_length)
        data = {"dataset": dataset, "num_calibration_samples": len(dataset), "max_seq_length": max_seq_length,
                "shuffle_calibration_samples": False}
    guard = cpu_pin_memory_guard() if cpu_guard else contextlib.nullcontext()
    with _ONESHOT_LOCK, guard:
        oneshot(model=model, recipe=recipe, **data)
    model.eval()
    return model


def save_compressed(model: Any, tokenizer: Any, out_dir: str | Path, *, quantized: bool) -> Path:
    """Save a model that went through `apply_recipe`, with its tokenizer, to `out_dir`.

    `quantized=True` writes compressed-tensors pack-quantized weights; saving compresses the in-memory model too, so
    do not run it afterwards. `quantized=False` (pruning) writes dense float weights, zeros included, and leaves the
    model usable.
    """
    from ..models.files import give_umask_modes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _ONESHOT_LOCK:
        model.save_pretrained(out, save_compressed=quantized)
    tokenizer.save_pretrained(out)
    give_umask_modes(out)
    return out


def _load(model_dir: str | Path) -> tuple[Any, Any]:
    from ..models.loading import load_model, load_tokenizer

    return load_model(str(model_dir)), load_tokenizer(str(model_dir))


def _run(model_dir: str | Path, out_dir: str | Path, calibration: Sequence[Sample] | None, recipe: list[Any], *,
         quantized: bool, num_samples: int, max_seq_length: int) -> Path:
    model, tokenizer = _load(model_dir)
    apply_recipe(model, tokenizer, recipe, calibration, num_samples=num_samples, max_seq_length=max_seq_length)
    return save_compressed(model, tokenizer, out_dir, quantized=quantized)


def quantize_gptq(model_dir: str | Path, out_dir: str | Path, calibration_texts: Sequence[Sample], *,
                  group_size: int = 128, bits: int = 4, num_samples: int = 128, max_seq_length: int = 512) -> Path:
    """GPTQ W4A16 (at bits=4) of `model_dir` into `out_dir` as compressed-tensors pack-quantized; see the module
    docstring for what every wrapper guarantees."""
    return _run(model_dir, out_dir, calibration_texts, gptq_recipe(bits=bits, group_size=group_size),
                quantized=True, num_samples=num_samples, max_seq_length=max_seq_length)


def quantize_awq(model_dir: str | Path, out_dir: str | Path, calibration_texts: Sequence[Sample], *,
                 group_size: int = 128, bits: int = 4, num_samples: int = 128, max_seq_length: int = 512) -> Path:
    """AWQ smoothing then W4A16 (at bits=4) round-to-nearest, saved as compressed-tensors pack-quantized. On a
    machine without an accelerator it runs under `cpu_pin_memory_guard` (see there why)."""
    return _run(model_dir, out_dir, calibration_texts, awq_recipe(bits=bits, group_size=group_size),
                quantized=True, num_samples=num_samples, max_seq_length=max_seq_length)


def quantize_rtn(model_dir: str | Path, out_dir: str | Path, calibration_texts: Sequence[Sample] | None = None, *,
                 group_size: int = 128, bits: int = 4, num_samples: int = 128, max_seq_length: int = 512) -> Path:
    """Round-to-nearest W4A16 (at bits=4), the baseline GPTQ and AWQ are measured against; same format.

    Data-free: min-max scales come from the weights alone, so the result does not depend on `calibration_texts`
    (accepted, and tokenized when given, only so that the five wrappers share one signature)."""
    return _run(model_dir, out_dir, calibration_texts, rtn_recipe(bits=bits, group_size=group_size),
                quantized=True, num_samples=num_samples, max_seq_length=max_seq_length)


def prune_sparsegpt(model_dir: str | Path, out_dir: str | Path, calibration_texts: Sequence[Sample], *,
                    sparsity: float = 0.5, pattern: str | None = "2:4", num_samples: int = 128,
                    max_seq_length: int = 512) -> Path:
    """SparseGPT pruning to `sparsity`; the weights kept are updated to compensate.

    `pattern` "N:M": at most N non-zeros in every M consecutive input weights of a row (the usual meaning: "2:4"
    keeps 2 of 4), so sparsity must be 1 - N/M.
    None: unstructured; within each block of 128 input columns, `sparsity` of the block's weights are zeroed across
    all rows, plus the one at llm-compressor's `<=` threshold (and any ties), so a layer's sparsity can exceed the
    target by about one weight per block. Saved as a dense checkpoint with zeros: no CPU speed-up exists."""
    return _run(model_dir, out_dir, calibration_texts, sparsegpt_recipe(sparsity=sparsity, pattern=pattern),
                quantized=False, num_samples=num_samples, max_seq_length=max_seq_length)


def prune_wanda(model_dir: str | Path, out_dir: str | Path, calibration_texts: Sequence[Sample], *,
                sparsity: float = 0.5, pattern: str | None = None, num_samples: int = 128,
                max_seq_length: int = 512) -> Path:
    """Wanda pruning to `sparsity`; the weights kept are not changed.

    `pattern` "N:M" as in `prune_sparsegpt`; None (the default): unstructured, exactly floor(in_features·sparsity)
    weights zeroed in every output row. Saved as a dense checkpoint with zeros: no CPU speed-up exists."""
    return _run(model_dir, out_dir, calibration_texts, wanda_recipe(sparsity=sparsity, pattern=pattern),
                quantized=False, num_samples=num_samples, max_seq_length=max_seq_length)
