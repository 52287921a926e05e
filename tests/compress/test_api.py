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
    import sqlite3
    from pathlib import Path

    from posttrain.cli import main

    # The gate sits far from both verdicts, so float noise across machines cannot flip them. Measured on this run's
    # held-out rows (verifiable, so the aligned model's greedy completions, 344 positions): magnitude pruning at 0.9
    # agrees with the aligned model on 0.44 of them, at 0.5 on 0.95; a 0.8 gate rejects the first, keeps the second.
    code = main(["demo", "--quiet", "--train.steps", "2", "--runs_dir", str(tmp_path), "--evaluate.limit", "16",
                 "--compress.method", "prune:magnitude:0.9", "--compress.fallback", "[prune:magnitude:0.5]",
                 "--compress.min_top1_agreement", "0.8"])
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert code == 0, report.get("error")
    con = sqlite3.connect(run_dir / "events.sqlite")
    attempts = [json.loads(r[0]) for r in con.execute("SELECT data FROM events WHERE type = 'compress.result.v1' "
                                                      "ORDER BY seq")]
    assert [(a["method"], a["accepted"]) for a in attempts] == [("prune:magnitude:0.9", False),
                                                                ("prune:magnitude:0.5", True)]
    harsh, mild = attempts
    assert harsh["top1_agreement"] < 0.6 and mild["top1_agreement"] > 0.9 and mild["reason"] is None
    assert harsh["positions"] == mild["positions"]
    assert harsh["scored_on"] == mild["scored_on"] == "aligned_greedy_completions"
    assert harsh["reason"] == (f"top-1 agreement {harsh['top1_agreement']:.4f} over {harsh['positions']} held-out "
                               "positions is below the required 0.8")
    c = report["compression"]
    assert c["method"] == "prune:magnitude:0.5" and c["top1_agreement"] == mild["top1_agreement"]
    assert c["rejected"] == [{"method": "prune:magnitude:0.9", "reason": harsh["reason"]}]
    assert f"Rejected by the gate: prune:magnitude:0.9: {harsh['reason']}" in (run_dir / "report.md").read_text()
    assert report["accuracy"]["compressed"]["n"] == 16
    assert Path(c["path"]).is_dir() and Path(c["path"]) != Path(harsh["path"])
