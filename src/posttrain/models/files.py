"""File permissions of saved weights.

Guarantee: after `give_umask_modes(directory)`, every `*.safetensors` file under `directory` has the permission bits
a new file gets here (0o666 less the umask, default ACLs included), like every other file of the checkpoint.

Why: safetensors 0.8 writes each file through a 0600 temporary file that it renames into place, so weights saved
by `save_file` or `save_pretrained` would be readable by their owner only (a vLLM or llama.cpp server running as
another user could not load them), while config and tokenizer files next to them are 0644.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def new_file_mode(directory: str | Path) -> int:
    """The permission bits a new file in `directory` gets, found by creating one: `os.umask` can only be read by
    changing it, for every thread of the process, for a moment."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=".mode-probe-")
    os.close(fd)
    try:
        # mkstemp creates with 0600; reopen-create a fresh name with 0666 to see what the umask and ACLs leave.
        os.unlink(path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        try:
            return stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def give_umask_modes(directory: str | Path) -> None:
    """chmod every `*.safetensors` under `directory` to `new_file_mode` (see the module docstring for why)."""
    directory = Path(directory)
    files = sorted(directory.rglob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return
    mode = new_file_mode(directory)
    for path in files:
        os.chmod(path, mode)
