"""One entry point for every compression method: `compress(model, method, out_dir, calibration)`.

Method strings (the `posttrain compress --method` contract): int8_rtn, gptq, awq, gguf:f16 | f32 | bf16 | q8_0 |
q4_0 | q4_k_m | q5_k_m | q6_k, prune:magnitude:<sparsity>, prune:wanda:<sparsity>, prune:sparsegpt:<sparsity or
N:M>, prune:magnitude:2:4, prune:width:<ffn fraction>, prune:depth:<layers>, distill:logit | feature | progressive.

Guarantees: the artifact is written under `out_dir`, reloaded from disk and measured against the uncompressed model
(`compress.measure`): size, load time, tokens/s with the runtime named, held-out perplexity of both, top-1 agreement;
`compression.json` next to it holds all of that with `method`, `artifact`, `size_bytes`, `base_size_bytes`,
`perplexity`, `base_perplexity`, `top1_agreement`, `seconds` (the compression's own wall time). A method whose
library is missing raises with what to install; nothing is reported for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..align.engine import TrainOptions, save_pretrained
from ..data.tokenize import encode_completion, encode_prompt
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from .measure import measure_artifact

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
        return Method("prune", parts[1], ":".join(parts[2:]))
    if family == "distill" and len(parts) == 2 and parts[1] in ("logit", "feature", "progressive"):
        return Method("distill", parts[1])
    raise ValueError(f"unknown compression method {method!r}; expected int8_rtn, gptq, awq, gguf:<{'|'.join(GGUF_TYPES)}>, "
                     "prune:magnitude|wanda|sparsegpt:<sparsity or N:M>, prune:width:<fraction>, prune:depth:<layers>, "
                     "distill:logit|feature|progressive")


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


def heldout_targets(tokenizer: Any, rows: Sequence[dict], max_length: int = 256) -> list[tuple[list[int], int]]:
    """(ids, first scored index) per held-out row: the completion's tokens when the row has one (what the model is
    trained to produce), else every token of the prompt after the first."""
    out = []
    for row in rows:
        completion = row.get("completion") or row.get("chosen")
        if completion:
            enc = encode_completion(tokenizer, row["prompt"], completion, max_length=max_length)
            if enc is not None:
                out.append((enc.input_ids, len(enc.prompt_ids)))
        else:
            out.append((encode_prompt(tokenizer, row["prompt"])[:max_length], 1))
    if not out:
        raise ValueError("no held-out rows could be tokenized")
    return out


def _apply(method: Method, base_dir: str, out_dir: Path, rows: Sequence[dict], tokenizer: Any,
           options: dict[str, Any]) -> tuple[Path, Callable[[], Any], str, dict[str, Any]]:
    """Write the artifact; return (path, loader, runtime name, method details)."""
    from transformers import AutoModelForCausalLM

    hf_loader = lambda path: (lambda: AutoModelForCausalLM.from_pretrained(path))  # noqa: E731
    texts = [tokenizer.decode(ids) for ids in calibration_ids(tokenizer, rows)]
    if method.family == "int8":
        from .int8 import load_int8, quantize_model_to_dir

        path = quantize_model_to_dir(load_model(base_dir), tokenizer, out_dir)
        return path, lambda: load_int8(path), "transformers (int8 dequantized on the fly)", {}
    if method.family in ("gptq", "awq"):
        from . import llmc

        fn = llmc.quantize_gptq if method.family == "gptq" else llmc.quantize_awq
        path = fn(base_dir, out_dir, texts, group_size=int(options.get("group_size", 128)))
        return Path(path), hf_loader(path), "transformers + compressed-tensors", {
            "group_size": int(options.get("group_size", 128)), "bits": 4}
    if method.family == "gguf":
        from .gguf_export import export_gguf
        from .modelfile import write_modelfile

        out_dir.mkdir(parents=True, exist_ok=True)
        path = export_gguf(base_dir, out_dir / f"model-{method.variant}.gguf", method.variant)
        modelfile = write_modelfile(path, tokenizer)
        loader = lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)  # noqa: E731
        return path, loader, "transformers (GGUF dequantized to fp32)", {"modelfile": str(modelfile)}
    model = load_model(base_dir)
    calib = calibration_ids(tokenizer, rows[:16])
    if method.family == "prune":
        details: dict[str, Any] = {}
        if method.variant in ("magnitude", "wanda", "sparsegpt"):
            sparsity, pattern = _sparsity(method.amount)
            if method.variant == "sparsegpt":
                from . import llmc

                path = llmc.prune_sparsegpt(base_dir, out_dir, texts, sparsity=sparsity or 0.5, pattern=pattern)
                return Path(path), hf_loader(path), "transformers (dense zeros)", {"implementation": "llm-compressor"}
            from .prune import prune_magnitude, prune_wanda, sparsity_report

            if method.variant == "magnitude":
                prune_magnitude(model, sparsity, pattern)
            else:
                prune_wanda(model, calib, sparsity, pattern)
            details = {"implementation": "posttrain", "sparsity": sparsity_report(model).overall,
                       "pattern": pattern, "note": "saved as dense zeros: no CPU speed-up exists for unstructured "
                                                   "or 2:4 sparsity"}
        elif method.variant == "width":
            from .structured import prune_width

            details = {"width": prune_width(model, calib, ffn_fraction=float(method.amount),
                                            head_fraction=float(options.get("head_fraction", 0.0)))}
        else:
            from .structured import prune_depth

            details = {"depth": prune_depth(model, calib, int(method.amount))}
        path = save_pretrained(model, tokenizer, out_dir)
        return path, hf_loader(path), "transformers", _jsonable(details)
    from .distill import DistillSettings, distill

    student = _student(options, model)
    train = TrainOptions(**{"steps": 50, "batch_size": 8, "lr": 1e-3, **options.get("train", {})})
    result = distill(model, student, tokenizer, list(rows), train, DistillSettings(kind=method.variant))
    path = save_pretrained(student, tokenizer, out_dir)
    return path, hf_loader(path), "transformers", {"steps": result.steps, "final": result.final}


def _student(options: dict[str, Any], teacher: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    if options.get("student"):
        return load_model(options["student"]).train()
    if options.get("student_config"):
        config = AutoConfig.from_pretrained(options["student_config"])
        return AutoModelForCausalLM.from_config(config).train()
    # Default student: the teacher's architecture with half the layers (the shape Minitron's depth pruning gives).
    config = teacher.config.__class__(**{**teacher.config.to_dict(),
                                         "num_hidden_layers": max(1, teacher.config.num_hidden_layers // 2)})
    return AutoModelForCausalLM.from_config(config).train()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def compress(model: str, method: str, out_dir: str | Path, calibration: Sequence[dict], *,
             heldout: Sequence[dict] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compress `model` (a path or 'embedded') with `method`; write and return the compression.json content."""
    parsed = parse_method(method)
    base_dir = resolve_model_path(model)
    tokenizer = load_tokenizer(model)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    artifact, loader, runtime, details = _apply(parsed, base_dir, out_dir / "artifact", calibration, tokenizer,
                                                dict(options or {}))
    seconds = time.perf_counter() - started
    base = load_model(base_dir)
    texts = heldout_targets(tokenizer, heldout or calibration[-8:])
    prompt = encode_prompt(tokenizer, (heldout or calibration)[0]["prompt"])
    m = measure_artifact(base, base_dir, artifact, loader, texts, prompt, runtime)
    report = {"method": method, "artifact": str(artifact), **m.as_dict(), "seconds": round(seconds, 3),
              "details": details}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compression.json").write_text(json.dumps(report, indent=2))
    return report
