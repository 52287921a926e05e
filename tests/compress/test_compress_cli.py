"""`posttrain compress` end to end through `posttrain.cli.main`, on a tiny saved Llama and a calibration file.

One method of each family the main venv can run: compression.json holds every contract key with finite, measured
values (re-measured here from the artifact on disk), the held-out numbers are those of the calibration file's last 8
rows, and bad input or a missing optional library ends with status 2 and one line saying why. GPTQ / AWQ (marked
`quant`) run only where llm-compressor is installed (.venv-quant).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_llama  # tests/ is on sys.path (the rootdir conftest's folder)

from posttrain.align.engine import save_pretrained
from posttrain.cli import main
from posttrain.compress.api import heldout_targets
from posttrain.compress.measure import artifact_size, compare_on_texts
from posttrain.data import prepare
from posttrain.models.loading import load_model, weights_size_bytes

CONTRACT = ("method", "artifact", "size_bytes", "base_size_bytes", "perplexity", "base_perplexity",
            "top1_agreement", "seconds")
NUMBERS = CONTRACT[2:]
INSTALL_QUANT = "pip install 'posttrain[quant]'"


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def demonstrations(n: int) -> list[dict]:
    return [{"prompt": f"Sam has {a} apples and buys {(7 * a) % 11} more. How many apples?",
             "completion": f"Sam has {a} + {(7 * a) % 11} = {a + (7 * a) % 11}.\n#### {a + (7 * a) % 11}"}
            for a in range(n)]


@pytest.fixture(scope="module")
def base_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    return save_pretrained(make_tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path_factory.mktemp("cli") / "base")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("calib") / "calib.jsonl", demonstrations(24))


@pytest.fixture(scope="module")
def heldout(tiny_tokenizer, calibration):
    """The token ids the CLI must measure on: the calibration file's last 8 rows, completions scored."""
    return heldout_targets(tiny_tokenizer, prepare(str(calibration)).rows[-8:])


def compress_cli(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    code = main(["compress", *args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def posttrain_lines(err: list[str]) -> list[str]:
    return [line for line in err if line.startswith("posttrain:")]


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


def load_int8(path: Path):
    from posttrain.compress.int8 import load_int8 as load

    return load(path)


def check_gguf(artifact: Path, report: dict, base_dir: Path) -> None:
    assert artifact.is_file() and artifact.name == f"model-{report['method'].split(':')[1]}.gguf"
    assert artifact.with_name(f"{artifact.stem}.Modelfile").is_file()


def check_magnitude(artifact: Path, report: dict, base_dir: Path) -> None:
    model = load_model(artifact)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert ((module.weight == 0).sum(1) == module.weight.shape[1] // 2).all(), name  # half of every row


def check_width(artifact: Path, report: dict, base_dir: Path) -> None:
    config = json.loads((artifact / "config.json").read_text())
    assert config["intermediate_size"] == 48  # 64 FFN neurons, a quarter removed
    assert report["details"]["width"]["intermediate_size"] == [64, 48]


def check_depth(artifact: Path, report: dict, base_dir: Path) -> None:
    assert json.loads((artifact / "config.json").read_text())["num_hidden_layers"] == 1


def check_student(artifact: Path, report: dict, base_dir: Path) -> None:
    assert json.loads((artifact / "config.json").read_text())["num_hidden_layers"] == 1  # the --student-config
    assert report["details"]["steps"] == 2  # --steps


def check_int8(artifact: Path, report: dict, base_dir: Path) -> None:
    assert artifact.is_dir() and report["size_bytes"] < report["base_size_bytes"]


@pytest.mark.parametrize("method,extra,loader,check", [
    ("gguf:q8_0", [], load_gguf, check_gguf),
    ("gguf:f16", [], load_gguf, check_gguf),
    ("int8_rtn", [], load_int8, check_int8),
    ("prune:magnitude:0.5", [], load_model, check_magnitude),
    ("prune:width:0.25", [], load_model, check_width),
    ("prune:depth:1", [], load_model, check_depth),
    ("distill:logit", ["--student-config", "STUDENT", "--steps", "2"], load_model, check_student),
])
def test_every_family_writes_a_measured_artifact(capsys, tmp_path, base_dir, calibration, heldout, method, extra,
                                                 loader, check):
    if "STUDENT" in extra:
        config = json.loads((base_dir / "config.json").read_text())
        (tmp_path / "student.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
        extra = [str(tmp_path / "student.json") if a == "STUDENT" else a for a in extra]
    out = tmp_path / "out"
    code, stdout, err = compress_cli(capsys, "--model", str(base_dir), "--method", method,
                                     "--calibration", str(calibration), "--out", str(out), *extra)
    assert code == 0, err
    assert stdout[-1] == str(out / "compression.json")
    report = json.loads((out / "compression.json").read_text())
    assert set(CONTRACT) <= set(report) and report["method"] == method
    assert json.loads(stdout[-2]) == {k: report[k] for k in json.loads(stdout[-2])}  # the printed summary
    for key in NUMBERS:
        assert isinstance(report[key], (int, float)) and not isinstance(report[key], bool), key
        assert math.isfinite(report[key]) and report[key] >= 0, key
    artifact = Path(report["artifact"])
    assert artifact.exists() and out / "artifact" in (artifact, *artifact.parents)
    assert report["size_bytes"] == artifact_size(artifact) > 0
    assert report["base_size_bytes"] == weights_size_bytes(base_dir)
    # The quality numbers are those of the artifact on disk, on the calibration file's held-out rows.
    ppl, base_ppl, agreement, positions = compare_on_texts(load_model(base_dir), loader(artifact).eval(), heldout)
    assert report["positions"] == positions
    assert report["base_perplexity"] == pytest.approx(base_ppl, rel=1e-6)
    assert report["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert report["top1_agreement"] == pytest.approx(agreement, abs=1e-12)
    check(artifact, report, base_dir)


def test_a_different_calibration_file_is_measured_on_its_own_rows(capsys, tmp_path, tiny_tokenizer, base_dir):
    rows = list(reversed(demonstrations(30)))  # other held-out rows than the module's file
    path = write_rows(tmp_path / "other.jsonl", rows)
    code, _, err = compress_cli(capsys, "--model", str(base_dir), "--method", "int8_rtn", "--calibration", str(path),
                                "--out", str(tmp_path / "out"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "compression.json").read_text())
    base = load_model(base_dir)
    heldout = heldout_targets(tiny_tokenizer, prepare(str(path)).rows[-8:])
    _, base_ppl, _, positions = compare_on_texts(base, base, heldout)
    assert (report["base_perplexity"], report["positions"]) == (pytest.approx(base_ppl, rel=1e-6), positions)


def test_a_bad_calibration_row_names_file_row_and_field(capsys, tmp_path, base_dir):
    rows = demonstrations(20)
    rows[4]["completion"] = 5
    path = write_rows(tmp_path / "bad.jsonl", rows)
    code, _, err = compress_cli(capsys, "--model", str(base_dir), "--method", "int8_rtn", "--calibration", str(path),
                                "--out", str(tmp_path / "out"))
    assert code == 2
    assert err == [f"posttrain: {path}: row 5, field 'completion': expected a string or a list of messages, "
                   "got 5 (a number)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--calibration", "MISSING"], "MISSING: expected an existing file or directory, got no such path"),
    (["--calibration", "SHORT"], "need at least 16 calibration rows (8 are held out to measure the artifact), got 10"),
    ([], "--calibration FILE is needed (prompts with completions, pairs or demonstrations)"),
])
def test_missing_or_short_calibration_is_refused(capsys, tmp_path, base_dir, args, message):
    missing, short = tmp_path / "none.jsonl", write_rows(tmp_path / "short.jsonl", demonstrations(10))
    args = [{"MISSING": str(missing), "SHORT": str(short)}.get(a, a) for a in args]
    code, _, err = compress_cli(capsys, "--model", str(base_dir), "--method", "int8_rtn", *args,
                                "--out", str(tmp_path / "out"))
    assert code == 2
    assert err == [f"posttrain: {message.replace('MISSING', str(missing))}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["gguf:q8_0", "int8_rtn", "prune:magnitude:0.5"])
def test_an_int8_artifact_as_the_model_is_refused_naming_it(capsys, tmp_path, tiny_tokenizer, base_dir, calibration,
                                                            method):
    """transformers alone drops an int8 artifact's *.qweight tensors: GGUF exported `blk.N.attn_k.qweight` from a
    random model and measured it against that same random model (top1_agreement 1.0). It is refused instead."""
    from posttrain.compress.api import AlreadyQuantized, compress
    from posttrain.compress.int8 import quantize_model_to_dir

    artifact = quantize_model_to_dir(load_model(base_dir), tiny_tokenizer, tmp_path / "int8")
    message = (f"{artifact}: already an int8-quantized posttrain artifact (quantization.json, int8 weights); "
               f"{method} needs float weights: compress the unquantized model it came from instead")
    code, stdout, err = compress_cli(capsys, "--model", str(artifact), "--method", method, "--calibration",
                                     str(calibration), "--out", str(tmp_path / "out"))
    assert (code, stdout, posttrain_lines(err)) == (2, [], [f"posttrain: {message}"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(AlreadyQuantized) as info:  # the API (a run's compressor) refuses it the same way
        compress(str(artifact), method, tmp_path / "api", prepare(str(calibration)).rows)
    assert str(info.value) == message and not (tmp_path / "api").exists()


def test_an_unknown_method_is_refused_before_anything_is_read(capsys, tmp_path, base_dir):
    code, _, err = compress_cli(capsys, "--model", str(base_dir), "--method", "gguf:q3", "--calibration",
                                str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and err[0].startswith("posttrain: unknown compression method 'gguf:q3'")


@pytest.mark.parametrize("method", ["gptq", "awq", "prune:sparsegpt:2:4"])
def test_llm_compressor_methods_without_the_extra_name_the_install_command(capsys, monkeypatch, tmp_path, base_dir,
                                                                           calibration, method):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # `import llmcompressor` raises ImportError
    code, _, err = compress_cli(capsys, "--model", str(base_dir), "--method", method, "--calibration",
                                str(calibration), "--out", str(tmp_path / "out"))
    assert code == 2
    (line,) = posttrain_lines(err)
    assert line.startswith("posttrain: llm-compressor is not installed: " + INSTALL_QUANT)
    assert not any("Traceback" in e for e in err)
    assert not (tmp_path / "out" / "compression.json").exists()


def test_k_quant_without_llama_cpp_names_what_to_install(capsys, monkeypatch, tmp_path, base_dir, calibration):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("POSTTRAIN_LIBLLAMA", raising=False)  # and no libllama: not named, not under node-llama-cpp
    monkeypatch.setenv("POSTTRAIN_NODE_LLAMA_CPP", str(tmp_path / "no-node-llama-cpp"))
    code, _, err = compress_cli(capsys, "--model", str(base_dir), "--method", "gguf:q4_k_m", "--calibration",
                                str(calibration), "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1
    assert err[0].startswith("posttrain: K-quant GGUF types (Q4_K_M, Q5_K_M, Q6_K) need llama.cpp's quantizer: "
                             "`pip install llama-cpp-python`")
    assert "`llama-quantize` binary on PATH" in err[0]
    assert not (tmp_path / "out").exists()


def test_k_quant_with_llama_quantize_on_path_goes_ahead(capsys, tmp_path, base_dir, calibration,
                                                       llama_quantize_on_path):
    """A `llama-quantize` on PATH (a stand-in that copies its F32 input) lets the K-quant through the CLI check."""
    script = llama_quantize_on_path
    code, _, err = compress_cli(capsys, "--model", str(base_dir), "--method", "gguf:q4_k_m", "--calibration",
                                str(calibration), "--out", str(tmp_path / "out"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert Path(report["artifact"]).name == "model-q4_k_m.gguf" and Path(report["artifact"]).is_file()
    assert (tmp_path / "args").read_text().split()[1:3] == [report["artifact"], "Q4_K_M"]
    assert report["details"]["quantizer"] == {"kind": "binary", "path": str(script)}  # which llama.cpp quantizer ran


@pytest.mark.quant
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_through_the_cli(capsys, tmp_path, base_dir, calibration, heldout, method):
    pytest.importorskip("llmcompressor", reason="needs the quant extra (llmcompressor), see Makefile")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code, stdout, err = compress_cli(capsys, "--model", str(base_dir), "--method", method, "--calibration",
                                     str(calibration), "--group-size", "32", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "compression.json").read_text())
    assert set(CONTRACT) <= set(report) and report["method"] == method
    assert all(math.isfinite(report[k]) for k in NUMBERS)
    artifact = Path(report["artifact"])
    qc = json.loads((artifact / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert report["details"] == {"group_size": 32, "bits": 4}
    assert report["size_bytes"] == artifact_size(artifact) and report["base_size_bytes"] == weights_size_bytes(base_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(artifact).eval()
    ppl, base_ppl, agreement, positions = compare_on_texts(load_model(base_dir), reloaded, heldout)
    assert report["positions"] == positions
    assert (report["perplexity"], report["base_perplexity"]) == (pytest.approx(ppl, rel=1e-6),
                                                                 pytest.approx(base_ppl, rel=1e-6))
    assert report["top1_agreement"] == pytest.approx(agreement, abs=1e-12)


def test_the_embedded_models_directory_calibrates_on_its_own_task_like_the_name(base_dir, tmp_path, capsys,
                                                                                monkeypatch):
    """A directory holding an embedded build (its embedded.json) is the embedded model: no --calibration needed."""
    import shutil

    import posttrain.compress.api as api
    from posttrain.models.embedded import MANIFEST
    from posttrain.tasks import arithmetic

    model_dir = tmp_path / "embedded-copy"
    shutil.copytree(base_dir, model_dir)
    (model_dir / MANIFEST).write_text(json.dumps({"version": "any"}))
    seen = {}

    def fake_compress(model, method, out, rows, heldout, options):
        seen.update(model=model, rows=rows, heldout=heldout)
        raise NotImplementedError("stop here: the calibration rows are what this test checks")
    monkeypatch.setattr(api, "compress", fake_compress)
    code, _, err = compress_cli(capsys, "--model", str(model_dir), "--method", "int8_rtn", "--out",
                                str(tmp_path / "out"))
    train, test = arithmetic.make_splits(seed=0)
    assert seen == {"model": str(model_dir), "rows": arithmetic.sft_rows(train[:256]),
                    "heldout": arithmetic.sft_rows(test[:8])}
    assert code == 2 and posttrain_lines(err) == ["posttrain: stop here: the calibration rows are what this test checks"]
    # without the manifest, a directory still needs --calibration
    (model_dir / MANIFEST).unlink()
    code, _, err = compress_cli(capsys, "--model", str(model_dir), "--method", "int8_rtn", "--out",
                                str(tmp_path / "out2"))
    assert code == 2 and posttrain_lines(err)[0].startswith("posttrain: --calibration FILE is needed")


def test_an_artifact_missing_a_weight_is_refused_when_measured(base_dir, calibration, tmp_path, capsys, monkeypatch):
    """The measurement reloads the written artifact through load_model: a weight missing on disk is an error, not a
    random initialisation measured as if it were the artifact."""
    from safetensors.torch import load_file, save_file

    import posttrain.compress.api as api

    original = api.save_pretrained

    def save_without_a_weight(model, tokenizer, out_dir):
        path = original(model, tokenizer, out_dir)
        weights = load_file(str(path / "model.safetensors"))
        weights.pop("model.layers.0.mlp.down_proj.weight")
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    monkeypatch.setattr(api, "save_pretrained", save_without_a_weight)
    code, _, err = compress_cli(capsys, "--model", str(base_dir), "--method", "prune:magnitude:0.5",
                                "--calibration", str(calibration), "--out", str(tmp_path / "out"))
    lines = posttrain_lines(err)
    assert code == 2 and len(lines) == 1
    assert "model.layers.0.mlp.down_proj.weight" in lines[0] and "at random" in lines[0]
