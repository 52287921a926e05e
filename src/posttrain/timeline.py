"""`posttrain show RUN` and `posttrain runs`: a run's story and the list of runs, read from event logs only.

Guarantees: nothing here writes; a log is opened read-only, so both work on a running run. `list_runs` skips
directories without `events.sqlite` and reports an unreadable log as status "unreadable" instead of failing the
whole listing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from posttrain.bus.log import read_events
from posttrain.live.state import RunState
from posttrain.live.terminal import format_line
from posttrain.report import MODELS, NOT_MEASURED, build_report, load_state


def format_timeline(run_dir: str | Path) -> str:
    """One line per non-heartbeat event (relative time, type, from -> to, key fields), then a summary."""
    run_dir = Path(run_dir)
    state = load_state(run_dir)
    lines = [format_line(msg, state.started_at) for msg in state.messages]
    report = build_report(run_dir, state)
    lines += ["", f"run {report['run_id']}: {report['status']}"
              + (f" in {report['wall_s']:.1f}s" if report["wall_s"] is not None else "")]
    if report["method"]:
        lines.append(f"method: {report['method']} ({report['rationale'] or 'no rationale recorded'})")
    stages = "  ".join(f"{s['name']}={s['status']}" + (f" {s['wall_s']:.1f}s" if s["wall_s"] is not None else "")
                       for s in report["stages"])
    if stages:
        lines.append(f"stages: {stages}")
    acc = []
    for model in MODELS:
        a = report["accuracy"][model]
        answered = f", answered {a['answered']}" if a and a.get("answered") is not None else ""
        acc.append(f"{model} {a['value']:.3f} (n={a['n']}{answered})" if a else f"{model} {NOT_MEASURED}")
    lines.append("accuracy: " + " -> ".join(acc))
    if report["error"]:
        e = report["error"]
        lines.append(f"error: {e['agent'] or 'unknown'} (task {e['task'] or '-'}): {e['reason']}")
    return "\n".join(lines) + "\n"


def _summary(run_dir: Path) -> dict[str, Any]:
    # Only the few event types the listing needs: a long run's metrics and heartbeats are not read.
    events = read_events(run_dir / "events.sqlite",
                         types=("run.started.v1", "run.finished.v1", "method.selected.v1"))
    state = RunState.from_events(events)  # no event of these types yet: "pending"
    # An interrupted run's report says "failed" (the report.json contract); the listing says which kind of failure.
    status = "interrupted" if state.interrupted else state.status
    return {"run_id": state.run_id or run_dir.name, "dir": str(run_dir), "status": status,
            "method": (state.method or {}).get("method"), "started_at": state.started_at,
            "wall_s": state.elapsed() if state.finished else None}


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per run under `runs_dir` (run_id, dir, status, method, started_at, wall_s), oldest first.

    `status` is pending | running | succeeded | failed | interrupted (stopped by Ctrl-C or SIGTERM; its report says
    "failed") | unreadable; `wall_s` is only set for finished runs."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if not (run_dir / "events.sqlite").exists():
            continue
        try:
            runs.append(_summary(run_dir))
        except (sqlite3.Error, ValueError) as exc:  # a corrupt or half-created log must not hide the others
            runs.append({"run_id": run_dir.name, "dir": str(run_dir), "status": "unreadable", "method": None,
                         "started_at": None, "wall_s": None, "error": str(exc)})
    return sorted(runs, key=lambda r: (r["started_at"] is None, r["started_at"] or 0.0, r["run_id"]))
