"""Ctrl-C (and SIGTERM, which the CLI turns into the same) ends a run cleanly: failed with the reason, the report
written, the process gone — even while an agent thread is stuck in a step. The stage it stopped is closed as
interrupted with its wall time, the plain stream shows every logged event, and a Ctrl-C during the embedded model's
build says so and leaves nothing cached."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from posttrain.bus.log import read_events

SCRIPT = textwrap.dedent('''
    import os, sys, threading, signal
    sys.path.insert(0, {tests!r})
    from test_faults import Hangs, _cast
    from posttrain.cli import _sigterm_as_interrupt
    from posttrain.config import RunConfig
    from posttrain.run import execute

    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    config = RunConfig(runs_dir={runs!r}, health={{"heartbeat_s": 0.05, "stall_after_s": 600}})
    outcome = execute(config, view="plain", agents=_cast(config, Hangs("trainer")))
    print(outcome.run_dir, flush=True)
    os._exit({{"SIGINT": 130, "SIGTERM": 143}}.get(outcome.interrupted, 1))
''')


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_ends_the_run_with_a_report(sig, tmp_path):
    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=tests, runs=str(tmp_path / "runs")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the trainer is stuck in its step
        logs = list((tmp_path / "runs").glob("*/events.sqlite"))
        if logs:
            try:
                rows = sqlite3.connect(f"file:{logs[0]}?mode=ro", uri=True).execute(
                    "SELECT data FROM events WHERE type = 'stage.started.v1'").fetchall()
            except sqlite3.Error:
                rows = []
            if any(json.loads(r[0])["stage"] == "train" for r in rows):
                break
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err[-2000:]
    run_dir = Path(out.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed"
    expected = "interrupted by the user (Ctrl-C)" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert f"{expected} while trainer" in report["error"]["reason"]
    assert report["interrupted"] is True
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["data"]["status"] == "succeeded"
    # The stage it stopped is closed, by the runner, with its wall time up to the interrupt.
    logged = [e.envelope for e in read_events(run_dir / "events.sqlite")]
    started = next(e for e in logged if e.type == "stage.started.v1" and e.data["stage"] == "train")
    closed = [e for e in logged if e.type == "stage.completed.v1" and e.data["stage"] == "train"]
    assert len(closed) == 1 and closed[0].source == "runner" and closed[0].data["status"] == "interrupted"
    assert closed[0].data["task_id"] == started.data["task_id"]
    assert closed[0].data["reason"] == report["error"]["reason"]
    assert stages["train"]["status"] == "interrupted" and stages["train"]["wall_s"] == closed[0].data["wall_s"]
    assert 0 < stages["train"]["wall_s"] <= closed[0].time - started.time + 0.0005  # measured to the ms, rounded
    finished = [e for e in logged if e.type == "run.finished.v1"]
    assert len(finished) == 1 and finished[0].data["interrupted"] == ("SIGINT" if sig == signal.SIGINT else "SIGTERM")
    assert logged.index(closed[0]) < logged.index(finished[0])
    # The plain stream drained the whole log before the process left: one line per non-heartbeat event, in order,
    # then the closing line and the run directory.
    lines = out.strip().splitlines()
    printed = [line.split()[2] for line in lines if line.startswith("[")]
    assert printed == [e.type for e in logged if e.type != "agent.heartbeat.v1"]
    assert lines[-2] == f"run {report['run_id']} failed after {report['wall_s']:.1f}s"


def test_ctrl_c_during_the_embedded_build_says_so_and_caches_nothing(tmp_path, monkeypatch, capsys):
    """The build is interrupted after it has written part of a model: `posttrain demo` exits 130 with one line
    saying so, and the cache holds nothing a later run would take for a finished build."""
    from posttrain.cli import main
    from posttrain.models import embedded

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))

    def interrupted_build(out, seed, log):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_build_into", interrupted_build)
    assert main(["demo", "--plain", "--runs_dir", str(tmp_path / "runs")]) == 130
    out, err = capsys.readouterr()
    # rich markup must not eat the "[posttrain]" prefix of the announcement
    assert out.startswith("[posttrain] building the embedded model once (cached under ")
    assert err.splitlines() == ["posttrain: the embedded model build was interrupted (Ctrl-C); nothing was cached, "
                                "the next run builds it again"]
    target = tmp_path / "cache" / embedded.embedded_dir_name()
    assert not embedded.is_built(target) and not target.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{target.name}.lock"]  # the lock only
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag,shown", [("--plain", True), ("--quiet", False)])
def test_the_embedded_build_reports_progress_unless_quiet(tmp_path, monkeypatch, capsys, flag, shown):
    """A first build takes minutes: its progress lines reach the terminal (not in --quiet)."""
    from posttrain.cli import main
    from posttrain.models import embedded

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))

    def stopped_after_progress(out, seed, log):
        log("sft step 100/1000 loss 1.2345")
        raise KeyboardInterrupt  # ends the command here: the rest of the build is not what this test is about

    monkeypatch.setattr(embedded, "_build_into", stopped_after_progress)
    assert main(["demo", flag, "--runs_dir", str(tmp_path / "runs")]) == 130
    out = capsys.readouterr().out
    assert ("[posttrain] embedded: sft step 100/1000 loss 1.2345" in out.splitlines()) is shown
