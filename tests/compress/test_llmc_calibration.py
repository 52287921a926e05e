"""posttrain.compress.llmc without llm-compressor: calibration data, argument checks, the missing-extra error.

These run in the main venv (no `quant` marker): nothing here imports llmcompressor.
"""

from __future__ import annotations

import sys

import pytest

from posttrain.compress import llmc
from posttrain.data.tokenize import encode_completion, encode_prompt

ROWS = [{"prompt": [{"role": "user", "content": f"What is {a} + 2?"}],
         "completion": [{"role": "assistant", "content": f"{a} + 2 = {a + 2}\n#### {a + 2}"}]} for a in range(6)]


def test_rows_are_encoded_like_training(tiny_tokenizer):
    ds = llmc.calibration_dataset(tiny_tokenizer, ROWS, num_samples=10, max_seq_length=512)
    assert ds.column_names == ["input_ids", "attention_mask"]
    assert len(ds) == len(ROWS)
    for row, ids, mask in zip(ROWS, ds["input_ids"], ds["attention_mask"]):
        assert ids == encode_completion(tiny_tokenizer, row["prompt"], row["completion"]).input_ids
        assert mask == [1] * len(ids)
        assert ids.count(tiny_tokenizer.bos_token_id) == 1 and ids[0] == tiny_tokenizer.bos_token_id
        assert ids[-1] == tiny_tokenizer.eos_token_id


def test_prompt_only_rows_strings_truncation_and_count(tiny_tokenizer):
    prompt_only = {"prompt": ROWS[0]["prompt"]}
    text = "Sam has 3 apples and buys 4 more."
    ds = llmc.calibration_dataset(tiny_tokenizer, [prompt_only, text, *ROWS], num_samples=3, max_seq_length=8)
    assert len(ds) == 3
    assert ds["input_ids"][0] == encode_prompt(tiny_tokenizer, ROWS[0]["prompt"])[:8]
    assert ds["input_ids"][1] == tiny_tokenizer(text)["input_ids"][:8]
    assert all(len(ids) <= 8 for ids in ds["input_ids"])


def test_empty_and_malformed_samples_are_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="no calibration sample"):
        llmc.calibration_dataset(tiny_tokenizer, ["", ""], num_samples=4, max_seq_length=16)
    with pytest.raises(ValueError, match="'prompt'"):
        llmc.calibration_dataset(tiny_tokenizer, [{"text": "x"}], num_samples=4, max_seq_length=16)
    with pytest.raises(ValueError, match=">= 1"):
        llmc.calibration_dataset(tiny_tokenizer, ROWS, num_samples=0, max_seq_length=16)


def test_patterns_use_the_usual_n_of_m_meaning():
    # ours: N kept per M; llm-compressor's mask_structure: N pruned per M.
    assert llmc._mask_structure(0.5, "2:4") == "2:4"
    assert llmc._mask_structure(0.75, "1:4") == "3:4"
    assert llmc._mask_structure(0.5, None) == "0:0"
    for sparsity, pattern in [(0.5, "1:4"), (0.5, "2-4"), (0.5, "4:4"), (1.0, None), (0.0, None)]:
        with pytest.raises(ValueError):
            llmc._mask_structure(sparsity, pattern)


def test_weight_scheme_checks():
    groups = llmc.weight_config_groups(bits=4, group_size=32)
    assert groups["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                            "group_size": 32}
    with pytest.raises(ValueError, match="bits"):
        llmc.weight_config_groups(bits=3, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        llmc.weight_config_groups(bits=4, group_size=0)


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # makes `import llmcompressor` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'posttrain\[quant\]'") as info:
        llmc.quantize_gptq(tmp_path / "model", tmp_path / "out", ["text"])
    assert isinstance(info.value, llmc.QuantExtraMissing)
    assert not (tmp_path / "out").exists()
