"""`posttrain eval` end to end on the embedded model: every benchmark from ../shared/datasets with a small limit,
writing the contract's JSON (results with n and intervals, samples_path), MT-Bench with the model as its own judge."""

import json

import pytest

from posttrain.cli import main

pytestmark = pytest.mark.slow

ALL = "mmlu,arc_easy,arc_challenge,gsm8k,truthfulqa_mc1,truthfulqa_mc2,humaneval,mt_bench"
METRICS = {"mmlu": {"acc"}, "arc_easy": {"acc", "acc_norm"}, "arc_challenge": {"acc", "acc_norm"},
           "gsm8k": {"exact_match_strict", "exact_match_flexible"}, "truthfulqa_mc1": {"mc1"},
           "truthfulqa_mc2": {"mc2"}, "humaneval": {"pass@1"}}


def test_every_benchmark_runs_on_the_embedded_model(datasets_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", "embedded", "--benchmarks", ALL, "--data-dir", str(datasets_dir), "--limit", "3",
                 "--allow-code-execution", "--judge", "self", "--max-new-tokens", "48", "--output", str(out),
                 "--quiet"])
    assert code == 0
    result = json.loads(out.read_text())
    for bench, names in METRICS.items():
        metrics = result["results"][bench]
        assert names <= set(metrics), bench
        for name in names:
            m = metrics[name]
            assert m["n"] == 3 and 0.0 <= m["value"] <= 1.0
            assert m["ci_low"] <= m["value"] <= m["ci_high"]
    # MT-Bench: the judge is the 0.6M-parameter model itself; whatever it produced is counted, nothing invented.
    mt = result["settings"]["mt_bench"]
    assert mt["judgments"] == 6
    parsed = result["results"]["mt_bench"].get("score", {}).get("n", 0)
    assert parsed + mt["judge_failures"] == 6
    assert any("only comparable under the same judge" in n for n in result["notes"]["mt_bench"])
    samples = [json.loads(line) for line in open(result["samples_path"])]
    assert {s["benchmark"] for s in samples} == set(ALL.split(","))


def test_humaneval_without_the_opt_in_is_skipped_not_run(datasets_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "embedded", "--benchmarks", "humaneval", "--data-dir", str(datasets_dir),
                 "--limit", "2", "--output", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["results"] == {} and "allow" in result["skipped"]["humaneval"].lower()
