"""End to end, for real: the agent pipeline on the embedded default and on real files from ../shared/datasets.

Every number asserted here was measured by the run itself; the tests check it against the run's own per-sample
records and event log, so nothing in the report can be invented without a test failing.
"""

import json
import sqlite3
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.evaluate.stats import paired_sign_test

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr().out.strip().splitlines()
    run_dir = Path(out[-1])
    assert run_dir.is_dir() and (run_dir / "events.sqlite").exists(), out[-5:]
    return code, run_dir, json.loads((run_dir / "report.json").read_text())


def _events(run_dir):
    con = sqlite3.connect(run_dir / "events.sqlite")
    rows = con.execute("SELECT seq, id, type, source, target, correlation_id, causation_id, data FROM events "
                       "ORDER BY seq").fetchall()
    return [dict(seq=r[0], id=r[1], type=r[2], source=r[3], target=r[4], correlation_id=r[5], causation_id=r[6],
                 data=json.loads(r[7])) for r in rows]


def _check_log_contract(run_dir, expected_stages):
    events = _events(run_dir)
    assert [e["data"]["stage"] for e in events if e["type"] == "stage.started.v1"] == expected_stages
    for a in (e for e in events if e["type"] == "task.assigned.v1"):
        closing = [e for e in events if e["type"] in ("task.completed.v1", "task.failed.v1")
                   and e["correlation_id"] == a["correlation_id"] and e["causation_id"] == a["id"]]
        assert len(closing) == 1, a["data"]["stage"]
    assert sum(e["type"] == "run.finished.v1" for e in events) == 1
    return events


def test_demo_grpo_improves_the_embedded_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, run_dir, report = _run_cli(["demo", "--quiet"], capsys)
    assert code == 0 and report["status"] == "succeeded" and report["method"] == "grpo"
    assert "GRPO" in report["rationale"]
    acc = report["accuracy"]
    assert acc["base"]["n"] == acc["aligned"]["n"] == acc["compressed"]["n"] > 0
    assert all(0 <= acc[m]["answered"] <= acc[m]["n"] for m in acc)
    assert 0 < report["sizes_bytes"]["compressed"] < report["sizes_bytes"]["aligned"]
    events = _check_log_contract(run_dir, ["data", "select", "evaluate_base", "train", "compress", "evaluate"])
    evals = {e["data"]["model"]: e["data"] for e in events if e["type"] == "eval.result.v1"}
    correct = {}
    for name, r in evals.items():
        samples = [json.loads(l) for l in open(r["samples_path"])]
        assert len(samples) == r["n"] == acc[name]["n"]
        correct[name] = [bool(s["correct"]) for s in samples]
        assert sum(correct[name]) / r["n"] == pytest.approx(acc[name]["value"])
        assert sum(s["extracted"] is not None for s in samples) == acc[name]["answered"]
    # GRPO's gain on the fixed seed is beyond the noise: at least 5 points on the same 200 problems, and the exact
    # paired test on the problems whose outcome changed rejects "no change" at p < 0.001.
    gained, lost, p = paired_sign_test(correct["base"], correct["aligned"])
    assert acc["aligned"]["value"] - acc["base"]["value"] >= 0.05 and p < 0.001, (acc, gained, lost, p)
    assert [e for e in events if e["type"] == "train.metrics.v1"]
    assert not any("no reward signal" in n["text"] for n in report["notes"])
    ckpt = run_dir / "checkpoints" / "grpo" / "final"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(ckpt)
    assert AutoTokenizer.from_pretrained(ckpt).chat_template
    assert (run_dir / "report.md").read_text().count("grpo") >= 1
    assert main(["show", str(run_dir)]) == 0
    assert "run.finished.v1" in capsys.readouterr().out


@pytest.mark.parametrize("config,method,metric", [("dpo_ultrafeedback.yaml", "dpo", "pairwise_accuracy"),
                                                   ("grpo_gsm8k.yaml", "grpo", "exact_match")])
def test_real_data_end_to_end(config, method, metric, datasets_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, run_dir, report = _run_cli(["run", str(REPO / "configs" / "examples" / config), "--quiet",
                                      "--runs_dir", str(tmp_path / "runs"), "--compress.enabled", "false"], capsys)
    assert code == 0 and report["status"] == "succeeded", report.get("error")
    assert report["method"] == method
    for name in ("base", "aligned"):
        assert report["accuracy"][name]["metric"] == metric and report["accuracy"][name]["n"] == 32
    assert report["accuracy"]["compressed"] is None
    _check_log_contract(run_dir, ["data", "select", "evaluate_base", "train", "evaluate"])
    if config == "dpo_ultrafeedback.yaml":  # what the config's comment says the run drops, in the report a person reads
        assert report["data"]["profile"]["dropped"] == {"empty_response": 2, "identical_pair": 4}
        assert ("- dropped while preparing: 6 of 1000 rows read (empty_response: 2, identical_pair: 4)"
                in (run_dir / "report.md").read_text().splitlines())
    if method == "grpo":  # the embedded model solves none of these GSM8K problems: the run says it learned nothing
        rewards = [e["data"]["metrics"]["reward"] for e in _events(run_dir) if e["type"] == "train.metrics.v1"]
        assert rewards and set(rewards) == {0.0}
        assert any(n["level"] == "warning" and "no reward signal in any of its" in n["text"] for n in report["notes"])
        assert "no reward signal" in (run_dir / "report.md").read_text()
    assert sorted(p.name for p in run_dir.glob("events.sqlite*")) == ["events.sqlite"]  # no -wal / -shm left


@pytest.mark.parametrize("line,field", [('{"prompt": "hi", "chosen": "a"}', "rejected"),
                                        ('{"prompt": "hi", "chosen": "a", "rejected": ""}', "rejected"),
                                        ('{"prompt": "hi", "chosen": "a", "rejected": "b"', None)])
def test_bad_data_fails_cleanly_naming_file_row_and_field(line, field, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pairs.jsonl"
    good = '{"prompt": "Say hi", "chosen": "hi", "rejected": "bye"}'
    data.write_text("\n".join([good, good.replace("hi", "yo"), line]) + "\n")
    code, run_dir, report = _run_cli(["run", str(REPO / "configs" / "examples" / "dpo_ultrafeedback.yaml"), "--quiet",
                                      "--data", str(data), "--data_options.drop_empty", "false"], capsys)
    assert code == 1 and report["status"] == "failed"
    err = report["error"]
    assert err["agent"] == "data" and "pairs.jsonl" in err["reason"] and "row 3" in err["reason"]
    if field:
        assert f"'{field}'" in err["reason"]
    assert all(v is None for v in report["accuracy"].values())
    assert not any((run_dir / "checkpoints").iterdir())
    assert report["method"] is None


@pytest.mark.parametrize("method", ["sft", "dpo", "ipo", "simpo", "orpo", "kto", "rm"])
def test_each_offline_method_runs_through_the_agents_on_the_embedded_task(method, tmp_path, capsys):
    code, run_dir, report = _run_cli(["demo", "--quiet", "--method", method, "--train.steps", "3",
                                      "--runs_dir", str(tmp_path), "--evaluate.limit", "24",
                                      "--compress.enabled", "false"], capsys)
    assert code == 0 and report["status"] == "succeeded", report.get("error")
    assert report["method"] == method and "explicitly" in report["rationale"]
    assert report["accuracy"]["aligned"]["n"] == 24
    if method == "rm":  # scored on held-out pairs by reward; the base has no reward head, so nothing is claimed
        assert report["accuracy"]["aligned"]["metric"] == "reward_accuracy" and report["accuracy"]["base"] is None
    events = _check_log_contract(run_dir, ["data", "select", "evaluate_base", "train", "evaluate"])
    steps = [e["data"]["step"] for e in events if e["type"] == "train.metrics.v1"]
    assert steps == [1, 2, 3]


def test_benchmarks_in_the_pipeline_and_a_gate_that_fails_with_the_numbers(datasets_dir, tmp_path, capsys):
    args = ["demo", "--quiet", "--train.steps", "2", "--runs_dir", str(tmp_path), "--evaluate.limit", "16",
            "--evaluate.benchmarks", "[arc_easy]", "--evaluate.data_dir", str(datasets_dir),
            "--evaluate.benchmark_limit", "8"]
    code, run_dir, report = _run_cli(args, capsys)
    assert code == 0, report.get("error")
    for model in ("base", "aligned", "compressed"):
        entry = report["benchmarks"]["arc_easy/acc"][model]
        assert entry["n"] == 8 and entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    # A gate no change can pass (a negative allowance): the run fails, naming the metric and both values.
    code, run_dir, report = _run_cli(args + ["--evaluate.gate", "{task: -1.0}"], capsys)
    assert code == 1 and report["status"] == "failed"
    err = report["error"]
    assert err["agent"] == "evaluator" and "gate failed: task dropped from" in err["reason"]
    assert "(base, n=16)" in err["reason"] and "(aligned, n=16)" in err["reason"]
