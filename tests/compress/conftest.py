"""Fixtures shared by the compression tests."""

import os
import sys

import pytest


@pytest.fixture
def llama_quantize_on_path(tmp_path, monkeypatch):
    """A stand-in `llama-quantize` first on PATH, the only llama.cpp quantizer these tests can find: it writes its
    arguments to `tmp_path/args` and copies its input to its output. Returns the script's path."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "llama-quantize"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncp "$1" "$2"\n')
    script.chmod(0o755)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # no llama-cpp-python
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("POSTTRAIN_LIBLLAMA", raising=False)  # an explicit libllama would come before PATH
    return script
