"""Shared fixtures for the data-layer tests: a JSONL writer and the real datasets next to the repository."""

import gzip
import json
from pathlib import Path

import pytest

# The repository root's sibling `shared/` (read-only, never copied into the repo).
SHARED_DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture
def write_jsonl():
    def write(path: Path, records: list, *, gz: bool = False) -> Path:
        text = "".join(json.dumps(r) + "\n" for r in records)
        if gz:
            with gzip.open(path, "wt", encoding="utf-8") as fh:
                fh.write(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path
    return write
