"""Shared fixtures: tiny random models built from configs (no download), and the shared datasets folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"
ORACLE = SHARED / "oracle"

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The builders live in tiny_models.py (a module name no other file on sys.path has): test modules import them from
# there, since `from conftest import` names whichever of the several conftest modules was imported last.
from tiny_models import CORPUS, make_tiny_llama  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skip them, saying so, when there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not available on this machine")
    return path


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    return require(ORACLE)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return require(DATASETS)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from posttrain.models.tokenizer_builder import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_llama(tiny_tokenizer)


@pytest.fixture
def make_llama(tiny_tokenizer):
    """A factory of fresh tiny random Llamas sharing the tiny tokenizer's vocabulary."""
    return lambda seed=0, **kw: make_tiny_llama(tiny_tokenizer, seed=seed, **kw)
