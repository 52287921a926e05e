"""llama.cpp's own GGUF quantizer (K-quants), called through ctypes from a prebuilt ``libllama`` shared library.

Guarantees:
- :func:`find_libllama` names the library, or None: ``$POSTTRAIN_LIBLLAMA`` when set (it must be an existing file,
  else RuntimeError, which the CLI reports as bad input), otherwise the CPU build that the npm package
  node-llama-cpp ships for this machine, under ``$POSTTRAIN_NODE_LLAMA_CPP`` (default: the checkout's
  ``.cache/node-llama-cpp``, where .ci/run installs it) at
  ``node_modules/@node-llama-cpp/linux-<arch>/bins/linux-<arch>/libllama[.<version>].so``. Only Linux CPU builds
  are looked for: the -cuda / -vulkan ones need their GPU runtimes just to load, and quantizing is CPU work. Two
  candidates in that folder raise instead of one being picked silently;
- :func:`quantize_with_libllama` runs ``llama_backend_init``, ``llama_model_quantize_default_params`` and
  ``llama_model_quantize`` in a child Python (stdlib only, ``python -I``): a GGML_ASSERT in llama.cpp calls abort()
  and a library of another ABI can crash, either of which would otherwise take the caller (a pipeline's agents and
  their message bus) down with it; llama.cpp's log also stays out of the caller's terminal. Any failure (a nonzero
  return, a signal) raises RuntimeError with the end of llama.cpp's log, and never leaves a partial output file;
- the params struct is declared field by field as in include/llama.h of the llama.cpp source that node-llama-cpp
  3.21.1 ships (node_modules/node-llama-cpp/llama/gitRelease.bundle): 64 bytes on x86-64, the bytes the library's
  default-params function writes. Trailing headroom follows: the struct is returned through a caller-provided
  buffer, so a library with more fields appended still writes inside ours. Only ``nthread`` and ``ftype`` (the
  first two fields) are changed from llama.cpp's defaults.
The ftype values are llama.h's ``llama_ftype`` (gguf-py's ``LlamaFileType`` mirrors them: Q4_K_M 15, Q5_K_M 17,
Q6_K 18).
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

LIBRARY_ENV = "POSTTRAIN_LIBLLAMA"
PREFIX_ENV = "POSTTRAIN_NODE_LLAMA_CPP"
# platform.machine() -> node-llama-cpp's arch names (its @node-llama-cpp/linux-<arch> packages).
_NODE_ARCH = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "armv7l",
              "riscv64": "riscv64"}


class QuantizeParams(ctypes.Structure):
    """``struct llama_model_quantize_params`` (llama.h), then headroom for fields a newer llama.cpp appends."""

    _fields_ = [
        ("nthread", ctypes.c_int32), ("ftype", ctypes.c_int), ("output_tensor_type", ctypes.c_int),
        ("token_embedding_type", ctypes.c_int), ("allow_requantize", ctypes.c_bool),
        ("quantize_output_tensor", ctypes.c_bool), ("only_copy", ctypes.c_bool), ("pure", ctypes.c_bool),
        ("keep_split", ctypes.c_bool), ("dry_run", ctypes.c_bool), ("imatrix", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p), ("tt_overrides", ctypes.c_void_p), ("prune_layers", ctypes.c_void_p),
        ("max_buf_size", ctypes.c_size_t), ("_headroom", ctypes.c_byte * 256),
    ]


def node_llama_cpp_prefix() -> Path:
    """The folder given to ``npm install --prefix`` for node-llama-cpp (``$POSTTRAIN_NODE_LLAMA_CPP`` or the
    checkout's ``.cache/node-llama-cpp``)."""
    default = Path(__file__).resolve().parents[3] / ".cache" / "node-llama-cpp"
    return Path(os.environ.get(PREFIX_ENV) or default)


def find_libllama() -> Path | None:
    """The libllama to quantize with: ``$POSTTRAIN_LIBLLAMA``, else node-llama-cpp's CPU build here, else None."""
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise RuntimeError(f"{LIBRARY_ENV}={explicit} is not a file (expected a libllama shared library)")
        return Path(explicit)
    arch = _NODE_ARCH.get(platform.machine().lower())
    if not sys.platform.startswith("linux") or arch is None:
        return None
    folder = node_llama_cpp_prefix() / "node_modules" / "@node-llama-cpp" / f"linux-{arch}" / "bins" / f"linux-{arch}"
    found = sorted({*folder.glob("libllama.so"), *folder.glob("libllama.*.so")})  # not libllama-common.so
    if len(found) > 1:
        raise RuntimeError(f"several libllama builds in {folder}: {', '.join(p.name for p in found)}; "
                           f"set {LIBRARY_ENV} to the one to use")
    return found[0] if found else None


def quantize_with_libllama(library: str | Path, src: str | Path, dst: str | Path, ftype: int,
                           nthread: int | None = None) -> Path:
    """Quantize GGUF ``src`` to ``dst`` as llama.cpp file type ``ftype`` with ``library``, in a child process.

    ``nthread`` defaults to every CPU. Returns ``dst``; raises RuntimeError with llama.cpp's log on failure."""
    dst = Path(dst)
    args = [sys.executable, "-I", str(Path(__file__).resolve()), str(library), str(src), str(dst), str(int(ftype)),
            str(nthread or os.cpu_count() or 1)]
    run = subprocess.run(args, capture_output=True, text=True, errors="replace")
    if run.returncode != 0:
        dst.unlink(missing_ok=True)
        how = f"was killed by signal {-run.returncode}" if run.returncode < 0 else f"exited {run.returncode}"
        raise RuntimeError(f"llama_model_quantize from {library} ({src} -> {dst}, ftype {ftype}) {how}:\n"
                           f"{(run.stderr + run.stdout)[-3000:]}")
    return dst


def _quantize_in_this_process(library: str, src: str, dst: str, ftype: int, nthread: int) -> int:
    lib = ctypes.CDLL(library)  # its RUNPATH ($ORIGIN) finds the ggml libraries next to it
    lib.llama_backend_init.restype = None  # llama.h: "Call once at the start of the program" (f16 tables)
    lib.llama_backend_init.argtypes = []
    lib.llama_model_quantize_default_params.restype = QuantizeParams
    lib.llama_model_quantize_default_params.argtypes = []
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(QuantizeParams)]
    lib.llama_backend_init()
    params = lib.llama_model_quantize_default_params()
    params.nthread, params.ftype = nthread, ftype
    return int(lib.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


if __name__ == "__main__":  # the child of quantize_with_libllama: <library> <src> <dst> <ftype> <nthread>
    _lib, _src, _dst, _ftype, _nthread = sys.argv[1:6]
    _rc = _quantize_in_this_process(_lib, _src, _dst, int(_ftype), int(_nthread))
    if _rc != 0:
        print(f"llama_model_quantize returned {_rc}", file=sys.stderr)
    sys.exit(1 if _rc else 0)
