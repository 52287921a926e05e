"""Model references are checked before transformers sees them: a missing path, a folder that is not a model, a hub
id with the hub offline or unreachable each give one clear error naming the reference and what was expected; the
CLI prints it in one line with exit 2, and in a run the stage that loads the model fails on its first attempt."""

import json
import socket

import pytest

from posttrain.models.loading import ModelSourceError, load_model, load_tokenizer, locate


@pytest.fixture
def hub_online(monkeypatch):
    """No offline switch set, whatever the machine's environment says."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("load", [load_model, load_tokenizer])
def test_missing_directory_is_named(load):
    with pytest.raises(ModelSourceError) as info:
        load("/nonexistent/dir")
    assert str(info.value) == ("/nonexistent/dir: no such directory (expected a local Hugging Face model directory, "
                               "or a hub id 'org/name')")


def test_a_checkpoint_path_with_subfolders_is_a_path_not_a_hub_id():
    with pytest.raises(ModelSourceError, match=r"^runs/x/checkpoints/final: no such directory"):
        load_model("runs/x/checkpoints/final")


def test_folder_without_config_or_tokenizer(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("model: embedded\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as info:
        load_model("./configs")
    assert str(info.value) == ("./configs: directory has no config.json (expected a Hugging Face model directory: "
                               "config.json and *.safetensors or *.bin weights, as save_pretrained writes)")
    with pytest.raises(ModelSourceError) as info:
        load_tokenizer("./configs")
    assert str(info.value).startswith("./configs: directory has no tokenizer files (expected one of tokenizer.json, ")


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelSourceError, match=r"directory has config.json but no weights"):
        load_model(str(tmp_path))


def test_a_file_is_not_a_model_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"model.safetensors: not a directory"):
        load_model(str(path))


def test_offline_hub_id(monkeypatch, hub_online):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as info:
        load_tokenizer("posttrain-tests/no-such-model")
    assert str(info.value) == ("not a local path and the hub is offline (HF_HUB_OFFLINE is set) with no cached copy: "
                               "posttrain-tests/no-such-model")


def test_unreachable_hub_id(monkeypatch, hub_online):
    with socket.socket() as s:  # a local port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ModelSourceError) as info:
        load_model("posttrain-tests/no-such-model")
    assert str(info.value) == (f"not a local path and the hub is unreachable (http://127.0.0.1:{port} did not "
                               "answer): posttrain-tests/no-such-model")


def test_neither_a_directory_nor_a_hub_id(hub_online):
    with pytest.raises(ModelSourceError, match=r"^not a model!: no such directory, and not a hub id either"):
        load_model("not a model!")


def test_a_saved_model_directory_loads(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert locate(str(tmp_path), "model") == str(tmp_path)
    assert load_model(str(tmp_path)).config.vocab_size == len(tiny_tokenizer)
    assert load_tokenizer(str(tmp_path)).get_vocab() == tiny_tokenizer.get_vocab()


@pytest.mark.parametrize("argv", [["eval", "--model", "/nonexistent/dir", "--benchmarks", "mmlu"],
                                  ["compress", "--model", "/nonexistent/dir", "--method", "int8_rtn",
                                   "--calibration", "x.jsonl", "--out", "out"]])
def test_cli_prints_one_line_and_exits_2(argv, capsys, tmp_path, monkeypatch):
    from posttrain.cli import main

    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("posttrain: /nonexistent/dir: no such directory (expected a local Hugging Face model directory, "
                   "or a hub id 'org/name')\n")


def test_in_a_run_the_data_stage_fails_at_once(tmp_path, capsys):
    from posttrain.bus.log import read_events
    from posttrain.cli import main

    assert main(["demo", "--quiet", "--model", "/nonexistent/dir", "--runs_dir", str(tmp_path)]) == 1
    run_dir = tmp_path / capsys.readouterr().out.strip().splitlines()[-1].rsplit("/", 1)[-1]
    failed = [e.envelope.data for e in read_events(run_dir / "events.sqlite") if e.envelope.type == "task.failed.v1"]
    assert [(f["stage"], f["attempts"], f["error_type"]) for f in failed] == [("data", 1, "ModelSourceError")]
    assert failed[0]["reason"] == ("ModelSourceError: /nonexistent/dir: no such directory (expected a local Hugging "
                                   "Face model directory, or a hub id 'org/name')")


def test_readme_model_paths_follow_the_checkpoint_layout():
    """The trainer saves under checkpoints/<method>/final (LoRA: .../adapter and .../merged); a README example
    that points elsewhere fails on a newcomer's first try."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    paths = re.findall(r"runs/<id>/checkpoints/\S*", readme)
    assert paths and all(re.fullmatch(r"runs/<id>/checkpoints/<method>/(final|adapter|merged)", p) for p in paths), \
        paths
