"""`posttrain eval` end to end on the embedded model: every benchmark from ../shared/datasets with a small limit,
writing the contract's JSON (results with n and intervals, samples_path), MT-Bench with the model as its own judge."""

import json

import pytest

from posttrain.cli import main
from posttrain.evaluate.benchmarks.humaneval import pass_at_k
from posttrain.evaluate.stats import mean_interval

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
    from posttrain.evaluate import sandbox

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "embedded", "--benchmarks", "humaneval", "--data-dir", str(datasets_dir),
                 "--limit", "2", "--output", str(out), "--quiet"]) == 1  # nothing was measured
    result = json.loads(out.read_text())
    assert result["results"] == {} and "allow" in result["skipped"]["humaneval"].lower()
    # The isolation is named in words (it read "namespaces: namespaces").
    words = sandbox.NAMESPACES_IN_WORDS[sandbox.NAMESPACES]
    assert result["skipped"]["humaneval"].endswith(f"(resource limits, a timeout; isolation: {words}), never in "
                                                   "this process")
    assert "namespaces: namespaces" not in result["skipped"]["humaneval"]


def test_eval_that_measured_nothing_exits_1_saying_why(tmp_path, capsys):
    """Every requested benchmark skipped (no data under --data-dir, MT-Bench without its data, HumanEval without
    the opt-in): the JSON is still written with each reason, stdout lists them and ends with the JSON's path, and
    one stderr line says nothing was measured."""
    out, missing = tmp_path / "eval.json", tmp_path / "no-such-dir"
    assert main(["eval", "--model", "embedded", "--benchmarks", "arc_easy,mt_bench,humaneval", "--data-dir",
                 str(missing), "--output", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["results"] == {} and list(result["skipped"]) == ["arc_easy", "mt_bench", "humaneval"]
    assert result["skipped"]["arc_easy"] == (f"arc_easy: {missing}/arc/ARC-Easy/ARC-Easy-Test.jsonl does not exist "
                                             "(a --data-dir laid out like ../shared/datasets)")
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[-1] == str(out)
    assert [line.split()[:2] for line in lines[:-1]] == [["arc_easy", "skipped:"], ["mt_bench", "skipped:"],
                                                         ["humaneval", "skipped:"]]
    assert printed.err.splitlines() == [f"posttrain: nothing was measured (skipped: arc_easy, mt_bench, humaneval); "
                                        f"the reasons are printed above and recorded in {out}"]


def test_eval_progress_keeps_its_bracketed_label(datasets_dir, tmp_path, capsys):
    """Progress goes through rich: "[arc_easy]" must not be read as a markup tag and vanish."""
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "embedded", "--benchmarks", "arc_easy", "--data-dir", str(datasets_dir),
                 "--limit", "2", "--output", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("[arc_easy] ") for line in err)
    total = int(err[-1].split("/")[-1])
    assert err[-1] == f"[arc_easy] {total}/{total}"


def test_humaneval_pass_at_k_from_the_cli(datasets_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "embedded", "--benchmarks", "humaneval", "--data-dir", str(datasets_dir),
                 "--limit", "2", "--allow-code-execution", "--num-samples", "3", "--ks", "1,2",
                 "--max-new-tokens", "16", "--output", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    settings = result["settings"]["humaneval"]
    assert settings["num_samples"] == 3 and settings["ks"] == [1, 2] and settings["n_problems"] == 2
    assert settings["decoding"] == f"sampling temperature=0.2 top_p=0.95 seed={1234}"
    metrics = result["results"]["humaneval"]
    assert set(metrics) == {"pass@1", "pass@2"}
    # Each value recomputed from the per-sample records: the unbiased estimator per problem, a bounded mean over
    # the problems with its interval (Wilson on the mean, evaluate.stats).
    samples = [json.loads(line) for line in open(result["samples_path"])]
    assert len(samples) == 6 and {s["sample_index"] for s in samples} == {0, 1, 2}
    correct = {}
    for s in samples:
        correct[s["task_id"]] = correct.get(s["task_id"], 0) + int(s["passed"])
    for k in (1, 2):
        value, lo, hi = mean_interval([pass_at_k(3, c, k) for c in correct.values()], 0.0, 1.0)
        assert metrics[f"pass@{k}"] == {"value": value, "n": 2, "ci_low": lo, "ci_high": hi}
    printed = capsys.readouterr().out
    assert f"humaneval        pass@2                   {metrics['pass@2']['value']:.4f}  n=2" in printed


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "3", "--ks", "1,10"], "--ks 10 exceeds --num-samples 3: pass@10 needs at least 10 samples"),
    (["--ks", "2"], "--ks 2 exceeds --num-samples 1"),
    (["--num-samples", "4", "--ks", "1,x"], "--ks must be comma-separated integers such as 1,10; got 'x'"),
    (["--num-samples", "4", "--ks", "0"], "--ks 0: k must be at least 1"),
    (["--num-samples", "0"], "--num-samples must be at least 1, got 0"),
])
def test_pass_at_k_flags_are_checked_before_anything_runs(flags, message, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "embedded", "--benchmarks", "humaneval", "--allow-code-execution",
                 "--output", str(out), *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_pass_at_k_flags_need_humaneval(tmp_path, capsys):
    assert main(["eval", "--model", "embedded", "--benchmarks", "gsm8k", "--num-samples", "5",
                 "--output", str(tmp_path / "eval.json")]) == 2
    assert "--num-samples and --ks apply to humaneval" in capsys.readouterr().err
