"""`posttrain runs` and `posttrain show` as commands: their exit status and every line they print, for logs whose
contents are fully known (the live-view log builders) and for a real run that failed on bad data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli import main

sys.path.insert(0, str(Path(__file__).parent / "live"))  # the log builders shared with the live-view tests
from runlogs import RUN_ID, Writer, failed_run, start, successful_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs(tmp_path):
    """A succeeded run, a failed one, one still running, a directory without a log and a corrupt log."""
    runs = tmp_path / "runs"
    successful_run(runs / "a-ok")
    failed_run(runs / "b-failed")
    live = Writer(runs / "c-live", run_id="run-live")
    start(live)
    live.close()
    (runs / "empty-dir").mkdir()
    (runs / "d-broken").mkdir()
    (runs / "d-broken" / "events.sqlite").write_text("not a database")
    return runs


def _cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out.rstrip("\n").splitlines(), captured.err


def test_runs_prints_one_aligned_line_per_run_oldest_first(runs, capsys):
    code, lines, err = _cli(["runs", "--runs-dir", str(runs)], capsys)
    assert code == 0 and err == ""
    # A header row names the columns (regression: there was none), each over its column.
    header, lines = lines[0], lines[1:]
    assert header.split() == ["run", "status", "method", "wall", "directory"]
    assert [header.index(name) for name in ("status", "method", "directory")] == [
        lines[0].index(" failed") + 1, lines[0].index(" - ") + 1, lines[0].index(str(runs))]
    assert header.index("wall") + len("wall") == lines[0].index("7.0s") + len("7.0s")  # right-aligned, as the times
    # The three built runs start at the same instant (ties go by run id); a log that cannot be read comes last.
    assert [line.split() for line in lines] == [
        ["run-failed", "failed", "-", "7.0s", str(runs / "b-failed")],
        ["run-live", "running", "-", "-", str(runs / "c-live")],
        [RUN_ID, "succeeded", "grpo", "20.0s", str(runs / "a-ok")],
        ["d-broken", "unreadable", "-", "-", str(runs / "d-broken")],
    ]
    # Columns line up: every status starts at the same offset, every directory after two spaces.
    assert len({line.index(line.split()[1], len(line.split()[0])) for line in lines}) == 1
    assert all(line.endswith(f"  {line.split()[-1]}") for line in lines)


def test_runs_without_runs_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        assert _cli(["runs", "--runs-dir", str(where)], capsys) == (0, [f"no runs under {where}"], "")


def test_the_installed_command_prints_what_main_prints(runs, capsys):
    script = Path(sys.executable).parent / "posttrain"
    if not script.is_file():
        pytest.skip(f"the posttrain console script is not installed next to {sys.executable}")
    _, lines, _ = _cli(["runs", "--runs-dir", str(runs)], capsys)
    done = subprocess.run([str(script), "runs", "--runs-dir", str(runs)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == lines


def test_show_a_failed_run_by_id_under_runs_dir(runs, capsys):
    code, lines, err = _cli(["show", "b-failed", "--runs-dir", str(runs)], capsys)
    assert code == 0 and err == ""
    assert "heartbeat" not in "\n".join(lines)
    # Long values are shortened from the left, keeping the end that tells runs apart.
    assert lines[0].startswith("[  0.0s] run.started.v1  coordinator -> *  run_dir=")
    assert lines[0].endswith("/runs/b-failed")
    assert "[  6.0s] task.failed.v1  trainer -> coordinator  stage=train  reason=out of memory  attempts=3" in lines
    assert lines[-6:] == [
        "[  7.0s] run.finished.v1  coordinator -> *  status=failed  error=trainer: out of memory after 3 attempts",
        "",
        "run run-failed: failed in 7.0s",
        "stages: data=succeeded 1.0s  train=failed 3.5s",
        "accuracy: base 0.250 (n=40) -> aligned not measured -> compressed not measured",
        "error: trainer (task t-train): out of memory after 3 attempts",
    ]
    # The directory, or its events.sqlite, names the same run.
    assert _cli(["show", str(runs / "b-failed" / "events.sqlite")], capsys)[1] == lines
    main(["show", "b-failed", "--runs-dir", str(runs)])
    assert capsys.readouterr().out.endswith("after 3 attempts\n")  # one final newline, no blank line after it


def test_show_of_a_missing_run_exits_2_naming_both_places(runs, capsys):
    code, lines, err = _cli(["show", "nope", "--runs-dir", str(runs)], capsys)
    assert code == 2 and lines == []
    assert err.strip() == (f"posttrain: no run 'nope': neither nope nor {runs / 'nope'} holds an events.sqlite")


def test_show_of_a_missing_run_names_one_place_once(runs, capsys):
    # Regression: `posttrain show /tmp` said "neither /tmp nor /tmp holds an events.sqlite".
    where = runs / "empty-dir"
    code, lines, err = _cli(["show", str(where), "--runs-dir", str(runs)], capsys)
    assert code == 2 and lines == []
    assert err.strip() == f"posttrain: no run {str(where)!r}: {where} holds no events.sqlite"


def test_embedded_subcommands_name_themselves_in_their_help(capsys):
    # Regression: `posttrain embedded build --help` printed "usage: posttrain embedded ...".
    for action, flags in (("build", " [-h] [--force]"), ("path", " [-h]")):
        with pytest.raises(SystemExit) as exit_:
            main(["embedded", action, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.splitlines()[0] == f"usage: posttrain embedded {action}{flags}"
    with pytest.raises(SystemExit) as exit_:
        main(["embedded", "path", "--force"])  # rebuilding is build's option only
    assert exit_.value.code == 2
    assert "unrecognized arguments: --force" in capsys.readouterr().err


def test_embedded_build_shows_progress_on_stderr_and_prints_only_the_path(tmp_path, capsys, monkeypatch):
    import posttrain.models.embedded as embedded

    def fake_build(seed=0, force=False, log=None):
        log("sft step 100/1000 loss 1.2345 (9 s, about 81 s left at this rate)")
        return tmp_path
    monkeypatch.setattr(embedded, "embedded_model_dir", fake_build)
    assert main(["embedded", "build"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [str(tmp_path)]
    assert captured.err.splitlines() == ["posttrain: embedded: sft step 100/1000 loss 1.2345 (9 s, about 81 s left "
                                         "at this rate)"]


@pytest.mark.slow
def test_show_and_runs_on_a_real_run_that_failed_on_bad_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Say hi", "chosen": "hi", "rejected": "bye"}\n{"prompt": "Say yo"}\n')
    code, lines, stderr = _cli(["run", str(REPO / "configs" / "examples" / "dpo_ultrafeedback.yaml"), "--quiet",
                                "--data", str(data), "--runs_dir", str(tmp_path / "runs")], capsys)
    run_dir = Path(lines[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert code == 1 and report["status"] == "failed"
    err = report["error"]
    assert err["agent"] == "data" and err["task"].startswith("data-") and "row 2" in err["reason"]
    # A failed run says why on stderr, in one line; stdout still ends with the run directory.
    assert stderr.splitlines() == [f"posttrain: run failed: data ({err['task']}): {' '.join(err['reason'].split())}"]

    code, shown, _ = _cli(["show", run_dir.name, "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 0
    assert f"error: data (task {err['task']}): {err['reason']}" == shown[-1]
    assert "accuracy: base not measured -> aligned not measured -> compressed not measured" == shown[-2]
    assert f"stages: data=failed {report['stages'][0]['wall_s']:.1f}s" == shown[-3]
    assert shown[-4] == f"run {report['run_id']}: failed in {report['wall_s']:.1f}s"
    timeline = [line.split("] ", 1)[1] for line in shown if line.startswith("[")]
    assert "task.assigned.v1  coordinator -> data  stage=data" in timeline
    assert [line.split("  ")[0] for line in timeline if line.startswith(("task.", "stage.", "run.finished"))] == [
        "stage.started.v1", "task.assigned.v1", "task.failed.v1", "stage.completed.v1", "run.finished.v1"]

    code, listed, _ = _cli(["runs", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 0
    assert [line.split() for line in listed] == [["run", "status", "method", "wall", "directory"],
                                                 [report["run_id"], "failed", "-", f"{report['wall_s']:.1f}s",
                                                  str(run_dir)]]
