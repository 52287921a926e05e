"""One entry point for every compression method: `compress(model, method, out_dir, calibration)`.

Method strings (the `posttrain compress --method` contract): int8_rtn, gptq, awq, gguf:f16 | f32 | bf16 | q8_0 |
q4_0 | q4_k_m | q5_k_m | q6_k, prune:magnitude:<sparsity>, prune:wanda:<sparsity>, prune:sparsegpt:<sparsity or
N:M>, prune:magnitude:2:4, prune:width:<ffn fraction>, prune:depth:<layers>, distill:logit | feature | progressive.

Guarantees: the artifact is written under `out_dir`, reloaded from disk and measured against the uncompressed model
(`compress.measure`): size, load time, tokens/s with the runtime named, held-out perplexity of both, top-1 agreement;
`compression.json` next to it holds all of that with `method`, `artifact`, `size_bytes`, `base_size_bytes`,
`perplexity`, `base_perplexity`, `top1_agreement`, `seconds` (the compression's own wall time), and what the held-out
positions are (`scored_on`, `scored_rows`, `max_new_tokens`: the completions of the rows, or the uncompressed model's
own greedy completions of prompts that have none, see `compress.measure`). A method whose library is missing raises
with what to install; nothing is reported for it.

Dispatch: gptq, awq and prune:sparsegpt run llm-compressor (`compress.llmc`) only; prune:wanda runs llm-compressor's
Wanda when llmcompressor imports, else posttrain's reference Wanda (`compress.prune`), and `details.implementation`
says which ran. Distillation trains on the calibration rows as `distill.as_distillation_rows` turns them into SFT
rows (pairs: the chosen side; prompts without a completion, e.g. verifiable ones: the teacher's greedy completion)
and `details.data` counts each source. Method options (`compress.options` in a run config) are validated by
`parse_options`: an unknown key is refused naming it and the known ones.

A reward model (a `*ForSequenceClassification` checkpoint) compresses with int8_rtn only (backbone linears int8,
the score head in float, reloaded as a reward model) and is measured on held-out preference pairs: `reward` holds
the score agreement, perplexity / top-1 agreement / tokens/s are null (`compress.measure`). Any other method on a
reward model raises NotImplementedError naming what is supported, before anything is written (GGUF, llm-compressor,
pruning and distillation all load and save causal LMs, which would drop the score head). `notes` in
compression.json lists what was not measured and the method's warnings, e.g. GGUF tensors that llama.cpp wrote at
another type than the one asked for (`details.tensor_types` counts the file's tensors per type, `details.fallback`
says which fell back and why).

A posttrain int8 artifact given as the model to compress is refused by `check_supported` (`AlreadyQuantized`, naming
the path) before anything is written: every method starts from float weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..align.engine import TrainOptions, save_pretrained
from ..data.tokenize import encode_completion, encode_prompt
from ..models.loading import int8_artifact, is_reward_model, load_model, load_tokenizer, resolve_model_path
from .measure import MAX_NEW_TOKENS, HeldoutTargets, PairTargets, heldout_targets, measure_artifact, pair_targets

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")


@dataclass(frozen=True)
class Method:
    family: str        # int8 | gptq | awq | gguf | prune | distill
    variant: str = ""  # gguf type, pruning algorithm, distillation kind
    amount: str = ""   # sparsity, N:M, fraction, layer count


def parse_method(method: str) -> Method:
    parts = method.strip().lower().split(":")
    family = parts[0]
    if family in ("int8_rtn", "gptq", "awq") and len(parts) == 1:
        return Method("int8" if family == "int8_rtn" else family)
    if family == "gguf" and len(parts) == 2 and parts[1] in GGUF_TYPES:
        return Method("gguf", parts[1])
    if family == "prune" and len(parts) >= 3 and parts[1] in ("magnitude", "wanda", "sparsegpt", "width", "depth"):
        amount = ":".join(parts[2:])
        _check_prune_amount(method, parts[1], amount)
        return Method("prune", parts[1], amount)
    if family == "distill" and len(parts) == 2 and parts[1] in ("logit", "feature", "progressive"):
        return Method("distill", parts[1])
    raise ValueError(f"unknown compression method {method!r}; expected int8_rtn, gptq, awq, gguf:<{'|'.join(GGUF_TYPES)}>, "
                     "prune:magnitude|wanda|sparsegpt:<sparsity or N:M>, prune:width:<fraction>, prune:depth:<layers>, "
                     "distill:logit|feature|progressive")


def _check_prune_amount(method: str, variant: str, amount: str) -> None:
    """Refuse an amount no model can take, when the method string is read (a run config fails before it runs)."""
    def bad(expected: str) -> ValueError:
        return ValueError(f"compression method {method!r}: expected {expected}, got {amount!r}")

    if variant == "depth":
        if not (amount.isascii() and amount.isdigit() and int(amount) >= 1):
            raise bad("a positive whole number of decoder layers to remove, e.g. prune:depth:1")
        return
    if variant != "width" and ":" in amount:
        from .prune import parse_pattern

        try:
            parse_pattern(amount)
        except ValueError:
            raise bad(f"an N:M pattern with 0 < N < M, e.g. prune:{variant}:2:4") from None
        return
    try:
        value = float(amount)
    except ValueError:
        value = float("nan")
    if variant == "width" and not 0 <= value < 1:
        raise bad("the fraction of FFN neurons to remove, a number in [0, 1), e.g. prune:width:0.25")
    if variant != "width" and not 0 < value < 1:
        raise bad(f"a sparsity in (0, 1) or an N:M pattern, e.g. prune:{variant}:0.5 or prune:{variant}:2:4")


# Distillation's loop when compress.options.train does not say otherwise (a fresh student needs a high lr), and
# progressive KD's temperature schedule when compress.options.distill sets neither end (so it does anneal).
DISTILL_TRAIN_DEFAULTS = {"steps": 50, "batch_size": 8, "lr": 1e-3}
PROGRESSIVE_DEFAULTS = {"temperature": 2.0, "final_temperature": 1.0}


class MethodOptions(BaseModel):
    """`compress.options`: settings of the methods (each key is used only by the methods named)."""

    model_config = ConfigDict(extra="forbid")

    group_size: int = Field(128, ge=1, description="gptq, awq: input columns per quantization scale")
    head_fraction: float = Field(0.0, ge=0, lt=1, description="prune:width: share of attention heads removed too")
    student: str | None = Field(None, description="distill: an initial student checkpoint")
    student_config: str | None = Field(None, description="distill: a config (dir or json) for a fresh student; "
                                                         "default: the teacher's with half the layers")
    train: dict[str, Any] = Field(default_factory=dict, description="distill: the loop's TrainOptions (steps, "
                                  f"batch_size, lr, ...), over {DISTILL_TRAIN_DEFAULTS}")
    distill: dict[str, Any] = Field(default_factory=dict, description="distill: DistillSettings (loss, "
                                    "temperature, final_temperature, alpha, feature_weight, ...); the kind comes from "
                                    f"the method; progressive defaults to {PROGRESSIVE_DEFAULTS}")

    def train_options(self) -> TrainOptions:
        return TrainOptions(**{**DISTILL_TRAIN_DEFAULTS, **self.train})

    def distill_settings(self, kind: str) -> Any:
        from .distill import DistillSettings

        defaults = PROGRESSIVE_DEFAULTS if kind == "progressive" and not (
            {"temperature", "final_temperature"} & set(self.distill)) else {}
        return DistillSettings(**{**defaults, **self.distill, "kind": kind})


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())


def parse_options(options: dict[str, Any] | None) -> MethodOptions:
    """Validate `compress.options`; raise ValueError naming the unknown or bad key and what is accepted."""
    from .distill import DistillSettings

    options = dict(options or {})
    known = sorted(MethodOptions.model_fields)
    for key in options:
        if key not in MethodOptions.model_fields:
            hint = (f" (a distillation loop setting: compress.options.train.{key})" if key in TrainOptions.model_fields
                    else f" (a distillation setting: compress.options.distill.{key})"
                    if key in DistillSettings.model_fields else "")
            raise ValueError(f"compress.options: unknown key {key!r}{hint}; expected one of {', '.join(known)}")
    try:
        parsed = MethodOptions(**options)
    except ValidationError as exc:
        raise ValueError(f"compress.options: {_problems(exc)}") from None
    for section, model, exclude in (("train", TrainOptions, ()), ("distill", DistillSettings, ("kind",))):
        fields = sorted(set(model.model_fields) - set(exclude))
        for key in getattr(parsed, section):
            if key not in fields:
                why = ("is set by the method (distill:logit|feature|progressive)" if key in exclude
                       else "is not a setting")
                raise ValueError(f"compress.options.{section}: {key!r} {why}; expected one of {', '.join(fields)}")
    try:
        parsed.train_options()
        DistillSettings(**{**parsed.distill, "kind": "progressive"})  # types and ranges; the kind is checked later
    except ValidationError as exc:
        section = "train" if exc.title == TrainOptions.__name__ else "distill"
        raise ValueError(f"compress.options.{section}: {_problems(exc)}") from None
    return parsed


def _sparsity(amount: str) -> tuple[float | None, str | None]:
    if ":" in amount:
        return None, amount  # an N:M pattern fixes the sparsity
    value = float(amount)
    if not 0 < value < 1:
        raise ValueError(f"sparsity must be between 0 and 1, got {amount}")
    return value, None


def calibration_ids(tokenizer: Any, rows: Sequence[dict], max_length: int = 256) -> list[list[int]]:
    """Token ids of calibration rows as the model sees them in training (chat template, prompt + completion)."""
    out = []
    for row in rows:
        completion = row.get("completion") or row.get("chosen")
        if completion:
            enc = encode_completion(tokenizer, row["prompt"], completion, max_length=max_length)
            if enc is not None:
                out.append(enc.input_ids)
        else:
            out.append(encode_prompt(tokenizer, row["prompt"])[:max_length])
    if not out:
        raise ValueError("no calibration rows could be tokenized")
    return out


REWARD_MODEL_METHODS = ("int8_rtn",)  # the methods that keep a reward model's score head (see the docstring)


class AlreadyQuantized(ValueError):
    """The model given to compress is a posttrain int8 artifact: its weights are already rounded to int8."""


def check_supported(method: str, model: str) -> None:
    """Refuse, before anything is loaded or written, a `model` (a path or 'embedded') that `method` (valid for
    `parse_method`) cannot compress: a posttrain int8 artifact (`compress.int8`) for any method, with
    `AlreadyQuantized` naming the path (every method starts from float weights, and re-compressing rounded ones
    would compound the errors while being measured against the rounded model, not the original); any method but
    int8_rtn for a reward model, with NotImplementedError naming what is supported."""
    if int8_artifact(resolve_model_path(model)):
        raise AlreadyQuantized(f"{model}: already an int8-quantized posttrain artifact (quantization.json, int8 "
                               f"weights); {method} needs float weights: compress the unquantized model it came "
                               "from instead")
    if parse_method(method).family != "int8" and is_reward_model(model):
        raise NotImplementedError(f"{method} cannot compress the reward model {model} (a sequence-classification "
                                  f"checkpoint); supported for reward models: {', '.join(REWARD_MODEL_METHODS)}")


def _load_base(base_dir: str) -> Any:
    """The uncompressed model as it runs: a reward model with its score head, else a causal LM."""
    if is_reward_model(base_dir):
        from ..align.reward_model import load_reward_model

        return load_reward_model(base_dir).eval()
    return load_model(base_dir)


def _apply(method: Method, base_dir: str, out_dir: Path, rows: Sequence[dict], tokenizer: Any,
           options: MethodOptions) -> tuple[Path, Callable[[], Any], str, dict[str, Any]]:
    """Write the artifact; return (path, loader, runtime name, method details)."""
    from transformers import AutoModelForCausalLM

    # Artifacts reload through load_model: a weight the checkpoint lacks is an error, never a random initialisation.
    hf_loader = lambda path: (lambda: load_model(str(path)))  # noqa: E731
    texts = [tokenizer.decode(ids) for ids in calibration_ids(tokenizer, rows)]
    if method.family == "int8":
        from .int8 import load_int8, quantize_model_to_dir

        path = quantize_model_to_dir(_load_base(base_dir), tokenizer, out_dir)
        return path, lambda: load_int8(path), "transformers (int8 dequantized on the fly)", {}
    if method.family in ("gptq", "awq"):
        from . import llmc

        fn = llmc.quantize_gptq if method.family == "gptq" else llmc.quantize_awq
        path = fn(base_dir, out_dir, texts, group_size=options.group_size)
        return Path(path), hf_loader(path), "transformers + compressed-tensors", {
            "group_size": options.group_size, "bits": 4}
    if method.family == "gguf":
        from .gguf_export import LLAMA_CPP_TYPES, export_gguf, find_llama_quantizer, tensor_types, type_fallbacks
        from .modelfile import write_modelfile

        gguf_details: dict[str, Any] = {}
        if method.variant.upper() in LLAMA_CPP_TYPES:  # K-quants: say which llama.cpp quantizer export_gguf uses
            kind, quantizer = find_llama_quantizer()
            gguf_details["quantizer"] = {"kind": kind,
                                         "path": getattr(quantizer, "__file__", None) if kind == "python"
                                         else str(quantizer)}
        out_dir.mkdir(parents=True, exist_ok=True)
        path = export_gguf(base_dir, out_dir / f"model-{method.variant}.gguf", method.variant)
        gguf_details["modelfile"] = str(write_modelfile(path, tokenizer))
        # What the file holds, read back: llama.cpp substitutes types for rows its blocks do not fit.
        gguf_details["tensor_types"] = tensor_types(path)
        fallback = type_fallbacks(path, method.variant)
        if fallback is not None:
            gguf_details["fallback"] = fallback
            gguf_details["notes"] = [fallback["note"]]
        loader = lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)  # noqa: E731
        return path, loader, "transformers (GGUF dequantized to fp32)", gguf_details
    model = load_model(base_dir)
    calib = calibration_ids(tokenizer, rows[:16])
    if method.family == "prune":
        details: dict[str, Any] = {}
        if method.variant in ("magnitude", "wanda", "sparsegpt"):
            from . import llmc
            from .prune import DEFAULT_SKIP, parse_pattern, prune_magnitude, prune_wanda, sparsity_report

            sparsity, pattern = _sparsity(method.amount)
            dense_zeros = "saved as dense zeros: no CPU speed-up exists for unstructured or 2:4 sparsity"
            note = dense_zeros
            if method.variant == "sparsegpt" or (method.variant == "wanda" and _llmcompressor_available()):
                n_m = parse_pattern(pattern) if pattern else None
                fn = llmc.prune_sparsegpt if method.variant == "sparsegpt" else llmc.prune_wanda
                path = Path(fn(base_dir, out_dir, texts, pattern=pattern,
                               sparsity=1 - n_m[0] / n_m[1] if n_m else sparsity))
                # What the checkpoint on disk holds, over the layers pruned (every linear but lm_head).
                return path, hf_loader(path), "transformers (dense zeros)", {
                    "implementation": "llm-compressor", "pattern": pattern,
                    "sparsity": sparsity_report(load_model(str(path)), DEFAULT_SKIP).overall, "note": dense_zeros}
            if method.variant == "magnitude":
                prune_magnitude(model, sparsity, pattern)
            else:
                prune_wanda(model, calib, sparsity, pattern)
                note = (f"llm-compressor is not installed ({llmc.INSTALL_HINT}), so posttrain's reference Wanda ran "
                        "(every layer scored from one pass of the dense model); " + dense_zeros)
            details = {"implementation": "posttrain", "pattern": pattern,
                       "sparsity": sparsity_report(model, DEFAULT_SKIP).overall, "note": note}
        elif method.variant == "width":
            from .structured import prune_width

            details = {"width": prune_width(model, calib, ffn_fraction=float(method.amount),
                                            head_fraction=options.head_fraction)}
        else:
            from .structured import prune_depth

            details = {"depth": prune_depth(model, calib, int(method.amount))}
        path = save_pretrained(model, tokenizer, out_dir)
        return path, hf_loader(path), "transformers", _jsonable(details)
    from .distill import as_distillation_rows, distill

    student = _student(options, model)
    train, settings = options.train_options(), options.distill_settings(method.variant)
    # Only as many rows as the loop can see are converted (teacher completions cost a generation each).
    needed = train.steps * train.batch_size * train.grad_accum
    kd_rows, sources, generation_dropped = as_distillation_rows(model, tokenizer, list(rows[:needed]),
                                                                max_new_tokens=settings.teacher_max_new_tokens)
    result = distill(model, student, tokenizer, kd_rows, train, settings)
    path = save_pretrained(student, tokenizer, out_dir)
    details = {"steps": result.steps, "final": result.final, "data": sources,
               "dropped": {**generation_dropped, **result.dropped}, "student_layers": student.config.num_hidden_layers,
               "settings": settings.model_dump()}
    if result.history and "temperature" in result.history[0]:
        details["temperature"] = {"first": result.history[0]["temperature"],
                                  "last": result.history[-1]["temperature"]}
    return path, hf_loader(path), "transformers", _jsonable(details)


def _llmcompressor_available() -> bool:
    from . import llmc

    try:
        llmc.require_llmcompressor()
    except llmc.QuantExtraMissing:
        return False
    return True


def _student(options: MethodOptions, teacher: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    if options.student:
        return load_model(options.student).train()
    if options.student_config:
        config = AutoConfig.from_pretrained(options.student_config)
        return AutoModelForCausalLM.from_config(config).train()
    # Default student: the teacher's architecture with half the layers (the shape Minitron's depth pruning gives).
    config = teacher.config.__class__(**{**teacher.config.to_dict(),
                                         "num_hidden_layers": max(1, teacher.config.num_hidden_layers // 2)})
    return AutoModelForCausalLM.from_config(config).train()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def measurement_targets(model: str, rows: Sequence[dict],
                        max_new_tokens: int = MAX_NEW_TOKENS) -> HeldoutTargets | PairTargets:
    """The held-out targets every artifact of `model` is measured on (`measure.heldout_targets`; rows without a
    completion are completed greedily by `model` itself, once, so a caller measuring several artifacts of one
    model builds them once and passes them to `compress`; a reward model's are its pairs, `measure.pair_targets`)."""
    base_dir = resolve_model_path(model)
    if is_reward_model(base_dir):  # scored pairs, nothing generated (`measure.pair_targets`)
        return pair_targets(load_tokenizer(model), rows)
    return heldout_targets(load_tokenizer(model), rows, model=load_model(base_dir), max_new_tokens=max_new_tokens)


def compress(model: str, method: str, out_dir: str | Path, calibration: Sequence[dict], *,
             heldout: Sequence[dict] | None = None, options: dict[str, Any] | None = None,
             targets: HeldoutTargets | PairTargets | None = None,
             max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, Any]:
    """Compress `model` (a path or 'embedded') with `method`; write and return the compression.json content.

    Measured on `targets` when given (`measurement_targets` of the same model), else on the `heldout` rows (or the
    calibration's last 8), rows without a completion completed by `model` up to `max_new_tokens` tokens."""
    parsed = parse_method(method)
    parsed_options = parse_options(options)
    base_dir = resolve_model_path(model)
    check_supported(method, base_dir)
    tokenizer = load_tokenizer(model)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    artifact, loader, runtime, details = _apply(parsed, base_dir, out_dir / "artifact", calibration, tokenizer,
                                                parsed_options)
    seconds = time.perf_counter() - started
    base = _load_base(base_dir)
    if targets is None:
        targets = (pair_targets(tokenizer, heldout or calibration[-8:]) if is_reward_model(base_dir) else
                   heldout_targets(tokenizer, heldout or calibration[-8:], model=base, max_new_tokens=max_new_tokens))
    prompt = encode_prompt(tokenizer, (heldout or calibration)[0]["prompt"])
    m = measure_artifact(base, base_dir, artifact, loader, targets, prompt, runtime)
    notes = [*m.notes, *details.pop("notes", [])]
    report = {"method": method, "artifact": str(artifact), **m.as_dict(), "notes": notes,
              "seconds": round(seconds, 3), "details": details}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compression.json").write_text(json.dumps(report, indent=2))
    return report
