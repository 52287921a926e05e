"""The evaluator agent's MT-Bench before/after comparison, in a real pipeline run on the embedded model with the
model as its own judge: the aligned model's answers judged against the base model's, positions swapped, with the
win/tie/loss counts and n in the log and the report. Every number is checked against the run's own records."""

import json
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.evaluate.benchmarks.mt_bench import answers_from_samples
from posttrain.evaluate.judge_parsing import parse_verdict, resolve_swap
from posttrain.evaluate.judges import LOCAL_JUDGE_CAVEAT
from posttrain.evaluate.stats import wilson_interval

pytestmark = pytest.mark.slow


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_aligned_vs_base_pairwise_in_the_pipeline(datasets_dir, tmp_path, capsys):
    code = main(["demo", "--quiet", "--train.steps", "2", "--runs_dir", str(tmp_path), "--compress.enabled", "false",
                 "--evaluate.limit", "8", "--evaluate.benchmarks", "[mt_bench]", "--evaluate.data_dir",
                 str(datasets_dir), "--evaluate.benchmark_limit", "2", "--evaluate.judge", "self",
                 "--evaluate.benchmark_max_new_tokens", "8", "--evaluate.mt_bench_pairwise", "true"])
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert code == 0, report.get("error")
    evals = run_dir / "artifacts" / "eval"

    # The pairs are exactly the answers each model's single-mode run scored: nothing was generated again.
    base = answers_from_samples(_jsonl(evals / "base.benchmarks.jsonl"))
    aligned = answers_from_samples(_jsonl(evals / "aligned.benchmarks.jsonl"))
    pairs = _jsonl(evals / "aligned.mt_bench_vs_base.jsonl")
    assert len(base) == len(aligned) == 2 and len(pairs) == 4
    counts = {"win": 0, "tie": 0, "loss": 0, "error": 0}
    for p in pairs:
        assert p["benchmark"] == "mt_bench" and len(p["judge_output"]) == 2
        assert p["answer"] == aligned[p["question_id"]][p["turn"] - 1]
        assert p["baseline_answer"] == base[p["question_id"]][p["turn"] - 1]
        verdicts = [parse_verdict(g) for g in p["judge_output"]]
        assert p["verdicts"] == verdicts and p["outcome"] == resolve_swap(*verdicts)
        counts[p["outcome"]] += 1
    n = counts["win"] + counts["tie"] + counts["loss"]

    notes = [x["text"] for x in report["notes"]]
    assert (f"aligned: mt_bench_vs_base: pairwise vs base: {counts['win']} wins, {counts['tie']} ties, "
            f"{counts['loss']} losses, n={n} pairs with both verdicts, {counts['error']} excluded (each pair judged "
            "twice, positions swapped; inconsistent verdicts count as ties)") in notes
    assert "aligned: mt_bench_vs_base: judge: local self (the evaluated model)" in notes
    assert any(t.startswith("aligned: mt_bench_vs_base: local judge with ") and t.endswith(LOCAL_JUDGE_CAVEAT)
               for t in notes)
    md = (run_dir / "report.md").read_text()
    assert f"{counts['win']} wins, {counts['tie']} ties, {counts['loss']} losses, n={n} pairs" in md
    if n:  # a 0.6M-parameter judge rarely writes a verdict; whatever it wrote is counted, nothing is invented
        lo, hi = wilson_interval(counts["win"], n)
        entry = report["benchmarks"]["mt_bench_vs_base/win_rate"]
        assert entry == {"aligned": {"value": counts["win"] / n, "n": n, "ci_low": lo, "ci_high": hi}}
    else:
        assert not any(k.startswith("mt_bench_vs_base/") for k in report["benchmarks"])
        assert ("aligned: mt_bench_vs_base: not measured (no pair with verdicts in both games): win_rate, "
                "win_rate_adjusted") in notes


class _Ctx:
    """Stands in for the agent runtime: records what the evaluator publishes."""

    def __init__(self):
        self.published = []

    def publish(self, type, data, **kw):
        self.published.append((type, data))

    def progress(self, *args, **kw):
        pass


class ScriptedJudge:
    """Always rates 6 and prefers assistant A: swapped games then disagree, so every pair is a tie."""

    def __init__(self):
        self.calls = 0

    def complete(self, system, user):
        self.calls += 1
        return "Rating: [[6]]. Verdict: [[A]]"

    def describe(self):
        return {"kind": "scripted", "model": "scripted", "gpt4_judged": False, "notes": ["judge: scripted"]}


@pytest.fixture(scope="module")
def embedded():
    from posttrain.models.loading import load_model, load_tokenizer

    return load_model("embedded"), load_tokenizer("embedded")


def _agent(datasets_dir, run_dir):
    from posttrain.agents.evaluator import EvaluatorAgent
    from posttrain.config import RunConfig

    return EvaluatorAgent(RunConfig(evaluate={
        "benchmarks": ["mt_bench"], "judge": "self", "mt_bench_pairwise": True, "benchmark_limit": 2,
        "benchmark_max_new_tokens": 4, "data_dir": str(datasets_dir)}), run_dir)


def test_pairwise_results_are_published_under_mt_bench_vs_base(datasets_dir, embedded, tmp_path, monkeypatch):
    from posttrain.evaluate.benchmarks import mt_bench

    judge, generated = ScriptedJudge(), []
    real_generate = mt_bench.generate_answers
    monkeypatch.setattr(mt_bench, "judge_from_options", lambda *a, **kw: judge)
    monkeypatch.setattr(mt_bench, "generate_answers", lambda *a, **kw: generated.append(1) or real_generate(*a, **kw))
    agent, ctx = _agent(datasets_dir, tmp_path), _Ctx()
    agent._benchmarks(ctx, "evaluate_base", "base", "embedded", *embedded)
    measured = agent._benchmarks(ctx, "evaluate", "aligned", "embedded", *embedded)
    # One answer generation per model; the comparison only judges: 2 questions x 2 turns x 2 games.
    assert len(generated) == 2 and judge.calls == 4 + 4 + 8
    lo, hi = wilson_interval(0, 4)

    def rating(n):  # every rating 6 of 1-10: Wilson on the mean rescaled to [0, 1] (5/9 of n), mapped back
        r_lo, r_hi = wilson_interval(n * 5 / 9, n)
        return (6.0, n, pytest.approx(1 + 9 * r_lo), pytest.approx(1 + 9 * r_hi))

    assert {k: (v["value"], v["n"], v["ci_low"], v["ci_high"]) for k, v in measured.items()} == {
        "mt_bench/score": rating(4), "mt_bench/score_turn1": rating(2), "mt_bench/score_turn2": rating(2),
        "mt_bench_vs_base/win_rate": (0.0, 4, lo, hi),
        "mt_bench_vs_base/win_rate_adjusted": (0.5, 4, *wilson_interval(2, 4))}  # four ties: 0.5 each
    results = [d for t, d in ctx.published if t == "eval.result.v1" and d["benchmark"] == "mt_bench_vs_base"]
    assert [(d["model"], d["metric"]) for d in results] == [("aligned", "win_rate"), ("aligned", "win_rate_adjusted")]
    assert results[0]["samples_path"] == str(tmp_path / "artifacts" / "eval" / "aligned.mt_bench_vs_base.jsonl")
    notes = [d["text"] for t, d in ctx.published if t == "run.note.v1"]
    assert ("aligned: mt_bench_vs_base: pairwise vs base: 0 wins, 4 ties, 0 losses, n=4 pairs with both verdicts, "
            "0 excluded (each pair judged twice, positions swapped; inconsistent verdicts count as ties)") in notes


def test_without_base_answers_the_comparison_says_why(datasets_dir, embedded, tmp_path):
    # No evaluate_base stage ran mt_bench here: the base answers are missing, so no comparison and a clear note.
    agent, ctx = _agent(datasets_dir, tmp_path), _Ctx()
    measured = agent._benchmarks(ctx, "evaluate", "aligned", "embedded", *embedded)
    assert not any(k.startswith("mt_bench_vs_base/") for k in measured)
    warnings = [d["text"] for t, d in ctx.published if t == "run.note.v1" and d["level"] == "warning"]
    assert warnings == [f"aligned vs base: mt_bench_vs_base not measured: the base model's MT-Bench answers are not "
                        f"in {tmp_path / 'artifacts' / 'eval' / 'base.benchmarks.jsonl'} (the evaluate_base stage "
                        "must run mt_bench)"]
