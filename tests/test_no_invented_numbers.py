"""No simulated or invented number anywhere: every number a run reports traces back to its event log or to disk,
and no code in src/posttrain writes a numeric literal where a measured result belongs.

(a) A cheap demo run (2 GRPO steps, 16 held-out problems, int8 compression) and its report.json, checked against
    events.sqlite read with plain sqlite3 (the contract columns), the per-sample records and the files on disk:
    - every numeric leaf of report.json is a number some logged event carries (payload, time or seq), except the
      few the report derives, each of which is recomputed here from the log (DERIVED);
    - accuracy value / n / metric are the last eval.result.v1 of that model, and value = correct / n over the
      evaluator's per-sample records;
    - sizes_bytes are the bytes of the weight files (*.safetensors, *.bin, *.gguf: what posttrain calls a model's
      size; config and tokenizer files are not counted) under the checkpoint and the compressed artifact, found and
      summed here with os.walk;
    - each stage's wall_s is its stage.completed.v1 payload and agrees with the time between its stage.started.v1
      and stage.completed.v1 events; the run's wall_s is run.finished minus run.started;
    - report.json is exactly what the log rebuilds (build_report) and report.md is its rendering.
(b) A static scan of src/posttrain (see `invented_numbers`).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import sqlite3
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.report import build_report, render_markdown

SRC = Path(__file__).resolve().parents[1] / "src" / "posttrain"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


# -- (a) a real run's numbers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--quiet", "--train.steps", "2", "--evaluate.limit", "16", "--runs_dir", str(runs)])
    run_dir = Path(out.getvalue().strip().splitlines()[-1])  # the contract: the run directory is the last line
    report = json.loads((run_dir / "report.json").read_text())
    assert code == 0 and report["status"] == "succeeded", report.get("error")
    con = sqlite3.connect(run_dir / "events.sqlite")
    try:
        events = [{"seq": s, "type": t, "time": tm, "data": json.loads(d)}
                  for s, t, tm, d in con.execute("SELECT seq, type, time, data FROM events ORDER BY seq")]
    finally:
        con.close()
    return run_dir, report, events


def _numbers(value, path=()):
    """(path, number) for every int/float leaf (bools are not numbers here)."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, path + (i,))


def _one(events, type):
    found = [e for e in events if e["type"] == type]
    assert len(found) == 1, (type, len(found))
    return found[0]


def _derived(report, events):
    """The report's numbers that no event carries as such, each recomputed from the log."""
    started, finished = _one(events, "run.started.v1"), _one(events, "run.finished.v1")
    comp = report["compression"]
    return {("compression", "ratio"): comp["size_bytes"] / comp["base_size_bytes"],
            ("wall_s",): finished["time"] - started["time"]}


@pytest.mark.slow
def test_every_number_in_the_report_is_logged_or_derived_from_the_log(run):
    _, report, events = run
    logged = {e["seq"] for e in events} | {e["time"] for e in events}
    for e in events:
        logged.update(v for _, v in _numbers(e["data"]))
    derived = _derived(report, events)
    untraced = [(path, v) for path, v in _numbers(report) if v not in logged and path not in derived]
    assert untraced == []
    for path, expected in derived.items():
        value = report
        for key in path:
            value = value[key]
        assert value == pytest.approx(expected, rel=1e-12, abs=0), path
    assert report["started_at"] == _one(events, "run.started.v1")["time"]
    assert report["training"]["steps"] == sum(e["type"] == "train.metrics.v1" for e in events) == 2


@pytest.mark.slow
def test_accuracy_is_the_evaluators_and_matches_its_per_sample_records(run):
    _, report, events = run
    for model in ("base", "aligned", "compressed"):
        results = [e["data"] for e in events if e["type"] == "eval.result.v1" and e["data"]["model"] == model
                   and not e["data"].get("benchmark")]
        assert results, model
        last = results[-1]
        assert report["accuracy"][model] == {"value": last["value"], "n": last["n"], "metric": last["metric"],
                                             "answered": last["answered"]}
        samples = [json.loads(line) for line in Path(last["samples_path"]).read_text().splitlines()]
        assert len(samples) == last["n"] == 16
        assert last["value"] == pytest.approx(sum(bool(s["correct"]) for s in samples) / len(samples), abs=1e-12)
        assert last["answered"] == sum(s["extracted"] is not None for s in samples)


def _weight_dirs(root: Path) -> dict[Path, int]:
    """Directory -> bytes of its weight files, for every directory under `root` holding any (os.walk)."""
    sizes: dict[Path, int] = {}
    for dirpath, _, files in os.walk(root):
        weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES)]
        if weights:
            sizes[Path(dirpath)] = sum(os.path.getsize(os.path.join(dirpath, f)) for f in weights)
    return sizes


@pytest.mark.slow
def test_sizes_are_the_bytes_on_disk(run):
    run_dir, report, events = run
    (checkpoint, aligned), = _weight_dirs(run_dir / "checkpoints").items()
    (artifact, compressed), = _weight_dirs(run_dir / "artifacts").items()
    assert report["sizes_bytes"] == {"aligned": aligned, "compressed": compressed}
    assert 0 < compressed < aligned
    # ... and the log points at those directories.
    assert Path(_one(events, "train.checkpoint.v1")["data"]["path"]) == checkpoint
    assert Path(_one(events, "compress.result.v1")["data"]["path"]) == artifact


@pytest.mark.slow
def test_stage_wall_times_come_from_the_logged_stage_events(run):
    _, report, events = run
    started = {e["data"]["task_id"]: e for e in events if e["type"] == "stage.started.v1"}
    completed = [e for e in events if e["type"] == "stage.completed.v1"]
    assert [s["name"] for s in report["stages"]] == [e["data"]["stage"] for e in completed]
    for stage, done in zip(report["stages"], completed):
        assert stage == {"name": done["data"]["stage"], "status": done["data"]["status"],
                         "wall_s": done["data"]["wall_s"]}
        between = done["time"] - started[done["data"]["task_id"]]["time"]
        # The coordinator reads its (monotonic) clock a few statements before each of the two events is stamped
        # and rounds to 1 ms: the two agree to well under this bound, which only allows for thread switches.
        assert stage["wall_s"] == pytest.approx(between, abs=0.1), stage["name"]


@pytest.mark.slow
def test_the_report_is_what_the_log_rebuilds(run):
    run_dir, report, _ = run
    assert json.loads(json.dumps(build_report(run_dir))) == report
    assert (run_dir / "report.md").read_text() == render_markdown(report)


# -- (b) the code ------------------------------------------------------------------------------------------------

# Keys under which a measured result is stored: exact names, plus compound keys with one of WORDS as a part
# ("rewards/accuracies", "reward_std", "base_size_bytes", ...).
RESULT_KEYS = {"accuracy", "score", "value", "reward", "loss", "perplexity", "size_bytes", "kl", "margin",
               "wall_s", "tokens_per_s", "load_seconds", "top1_agreement", "exact_match"}
WORDS = {"accuracy", "accuracies", "score", "scores", "reward", "rewards", "loss", "losses", "perplexity", "kl",
         "margin", "margins", "agreement", "logps"}
METRIC_CALLS = {"add_metric", "setdefault"}  # name, value, ...: the value recorded under the name

# (file under src/posttrain, enclosing function, key) -> why a literal there is not a result.
ALLOWED = {
    ("evaluate/benchmarks/mt_bench.py", "_pairwise", "loss"):
        "'loss' is a game outcome (win / tie / loss): the tally starts at 0 and a lost game earns 0 credit",
}


def is_result_key(key: str | None) -> bool:
    if not key:
        return False
    key = key.lower()
    parts = set(key.replace("/", "_").replace("@", "_").replace(".", "_").split("_"))
    return key in RESULT_KEYS or key.endswith("size_bytes") or bool(parts & WORDS)


def _literal(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _key(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def invented_numbers(source: str) -> list[tuple[int, str, str, str]]:
    """(line, enclosing function, key, literal) for each int/float literal (a sign allowed, bools excluded) stored
    under a result key (`is_result_key`), in one of these forms:
    - a dict display entry:            {"accuracy": 0.5}
    - a subscript or attribute store:  metrics["loss"] = 0.0, result.score = 1
    - a keyword argument:              Metric(value=0.0), dict(reward=1.0), d.update(kl=0)
    - a class-level field default:     accuracy: float = 0.0   (dataclasses, pydantic models)
    - a metric-recording call:         out.add_metric("loss", 0.0, n), d.setdefault("reward", 0)
    Not checked: plain local variables (accumulators start at 0, `total = 0.0`, before measured values are added)
    and the arguments of pydantic's Field(...) (settings such as `min_top1_agreement` have a result word in their
    name but are read, not written). A bare class default of such a setting would be flagged: none exists today."""
    found: list[tuple[int, str, str, str]] = []

    def visit(node: ast.AST, func: str, in_class: bool) -> None:
        def flag(key, value):
            if is_result_key(key) and _literal(value):
                found.append((value.lineno, func, key, ast.unparse(value)))

        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                flag(_key(k), v)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Subscript):
                    flag(_key(target.slice), node.value)
                elif isinstance(target, ast.Attribute):
                    flag(target.attr, node.value)
        elif isinstance(node, ast.AnnAssign) and in_class and isinstance(node.target, ast.Name) and node.value:
            flag(node.target.id, node.value)
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                flag(kw.arg, kw.value)
            if isinstance(node.func, ast.Attribute) and node.func.attr in METRIC_CALLS and len(node.args) >= 2:
                flag(_key(node.args[0]), node.args[1])
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name, False)
            else:  # a class-level field is a statement directly in the class body
                visit(child, func, isinstance(node, ast.ClassDef))

    visit(ast.parse(source), "<module>", False)
    return found


def test_the_scan_flags_each_form_and_spares_accumulators_and_settings():
    bad = '''
class Result:
    accuracy: float = 0.0
def f(out, d, metrics, result, Metric):
    d = {"loss": 0.0, "n": 3, "rewards/accuracies": -1}
    metrics["perplexity"] = 12.5
    result.score = 1
    Metric(value=0.5)
    d.update(kl=0)
    out.add_metric("reward", 0.0, 4)
    d.setdefault("base_size_bytes", 1000)
'''
    assert [(line, key, lit) for line, _, key, lit in invented_numbers(bad)] == [
        (3, "accuracy", "0.0"), (5, "loss", "0.0"), (5, "rewards/accuracies", "-1"), (6, "perplexity", "12.5"),
        (7, "score", "1"), (8, "value", "0.5"), (9, "kl", "0"), (10, "reward", "0.0"), (11, "base_size_bytes", "1000")]
    good = '''
class Settings:
    beta: float = 0.1
    min_top1_agreement: float | None = Field(None, ge=0)
def g(xs, out, n):
    loss = total = 0.0
    for x in xs:
        loss += x
    out.add_metric("loss", loss, n)
    return {"loss": loss / n, "n": n, "reload_ok": True, "steps": 2}
'''
    assert invented_numbers(good) == []


def test_no_numeric_literal_is_stored_as_a_result_in_src():
    findings, allowed_seen = [], set()
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for line, func, key, literal in invented_numbers(path.read_text()):
            if (rel, func, key) in ALLOWED:
                allowed_seen.add((rel, func, key))
            else:
                findings.append(f"src/posttrain/{rel}:{line} in {func}(): {key!r} = {literal}")
    assert findings == [], "numbers written where a measured result belongs:\n" + "\n".join(findings)
    assert allowed_seen == set(ALLOWED), "stale ALLOWED entries: " + repr(set(ALLOWED) - allowed_seen)
