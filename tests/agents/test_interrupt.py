"""Ctrl-C (and SIGTERM, which the CLI turns into the same) ends a run cleanly: failed with the reason, the report
written, the process gone — even while an agent thread is stuck in a step."""

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

SCRIPT = textwrap.dedent('''
    import os, sys, threading, signal
    sys.path.insert(0, {tests!r})
    from test_faults import Hangs, _cast
    from posttrain.cli import _sigterm_as_interrupt
    from posttrain.config import RunConfig
    from posttrain.run import execute

    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    config = RunConfig(runs_dir={runs!r}, health={{"heartbeat_s": 0.05, "stall_after_s": 600}})
    outcome = execute(config, view="quiet", agents=_cast(config, Hangs("trainer")))
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
    stages = {s["name"]: s["status"] for s in report["stages"]}
    assert stages["data"] == "succeeded"
