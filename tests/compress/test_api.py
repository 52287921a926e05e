"""The compression entry point: method strings, the quality gate, and the pipeline's fallback to a milder method."""

import json

import pytest

from posttrain.agents.compressor import gate_verdict
from posttrain.compress.api import Method, parse_method


@pytest.mark.parametrize("text,expected", [
    ("int8_rtn", Method("int8")), ("gptq", Method("gptq")), ("gguf:q4_k_m", Method("gguf", "q4_k_m")),
    ("prune:sparsegpt:2:4", Method("prune", "sparsegpt", "2:4")), ("prune:width:0.25", Method("prune", "width", "0.25")),
    ("distill:progressive", Method("distill", "progressive"))])
def test_method_strings(text, expected):
    assert parse_method(text) == expected


@pytest.mark.parametrize("bad", ["gguf:q3", "prune:magic:0.5", "distill", "awq:8"])
def test_unknown_methods_are_refused(bad):
    with pytest.raises(ValueError, match="unknown compression method"):
        parse_method(bad)


def test_gate_verdict_names_the_numbers():
    report = {"top1_agreement": 0.9, "positions": 100, "perplexity": 3.0, "base_perplexity": 2.0}
    assert gate_verdict(report, None, None) is None
    assert gate_verdict(report, 0.95, None) == ("top-1 agreement 0.9000 over 100 held-out positions is below the "
                                                "required 0.95")
    assert gate_verdict(report, 0.8, 1.2) == "held-out perplexity 3 is 1.500x the aligned model's 2 (allowed 1.2x)"


@pytest.mark.slow
def test_pipeline_falls_back_to_a_milder_method_and_records_why(tmp_path, capsys):
    from pathlib import Path

    from posttrain.cli import main

    code = main(["demo", "--quiet", "--train.steps", "2", "--runs_dir", str(tmp_path), "--evaluate.limit", "16",
                 "--compress.method", "gguf:q4_0", "--compress.fallback", "[gguf:f32]",
                 "--compress.min_top1_agreement", "1.0"])
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert code == 0, report.get("error")
    c = report["compression"]
    # F32 holds the exact weights, so it always passes a 1.0 gate; Q4_0 passes only if it really agrees everywhere.
    if c["rejected"]:
        assert c["method"] == "gguf:f32" and c["top1_agreement"] == 1.0
        assert c["rejected"][0]["method"] == "gguf:q4_0" and "below the required 1" in c["rejected"][0]["reason"]
    else:
        assert c["method"] == "gguf:q4_0" and c["top1_agreement"] == 1.0
    assert report["accuracy"]["compressed"]["n"] == 16
    gguf = Path(c["path"])
    assert gguf.suffix == ".gguf" and gguf.with_name(f"{gguf.stem}.Modelfile").exists()
