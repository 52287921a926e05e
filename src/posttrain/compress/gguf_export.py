"""Export a Hugging Face llama / mistral / qwen2 checkpoint to one GGUF file (llama.cpp, Ollama, LM Studio).

Guarantees of :func:`export_gguf`:
- metadata: ``general.architecture`` ("llama" for Llama and Mistral, "qwen2" for Qwen2), ``general.name``,
  ``general.file_type``, ``general.quantization_version`` and ``<arch>.block_count / context_length /
  embedding_length / feed_forward_length / attention.head_count / attention.head_count_kv /
  attention.layer_norm_rms_epsilon / rope.freq_base / rope.dimension_count / vocab_size`` (plus
  ``attention.key_length / value_length`` when the head size is not hidden / heads, and ``rope.scaling.*`` for
  linear rope scaling); the tokenizer keys come from :mod:`posttrain.compress.gguf_vocab`;
- tensors: every checkpoint tensor is mapped (an unknown name raises instead of being dropped): token_embd,
  output_norm, output (left out when the embeddings are tied; llama.cpp then reuses token_embd), and
  blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down} with their biases
  (qwen2's q/k/v biases). For arch "llama" the q/k rows (and biases) are permuted from HF's rotate-half layout to
  GGML's interleaved rotary layout; qwen2 uses NEOX rotary in llama.cpp and is written unpermuted;
- types: "F32" keeps every tensor float32 (bit-exact with an fp32 checkpoint); "F16", "BF16", "Q8_0", "Q4_0"
  apply to 2-D weights, quantized with gguf-py's numpy quantizers, while 1-D tensors (norms, biases) stay F32.
  A 2-D tensor whose row length is not a multiple of the type's block falls back to F16. With "Q4_0" the output
  projection (output.weight, or token_embd.weight when it doubles as the output) is Q8_0, since llama.cpp's own
  quantizer also keeps that tensor at a higher precision;
- "Q4_K_M", "Q5_K_M", "Q6_K" need llama.cpp's quantizer, the first found of (see :func:`find_llama_quantizer`):
  the libllama named by ``$POSTTRAIN_LIBLLAMA``, llama-cpp-python's ``llama_model_quantize``, a ``llama-quantize``
  binary on PATH, node-llama-cpp's prebuilt libllama (:mod:`posttrain.compress.llama_quantize`). The model is first
  written at the checkpoint's own precision next to the output, quantized by llama.cpp, and the intermediate file
  removed. Without any, a RuntimeError names what to install. K-quants pack rows in blocks of 256: for a tensor
  whose rows are not a multiple of 256, llama.cpp writes Q5_0 for Q4_K, Q5_1 for Q5_K, Q8_0 for Q6_K (F16 when
  the rows are not a multiple of 32 either);
- tensors are streamed one at a time (peak memory is about one tensor, not the model).
What a written file holds is read back with gguf's reader: :func:`tensor_types` counts its tensors per type, and
:func:`type_fallbacks` names the 2-D tensors written at another type than the one asked for, with their row sizes.
Not handled (raises NotImplementedError): rope types other than default / linear (llama3, yarn, ...), other
architectures. Mistral's sliding window is not written (llama.cpp's llama arch attends to the whole context), so
outputs agree with transformers up to the window length.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from posttrain.compress import llama_quantize
from posttrain.compress.gguf_vocab import write_tokenizer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
T = gguf.GGMLQuantizationType
NUMPY_TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0, "Q4_0": T.Q4_0}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
              "Q5_K_M": gguf.LlamaFileType.MOSTLY_Q5_K_M, "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K}
LLAMA_CPP_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")
QTYPES = (*NUMPY_TYPES, *LLAMA_CPP_TYPES)
# The tensor types each quantized file type is meant to be made of: llama.cpp's *_K_M mixes use several K-quants
# (e.g. Q6_K for the output), and our Q4_0 keeps the output at Q8_0 (see `_tensor_type`).
K_QUANTS = frozenset({T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K})
INTENDED_TYPES = {**{q: K_QUANTS for q in LLAMA_CPP_TYPES}, "Q8_0": frozenset({T.Q8_0}),
                  "Q4_0": frozenset({T.Q4_0, T.Q8_0})}

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of an HF tensor, or None for buffers that are not weights (rotary inv_freq)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES['.'.join(parts[3:])]}.{suffix}"
    raise ValueError(f"no GGUF name for checkpoint tensor {hf_name!r}")


def rope_interleave(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection (or its bias) from HF's rotate-half order to GGML's interleaved order: within each
    head, row j of the first half and row j of the second half become rows 2j and 2j+1."""
    rows = weight.shape[0]
    head_dim = rows // n_head
    split = weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{model_dir} has no model.safetensors (or index); save with safe_serialization")


def _rope_theta(config: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or {})  # transformers 5 keeps rope settings here
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the config states no rope_theta")
    return float(theta), params


def _write_hparams(w: gguf.GGUFWriter, config: Any, n_vocab: int) -> int:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, params = _rope_theta(config)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
    elif rope_type != "default":
        raise NotImplementedError(f"rope type {rope_type!r} is not exported (supported: default, linear)")
    w.add_vocab_size(n_vocab)
    return head_dim


def _tensor_type(name: str, shape: tuple[int, ...], qtype: str, tied: bool) -> T:
    if len(shape) == 1 or qtype == "F32":
        return T.F32
    target = NUMPY_TYPES[qtype]
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if qtype == "Q4_0" and is_output:
        target = T.Q8_0
    block = gguf.GGML_QUANT_SIZES[target][0]
    return target if shape[-1] % block == 0 else T.F16


def _encode(array: np.ndarray, qtype: T) -> np.ndarray:
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _plan(model_dir: Path, config: Any, arch: str) -> list[tuple[str, str, Path, tuple[int, ...]]]:
    """(hf name, gguf name, file, shape) for every tensor to write, in a stable order."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = []
    for path in _checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for hf_name in f.keys():
                name = gguf_tensor_name(hf_name)
                if name is None or (tied and name == "output.weight"):
                    continue  # tied: llama.cpp falls back to token_embd when output is absent
                plan.append((hf_name, name, path, tuple(f.get_slice(hf_name).get_shape())))
    names = {p[1] for p in plan}
    for needed in ("token_embd.weight", "output_norm.weight", *(() if tied else ("output.weight",))):
        if needed not in names:  # an untied model without lm_head would silently run with token_embd instead
            raise ValueError(f"the checkpoint has no tensor for {needed}")
    order = {"token_embd": 0, "blk": 1, "output_norm": 2, "output": 3}
    return sorted(plan, key=lambda p: (order[p[1].split(".")[0]],
                                       int(p[1].split(".")[1]) if p[1].startswith("blk.") else 0, p[1]))


def _permuter(name: str, arch: str, config: Any) -> Callable[[np.ndarray], np.ndarray]:
    if arch != "llama":
        return lambda a: a
    n_head = config.num_attention_heads
    if ".attn_q." in name:
        return lambda a: rope_interleave(a, n_head)
    if ".attn_k." in name:
        n_kv = getattr(config, "num_key_value_heads", None) or n_head
        return lambda a: rope_interleave(a, n_kv)
    return lambda a: a


def export_gguf(model_dir: str | Path, out_path: str | Path, qtype: str = "f16", *, name: str | None = None,
                pre_tokenizer: str | None = None) -> Path:
    """Write ``model_dir`` (an HF checkpoint saved with safetensors, plus its tokenizer) to ``out_path`` as GGUF.

    ``qtype`` is one of F32, F16, BF16, Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K (any case). ``name`` sets general.name
    (default: the directory name). ``pre_tokenizer`` overrides the llama.cpp pre-tokenizer name for byte-level
    BPE vocabularies (see ``gguf_vocab.PRE_TOKENIZERS``). Returns the written path."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    qtype = qtype.upper()
    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r} is not one of {', '.join(QTYPES)}")
    if qtype in LLAMA_CPP_TYPES:
        return _export_with_llama_cpp(model_dir, out_path, qtype, name=name, pre_tokenizer=pre_tokenizer)
    config = AutoConfig.from_pretrained(model_dir)
    archs = list(getattr(config, "architectures", None) or [])
    if not archs or archs[0] not in ARCHITECTURES:
        raise NotImplementedError(f"architecture {archs} is not exported (supported: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[archs[0]]
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings and (
            arch == "llama" or getattr(config, "use_sliding_window", False)):
        warnings.warn(f"sliding window {window} is not written: llama.cpp attends to the whole context, so "
                      f"outputs differ from transformers past {window} tokens", stacklevel=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plan = _plan(model_dir, config, arch)
    n_vocab = next(shape[0] for _, n, _, shape in plan if n == "token_embd.weight")
    tied = bool(getattr(config, "tie_word_embeddings", False))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_name(name or model_dir.resolve().name)
    writer.add_file_type(int(FILE_TYPES[qtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, config, n_vocab)
    write_tokenizer(writer, model_dir, tokenizer, n_vocab, pre_tokenizer)

    types = []
    for _, gname, _, shape in plan:
        ttype = _tensor_type(gname, shape, qtype, tied)
        types.append(ttype)
        if ttype == T.F32:
            nbytes = int(np.prod(shape)) * 4
            writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=ttype)
        elif ttype == T.F16:
            writer.add_tensor_info(gname, shape, np.dtype(np.float16), int(np.prod(shape)) * 2, raw_dtype=ttype)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, ttype)
            writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=ttype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ExitStack() as stack:
            files = {path: stack.enter_context(safe_open(path, framework="pt")) for path in {p[2] for p in plan}}
            for (hf_name, gname, path, _), ttype in zip(plan, types):
                # Read through torch: numpy has no bfloat16, and bf16 -> f32 is exact.
                array = files[path].get_tensor(hf_name).to(torch.float32).numpy()
                writer.write_tensor_data(_encode(_permuter(gname, arch, config)(array), ttype))
    except BaseException:
        writer.close()
        out_path.unlink(missing_ok=True)  # never leave a truncated file that looks like a model
        raise
    writer.close()
    return out_path


def find_llama_quantizer() -> tuple[str, Any]:
    """The llama.cpp quantizer to use, in this order:

    1. ("library", path) when ``$POSTTRAIN_LIBLLAMA`` names a libllama: an explicit choice beats whatever is found;
    2. ("python", llama_cpp) when llama-cpp-python is importable;
    3. ("binary", path) for a ``llama-quantize`` on PATH;
    4. ("library", path) for node-llama-cpp's prebuilt libllama (``llama_quantize.find_libllama``), which CI installs
       for its llama.cpp tests: last, since something the user installed on purpose comes first.

    Raises RuntimeError naming what to install when none is available."""
    explicit = os.environ.get(llama_quantize.LIBRARY_ENV)
    if explicit:
        return "library", llama_quantize.find_libllama()  # raises when the variable names no file
    try:
        import llama_cpp  # type: ignore[import-not-found]

        if hasattr(llama_cpp, "llama_model_quantize"):
            return "python", llama_cpp
    except ImportError:
        pass
    binary = shutil.which("llama-quantize")
    if binary:
        return "binary", binary
    library = llama_quantize.find_libllama()
    if library is not None:
        return "library", library
    raise RuntimeError("K-quant GGUF types (Q4_K_M, Q5_K_M, Q6_K) need llama.cpp's quantizer: "
                       "`pip install llama-cpp-python` (builds llama.cpp from source, about 10 minutes on 2 cores) "
                       "or put llama.cpp's `llama-quantize` binary on PATH, or set POSTTRAIN_LIBLLAMA to a libllama "
                       "shared library (node-llama-cpp's prebuilt one is found by itself under "
                       f"{llama_quantize.node_llama_cpp_prefix()}: `npm install --prefix <that folder> "
                       "--ignore-scripts node-llama-cpp`). F32/F16/BF16/Q8_0/Q4_0 need none of these.")


def _export_with_llama_cpp(model_dir: Path, out_path: Path, qtype: str, **kwargs: Any) -> Path:
    kind, quantizer = find_llama_quantizer()
    config = json.loads((model_dir / "config.json").read_text())
    # Quantize from the checkpoint's own precision, so the intermediate file loses nothing.
    source = {"bfloat16": "BF16", "float16": "F16"}.get(config.get("dtype") or config.get("torch_dtype"), "F32")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{source.lower()}.tmp.gguf")
    try:
        export_gguf(model_dir, tmp, source, **kwargs)
        if kind == "python":
            params = quantizer.llama_model_quantize_default_params()
            params.ftype = int(FILE_TYPES[qtype])
            params.nthread = os.cpu_count() or 1
            rc = quantizer.llama_model_quantize(str(tmp).encode(), str(out_path).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize returned {rc} for {qtype}")
        elif kind == "library":
            llama_quantize.quantize_with_libllama(quantizer, tmp, out_path, int(FILE_TYPES[qtype]))
        else:
            run = subprocess.run([quantizer, str(tmp), str(out_path), qtype, str(os.cpu_count() or 1)],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"llama-quantize failed ({run.returncode}): {run.stderr[-2000:]}")
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of the GGUF file at `path` are of each type (e.g. {"F32": 5, "Q4_K": 1, ...})."""
    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def type_fallbacks(path: str | Path, qtype: str) -> dict[str, Any] | None:
    """The 2-D tensors of the GGUF file at `path`, written for `qtype`, that are not of the types `qtype` is made
    of (None when there are none, or for F32 / F16 / BF16): {"tensors", "of" (2-D tensors in the file),
    "types" (count per type written instead), "row_sizes" (their distinct row lengths), "block" (the requested
    type's block size), "short_rows" (how many of them have rows that are not a multiple of it), "note"}.

    Why they fell back: a quantized row is a whole number of blocks (256 values for K-quants, 32 for Q8_0 / Q4_0),
    so llama.cpp (and `_tensor_type`) write a row that is not a multiple of the block at a type whose block fits."""
    qtype = qtype.upper()
    intended = INTENDED_TYPES.get(qtype)
    if intended is None:
        return None
    matrices = [t for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2]
    fell = [t for t in matrices if t.tensor_type not in intended]
    if not fell:
        return None
    block = gguf.GGML_QUANT_SIZES[T.Q4_K if qtype in LLAMA_CPP_TYPES else NUMPY_TYPES[qtype]][0]
    types: dict[str, int] = {}
    for t in fell:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    rows = sorted({int(t.shape[0]) for t in fell})  # GGUF shapes list the row length (ne0) first
    short = sum(int(t.shape[0]) % block != 0 for t in fell)
    kind = "K-quant" if qtype in LLAMA_CPP_TYPES else qtype
    written = ", ".join(f"{n} at {name}" for name, n in sorted(types.items()))
    why = (f"their rows ({', '.join(map(str, rows))} values) are not a multiple of the {block}-value {kind} block"
           if short == len(fell) else f"{short} of them have rows that are not a multiple of the {block}-value "
           f"{kind} block; the others are the quantizer's own choice")
    note = (f"{qtype}: {len(fell)} of {len(matrices)} weight matrices were not written as {kind}s ({written}): "
            f"{why}")
    return {"tensors": len(fell), "of": len(matrices), "types": dict(sorted(types.items())), "row_sizes": rows,
            "block": block, "short_rows": short, "note": note}
