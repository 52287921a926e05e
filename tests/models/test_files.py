"""Saved weights get the umask's permissions like the files beside them (safetensors alone writes 0600)."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from posttrain.align.engine import save_pretrained
from posttrain.models.files import give_umask_modes, new_file_mode


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_safetensors_alone_writes_0600_and_the_helper_gives_the_umask_mode(tmp_path, umask_027):
    weights = tmp_path / "sub" / "w.safetensors"
    weights.parent.mkdir()
    save_file({"a": torch.zeros(2)}, str(weights))
    assert _mode(weights) == 0o600  # why the helper exists (safetensors 0.8's temporary file)
    assert new_file_mode(tmp_path) == 0o640
    give_umask_modes(tmp_path)
    assert _mode(weights) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]  # the probe file is gone


def test_a_saved_checkpoint_is_readable_like_its_config(tmp_path, tiny_tokenizer, make_llama):
    out = save_pretrained(make_llama(), tiny_tokenizer, tmp_path / "ckpt")
    assert _mode(out / "model.safetensors") == _mode(out / "config.json") == new_file_mode(out)
