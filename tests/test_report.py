"""report.json / report.md built from the event log alone."""

import importlib.util
import json
from pathlib import Path

import pytest

from posttrain.report import build_report, write_report

# The shared log builders live in tests/live; load them by path so this works whatever the import mode.
_spec = importlib.util.spec_from_file_location("_runlogs", Path(__file__).parent / "live" / "runlogs.py")
runlogs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runlogs)


def test_report_of_a_successful_run(tmp_path):
    run = runlogs.successful_run(tmp_path / "r")
    md_path, json_path = write_report(run)
    assert (md_path, json_path) == (run / "report.md", run / "report.json")
    r = json.loads(json_path.read_text())
    assert r["run_id"] == runlogs.RUN_ID and r["status"] == "succeeded" and r["error"] is None
    assert r["method"] == "grpo" and r["rationale"] == "verifiable answers" and r["runner_up"] == "sft"
    assert r["accuracy"] == {"base": {"value": 0.3, "n": 50, "metric": "exact_match", "answered": 40},
                             "aligned": {"value": 0.5, "n": 50, "metric": "exact_match", "answered": 50},
                             "compressed": {"value": 0.48, "n": 50, "metric": "exact_match", "answered": 49}}
    assert r["sizes_bytes"] == {"aligned": 4000, "compressed": 1000}
    assert r["stages"] == [{"name": "data", "status": "succeeded", "wall_s": 1.5},
                           {"name": "select", "status": "succeeded", "wall_s": 0.5},
                           {"name": "train", "status": "succeeded", "wall_s": 5.0},
                           {"name": "compress", "status": "succeeded", "wall_s": 2.0},
                           {"name": "evaluate", "status": "succeeded", "wall_s": 6.0}]
    assert r["data"] == {"source": "embedded", "kind": "verifiable", "rows": 100, "profile": {"duplicates": 0}}
    t = r["training"]
    assert (t["method"], t["steps"], t["total_steps"], t["last_step"]) == ("grpo", 4, 4, 4)
    assert t["metrics"]["loss"] == {"first": 2.0, "final": 1.0, "min": 1.0, "max": 2.0, "nonfinite": 0}
    assert t["metrics"]["reward"]["first"] == 0.1 and t["metrics"]["reward"]["final"] == 0.5
    assert t["metrics"]["kl"]["final"] == 0.03
    # The log measured no quality for this artifact, so those keys are null (never a number), and nothing was rejected.
    assert r["compression"] == {"method": "int8", "path": "artifacts/int8", "reload_ok": True, "size_bytes": 1000,
                                "base_size_bytes": 4000, "ratio": 0.25, "perplexity": None,
                                "base_perplexity": None, "top1_agreement": None, "tokens_per_s": None,
                                "tokens_per_s_repeats": None, "load_seconds": None, "runtime": None, "positions": None, "scored_on": None,
                                "scored_rows": None, "max_new_tokens": None, "details": None, "reward": None,
                                "rejected": []}
    assert r["wall_s"] == 20.0 and r["started_at"] == runlogs.T0
    assert len(r["evals"]) == 3

    md = md_path.read_text()
    assert "# Run `run-test`: succeeded" in md
    assert "**grpo** (runner-up: sft)" in md and "Why: verifiable answers" in md
    assert "| base | 0.300 | 50 | exact_match | 40 |" in md and "| compressed | 0.480 | 50 | exact_match | 49 |" in md
    assert "answered: outputs whose final answer the verifier could read" in md
    assert "base → aligned → compressed: 0.300 → 0.500 → 0.480" in md
    assert "| train | succeeded | 5.0 s |" in md
    assert "| compressed | 1000B (1000 bytes) |" in md
    assert "| loss | 2 | 1 | 1 | 2 |" in md
    assert md.index("| loss |") < md.index("| reward |") < md.index("| kl |") < md.index("| grad_norm |")
    assert "not measured" not in md and "## Error" not in md


def test_report_of_a_failed_run(tmp_path):
    run = runlogs.failed_run(tmp_path / "f")
    md_path, json_path = write_report(run)
    r = json.loads(json_path.read_text())
    assert r["run_id"] == "run-failed" and r["status"] == "failed"
    assert r["error"] == {"agent": "trainer", "task": "t-train", "reason": "out of memory after 3 attempts"}
    assert r["method"] is None and r["rationale"] is None
    # This log's eval result has no "answered" (as in logs written before the field existed): null, not a guess.
    assert r["accuracy"] == {"base": {"value": 0.25, "n": 40, "metric": "exact_match", "answered": None},
                             "aligned": None, "compressed": None}
    assert r["sizes_bytes"] == {"aligned": None, "compressed": None}
    assert r["stages"] == [{"name": "data", "status": "succeeded", "wall_s": 1.0},
                           {"name": "train", "status": "failed", "wall_s": 3.5}]
    assert r["training"] is None and r["compression"] is None and r["data"] is None
    assert r["wall_s"] == 7.0

    md = md_path.read_text()
    assert "# Run `run-failed`: failed" in md
    assert "## Error" in md and "- agent: `trainer`" in md and "out of memory after 3 attempts" in md
    assert "| aligned | not measured | - | - |" in md and "| compressed | not measured | - | - |" in md
    assert "base → aligned → compressed: 0.250 → not measured → not measured" in md
    assert "| aligned | not measured |" in md  # size
    assert "No training metrics were recorded." in md and "No method was selected." in md


def test_a_run_without_run_finished_is_failed_and_says_why(tmp_path):
    w = runlogs.Writer(tmp_path / "crashed", run_id="run-crashed")
    runlogs.start(w)
    w.emit(2.0, "stage.started.v1", "coordinator", {"stage": "train", "task_id": "t-train", "agent": "trainer"})
    w.emit(3.0, "train.metrics.v1", "trainer", {"method": "sft", "step": 1, "total_steps": 10,
                                                "metrics": {"loss": float("nan")}})
    w.close()
    md_path, json_path = write_report(tmp_path / "crashed")
    r = json.loads(json_path.read_text())  # strict JSON: NaN was written as null
    assert r["status"] == "failed" and "did not finish" in r["error"]["reason"]
    assert r["stages"] == [{"name": "train", "status": "running", "wall_s": None}]
    assert r["training"]["metrics"]["loss"] == {"first": None, "final": None, "min": None, "max": None,
                                                "nonfinite": 1}
    md = md_path.read_text()
    assert "| train | running | not measured |" in md and "| loss | non-finite |" in md


@pytest.mark.parametrize("profile, expected", [
    # Regression: the rows preparation dropped were in report.json only, not in report.md nor the run's summary.
    ({"rows": 994, "dropped": {"empty_response": 2, "identical_pair": 4}},
     ["- dropped while preparing: 6 of 1000 rows read (empty_response: 2, identical_pair: 4)"]),
    ({"rows": 40, "dropped": {}, "eval_rows": 7, "eval_dropped": {"empty_response": 1}},
     ["- evaluation rows: 7", "- dropped while preparing: none",
      "- dropped from the evaluation data: 1 of 8 rows read (empty_response: 1)"]),
    # 1 dropped, 19 held out for evaluation: without the hold-out line the training rows and "1 of 40" do not add up.
    ({"rows": 39, "eval_rows": 19, "eval_source": "pairs.jsonl (held out: 19 rows, seed 0)",
      "dropped": {"empty_response": 1}},
     ["- evaluation rows: 19 from `pairs.jsonl (held out: 19 rows, seed 0)`",
      "- dropped while preparing: 1 of 40 rows read (empty_response: 1)"]),
    ({"duplicates": 0}, []),  # nothing recorded (an older log): nothing said
])
def test_report_md_lists_the_rows_data_preparation_dropped(tmp_path, profile, expected):
    w = runlogs.Writer(tmp_path / "d", run_id="run-data")
    runlogs.start(w)
    w.emit(1.0, "data.profiled.v1", "data", {"source": "pairs.jsonl", "kind": "preference", "rows": 25,
                                             "profile": profile})
    w.emit(2.0, "run.finished.v1", "coordinator", {"status": "succeeded"})
    w.close()
    md_path, json_path = write_report(tmp_path / "d")
    assert json.loads(json_path.read_text())["data"]["profile"] == profile
    lines = md_path.read_text().splitlines()
    section = lines[lines.index("## Data"):lines.index("## Accuracy")]
    rows = "- rows: 25 for training" if "eval_rows" in profile else "- rows: 25"
    assert section == ["## Data", "", "- source: `pairs.jsonl`", "- kind: preference", rows, *expected, ""]


@pytest.mark.parametrize("repeats, said", [
    ([505.94, 531.9, 578.61], "531.9 tokens/s (median of 3 timed runs: 505.9, 531.9, 578.6) with transformers"),
    (None, "531.9 tokens/s with transformers"),  # a log from before the repeats were kept
])
def test_report_md_gives_tokens_per_s_with_its_timed_runs(tmp_path, repeats, said):
    w = runlogs.Writer(tmp_path / "c", run_id="run-speed")
    runlogs.start(w)
    w.emit(1.0, "compress.result.v1", "compressor", {
        "method": "int8_rtn", "path": "artifacts/int8", "size_bytes": 1000, "base_size_bytes": 4000, "reload_ok": True,
        "perplexity": 2.5, "base_perplexity": 2.25, "top1_agreement": 0.75, "tokens_per_s": 531.9,
        "tokens_per_s_repeats": repeats, "load_seconds": 0.5, "runtime": "transformers", "positions": 12})
    w.emit(2.0, "run.finished.v1", "coordinator", {"status": "succeeded"})
    w.close()
    md_path, json_path = write_report(tmp_path / "c")
    assert json.loads(json_path.read_text())["compression"]["tokens_per_s_repeats"] == repeats
    assert (f"Against the aligned model on held-out rows: top-1 agreement 0.7500, perplexity 2.5 vs 2.25; {said}, "
            "loaded in 0.50 s") in md_path.read_text().splitlines()


def test_missing_log_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="events.sqlite"):
        build_report(tmp_path / "nope")


def test_benchmark_table_shows_each_value_with_its_interval(tmp_path):
    """Each cell carries its 95% interval; a logged result without one says so; differing n are listed per model."""
    from posttrain.evaluate.benchmarks.base import Metric

    w = runlogs.Writer(tmp_path / "b", run_id="run-bench")
    runlogs.start(w)
    # The intervals are the harness's own for these counts and ratings (Wilson; for 1-10 ratings Wilson on the
    # rescaled mean); a mean with no known range over one item has no interval.
    logged = [("arc_easy", "acc", "base", Metric.proportion(2, 8)),
              ("arc_easy", "acc", "aligned", Metric.proportion(3, 8)),
              ("mt_bench", "score", "base", Metric.mean([1, 2, 3, 4, 5], 1.0, 10.0)),
              ("mt_bench", "score", "aligned", Metric.mean([2, 4], 1.0, 10.0)),
              ("mt_bench", "score", "compressed", Metric.mean([7.0]))]
    for i, (bench, metric, model, m) in enumerate(logged):
        w.emit(1.0 + i, "eval.result.v1", "evaluator", {"model": model, "metric": metric, "benchmark": bench,
                                                        "path": f"artifacts/{model}", **m.as_dict()})
    w.emit(9.0, "run.finished.v1", "coordinator", {"status": "succeeded"})
    w.close()
    md_path, json_path = write_report(tmp_path / "b")
    r = json.loads(json_path.read_text())
    assert r["benchmarks"]["mt_bench/score"]["compressed"] == {"value": 7.0, "n": 1, "ci_low": None, "ci_high": None}
    lines = md_path.read_text().splitlines()
    table = lines[lines.index("## Benchmarks") + 2:lines.index("## Benchmarks") + 6]
    assert table == [
        "| benchmark / metric | base [95% CI] | aligned [95% CI] | compressed [95% CI] | n |",
        "|---|---|---|---|---|",
        "| arc_easy/acc | 0.250 [0.071, 0.591] | 0.375 [0.137, 0.694] | not measured | 8 |",
        "| mt_bench/score | 3.000 [1.391, 6.781] | 3.000 [1.193, 8.095] | 7.000 (no interval) | 5 / 2 / 1 |",
    ]


def test_an_interrupted_run_reports_the_stage_it_stopped_and_says_it_was_interrupted(tmp_path):
    md_path, json_path = write_report(runlogs.interrupted_run(tmp_path / "i"))
    r = json.loads(json_path.read_text())
    assert r["status"] == "failed" and r["interrupted"] is True
    assert r["error"] == {"agent": "runner", "task": None,
                          "reason": "interrupted by the user (Ctrl-C) while trainer (t-train) was busy"}
    assert r["stages"] == [{"name": "data", "status": "succeeded", "wall_s": 1.0},
                           {"name": "train", "status": "interrupted", "wall_s": 3.0}]
    assert "| train | interrupted | 3.0 s |" in md_path.read_text().splitlines()
    assert json.loads(write_report(runlogs.failed_run(tmp_path / "f"))[1].read_text())["interrupted"] is False


def test_report_md_says_token_accuracy_counts_tokens(tmp_path):
    w = runlogs.Writer(tmp_path / "s", run_id="run-sft")
    runlogs.start(w)
    w.emit(1.0, "eval.result.v1", "evaluator", {"model": "base", "metric": "token_accuracy", "value": 0.5, "n": 102,
                                                "path": "artifacts/base"})
    w.emit(2.0, "run.finished.v1", "coordinator", {"status": "succeeded"})
    w.close()
    md = write_report(tmp_path / "s")[0].read_text()
    assert "| base | 0.500 | 102 | token_accuracy | - |" in md
    assert "its n counts tokens, not rows" in md and "answered:" not in md
