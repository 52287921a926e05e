"""Terminal views of a run, read from its event log while the run writes it (or after it ended).

Modes:
- ``rich``: a `rich.live.Live` frame refreshed about 4 times a second: header (run id, elapsed, status, stages),
  agents table (state, health, task, progress, last beat), message flow (type, from -> to, key fields) and training
  curves as unicode sparklines with last/min/max;
- ``plain``: one line per event, heartbeats skipped: ``[  3.2s] task.assigned.v1  coordinator -> trainer  stage=train``;
- ``quiet``: nothing is printed; the log is still folded so callers can wait for the end.

Guarantees: the view only reads the log (read-only SQLite connection, never the writer's lock), so it can neither
block nor alter the run; every event is folded exactly once (by seq) through `RunState`, the same fold the report
uses; a log that does not exist yet reads as empty, so a view may start before the run does. `finish()` drains
every event still unread before the last frame or line, so what the view shows at exit is the whole log (also
after a Ctrl-C broke its loop). Text from the log (reasons, names, paths) is never parsed as rich markup. For a
finished run the agents table shows each agent's last logged state and no heartbeat age (nothing is beating any
more); a heartbeat age is never negative.
"""

from __future__ import annotations

import math
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from posttrain.bus.log import LoggedEvent, read_events

from .state import HEARTBEAT, MessageView, RunState, finite, fmt_bytes, metric_order

MODES = ("rich", "plain", "quiet")
SPARK_CHARS = "▁▂▃▄▅▆▇█"
REFRESH_S = 0.25
STATUS_STYLE = {"succeeded": "bold green", "failed": "bold red", "running": "bold yellow", "pending": "dim",
                "skipped": "dim", "rejected": "bold magenta", "interrupted": "bold red", "busy": "yellow",
                "idle": "green", "stopped": "dim", "starting": "cyan",
                "healthy": "green", "suspect": "yellow", "unhealthy": "bold red", "unknown": "dim"}


def choose_mode(quiet: bool, plain: bool, stream=None) -> str:
    """``quiet`` wins, then ``plain``; ``rich`` only when the output is a terminal (a pipe or CI log gets lines)."""
    if quiet:
        return "quiet"
    if plain:
        return "plain"
    stream = stream if stream is not None else sys.stdout
    try:
        return "rich" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # a closed or odd stream is not a terminal
        return "plain"


def sparkline(values: Iterable[float], width: int = 30) -> str:
    """Values as at most `width` block characters, min to max; longer series are averaged into buckets so the
    shape of the whole run stays visible. A non-finite value (a diverged step) shows as ``×``."""
    vals = list(values)
    if not vals:
        return ""
    if len(vals) > width:
        buckets = []
        for i in range(width):
            chunk = finite(vals[i * len(vals) // width:(i + 1) * len(vals) // width])
            buckets.append(sum(chunk) / len(chunk) if chunk else math.nan)
        vals = buckets
    ok = finite(vals)
    if not ok:
        return "×" * len(vals)
    lo, hi = min(ok), max(ok)
    top = len(SPARK_CHARS) - 1
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append("×")
        elif hi == lo:
            out.append(SPARK_CHARS[top // 2])  # a flat series is a flat line, not a row of maxima
        else:
            out.append(SPARK_CHARS[round((v - lo) / (hi - lo) * top)])
    return "".join(out)


def format_line(msg: MessageView, t0: float | None) -> str:
    """One plain line: relative time, type, from -> to, key payload fields."""
    # Events logged in the same instant as the start can read a hair earlier: never print "-0.0s".
    rel = max(0.0, msg.time - t0) if t0 is not None else 0.0
    line = f"[{rel:5.1f}s] {msg.type}  {msg.source} -> {msg.target or '*'}"
    return f"{line}  {msg.summary}" if msg.summary else line


def _fmt_value(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _bar(step: int, total: int | None, width: int = 10) -> str:
    if not total:
        return f"{step}" if step else ""
    filled = max(0, min(width, round(width * step / total)))
    return f"{'█' * filled}{'░' * (width - filled)} {step}/{total}"


def _styled(value: str) -> Text:
    return Text(value, style=STATUS_STYLE.get(value, ""))


class LiveView:
    """Follows one run's log. `poll()` folds new events (printing them in plain mode); `render()` builds the rich
    frame; `run_until_finished()` loops both until ``run.finished.v1`` is read, `stop_event` is set or
    `timeout_s` passes, then shows a final frame. Accepts the log path or the run directory."""

    def __init__(self, log_path: str | Path, mode: str = "plain", console: Console | None = None,
                 max_messages: int = 10, max_curves: int = 6, refresh_s: float = REFRESH_S):
        if mode not in MODES:
            raise ValueError(f"unknown view mode {mode!r}; expected one of {MODES}")
        path = Path(log_path)
        self.log_path = path / "events.sqlite" if path.is_dir() else path
        self.mode = mode
        self.console = console if console is not None else Console()
        self.state = RunState()
        self.max_messages, self.max_curves, self.refresh_s = max_messages, max_curves, refresh_s

    def poll(self) -> list[LoggedEvent]:
        """Read and fold the events logged since the last poll; returns them (heartbeats included)."""
        try:
            batch = read_events(self.log_path, self.state.last_seq)
        except FileNotFoundError:
            return []  # the run has not created its log yet
        except sqlite3.OperationalError:
            return []  # the writer is still creating the schema, or holds an exclusive lock: try next tick
        new = []
        for ev in batch:
            if not self.state.apply(ev):
                continue
            new.append(ev)
            if self.mode == "plain" and ev.envelope.type != HEARTBEAT:
                self._print(format_line(self.state.messages[-1], self.state.started_at))
        return new

    def _print(self, line: str) -> None:
        # Text, not str: no markup parsing, no highlighting, so a reason like "[rank 0]" prints as written.
        self.console.print(Text(line), soft_wrap=True)

    def _now(self) -> float:
        # A finished run is frozen at its end, so replaying an old log does not show hours-old heartbeats.
        return self.state.finished_at if self.state.finished else time.time()

    # -- rich frame -------------------------------------------------------------------------------------------

    def render(self, now: float | None = None) -> RenderableType:
        """The whole rich frame for the current state. `now` defaults to the wall clock (the run's end if ended)."""
        now = self._now() if now is None else now
        # Stacked full-width sections: the message flow needs the width for type, from -> to and its fields.
        parts: list[RenderableType] = [self._header(now), self._agents(now)]
        results = self._results()
        if results is None:
            parts.append(self._curves())
        else:
            side = Table.grid(expand=True, padding=(0, 1))
            side.add_column(ratio=3)
            side.add_column(ratio=2)
            side.add_row(self._curves(), results)
            parts.append(side)
        parts.append(self._messages())
        if self.state.error:
            err = self.state.error
            parts.append(Panel(Text(f"{err.get('agent')} (task {err.get('task') or '-'}): {err.get('reason')}"),
                               title="error", border_style="red"))
        return Group(*parts)

    def _header(self, now: float) -> Panel:
        s = self.state
        head = Text()
        head.append("posttrain ", style="bold")
        head.append(f"run {s.run_id or '(waiting for the log)'}  ")
        head.append(f"elapsed {s.elapsed(now):.1f}s  ")
        head.append(s.status.upper(), style=STATUS_STYLE.get(s.status, ""))
        if s.method:
            head.append(f"  method {s.method.get('method')}")
        if s.stages:
            head.append("\nstages ")
            for stage in s.stages.values():
                mark = {"succeeded": "✓", "failed": "✗", "skipped": "–", "running": "▶",
                        "rejected": "↺", "interrupted": "■"}.get(stage.status, "?")
                wall = f" {stage.wall_s:.1f}s" if stage.wall_s is not None else ""
                head.append(f"{mark} {stage.name}{wall}  ", style=STATUS_STYLE.get(stage.status, ""))
        return Panel(head, border_style="blue")

    def _agents(self, now: float) -> Table:
        finished = self.state.finished
        table = Table(title="agents", expand=True, title_justify="left")
        for col in ("agent", "state", "health", "task", "progress", "beat"):
            table.add_column(col, no_wrap=True, overflow="ellipsis")
        for agent in self.state.agents.values():
            task = agent.task_stage or agent.stage or ""
            if agent.task_id:
                task = f"{task} ({agent.task_id[:8]})" if task else agent.task_id[:8]
            progress = _bar(agent.step, agent.total)
            if agent.stage and progress:
                progress = f"{agent.stage} {progress}"
            # A finished run beats no more: its agents' last beats (some logged as they stopped, after the end)
            # have no age worth showing. A live run's beat can be stamped a hair after `now`: never "-0.1s ago".
            beat = ("-" if finished or agent.last_heartbeat is None
                    else f"{max(0.0, now - agent.last_heartbeat):.1f}s ago")
            if finished and agent.health == "unknown":
                health = Text("-")  # the watchdog only logs changes; after the run there is nothing left to judge
            else:
                health = _styled(agent.health)
            if agent.health not in ("healthy", "unknown") and agent.health_reason:
                health.append(f" {agent.health_reason}")
            table.add_row(Text(agent.name), _styled(agent.state), health, Text(task), progress, beat)
        return table

    def _messages(self) -> Panel:
        table = Table.grid(padding=(0, 1), expand=True)
        # Fixed minimum widths: otherwise the summary column, the widest, squeezes the others to nothing.
        table.add_column(justify="right", style="dim", no_wrap=True, min_width=7)
        table.add_column(style="cyan", no_wrap=True, min_width=21)
        table.add_column(no_wrap=True, min_width=26)
        table.add_column(no_wrap=True, overflow="ellipsis", style="dim", ratio=1)
        t0 = self.state.started_at
        for msg in list(self.state.messages)[-self.max_messages:]:
            rel = msg.time - t0 if t0 is not None else 0.0
            # Text, not str, for logged strings: a reason like "[rank 0]" must not be parsed as rich markup.
            table.add_row(f"{rel:.1f}s", msg.type, Text(f"{msg.source} → {msg.target or '*'}"), Text(msg.summary))
        return Panel(table, title="message flow", border_style="cyan")

    def _curves(self) -> Panel:
        curves = self.state.curves
        if not curves:
            return Panel(Text("no training metrics yet", style="dim"), title="training", border_style="magenta")
        table = Table.grid(padding=(0, 1))
        for _ in range(5):
            table.add_column(no_wrap=True)
        table.add_row(*(Text(h, style="bold") for h in ("metric", "curve", "last", "min", "max")))
        for name in metric_order(curves)[: self.max_curves]:
            values = [v for _, v in curves[name]]
            ok = finite(values)
            table.add_row(Text(name), Text(sparkline(values, 32), style="magenta"), _fmt_value(values[-1]),
                          _fmt_value(min(ok) if ok else None), _fmt_value(max(ok) if ok else None))
        s = self.state
        step = curves[metric_order(curves)[0]][-1][0]
        title = f"training {s.train_method or ''} step {step}/{s.train_total_steps or '?'}"
        return Panel(table, title=title, border_style="magenta")

    def _results(self) -> Panel | None:
        s = self.state
        if not s.evals and not s.compress:
            return None
        text = Text()
        for model in ("base", "aligned", "compressed"):
            r = s.eval_for(model)
            value = f"{r['value']:.3f} (n={r['n']}, {r['metric']})" if r else "not measured"
            text.append(f"{model:<10} {value}\n")
        if s.compress:
            c = s.compress[-1]
            text.append(f"compressed {c.get('method')}: {fmt_bytes(c.get('base_size_bytes'))} → "
                        f"{fmt_bytes(c.get('size_bytes'))}\nreload {'ok' if c.get('reload_ok') else 'FAILED'}")
        return Panel(text, title="results", border_style="green")

    # -- loop -------------------------------------------------------------------------------------------------

    def run_until_finished(self, stop_event: threading.Event | None = None,
                           timeout_s: float | None = None, *, final: bool = True) -> bool:
        """Poll and render until the run finishes, `stop_event` is set or `timeout_s` passes; then, unless `final`
        is False (the caller calls `finish()` itself, once the writer is done), drain and show the last frame.
        Returns True when ``run.finished.v1`` was read."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None

        def should_stop() -> bool:
            return (self.state.finished or (stop_event is not None and stop_event.is_set())
                    or (deadline is not None and time.monotonic() >= deadline))

        def wait() -> None:
            # Waiting on the event, not sleeping, so a stop request is honoured within the tick.
            if stop_event is not None:
                stop_event.wait(self.refresh_s)
            else:
                time.sleep(self.refresh_s)

        if self.mode == "rich":
            # Transient: the moving frame is erased when the loop ends (or a Ctrl-C breaks it), and `finish()`
            # prints the final one once, from the fully drained log.
            with Live(self.render(), console=self.console, auto_refresh=False, transient=True) as live:
                while True:
                    self.poll()
                    live.update(self.render(), refresh=True)
                    if should_stop():
                        break
                    wait()
        else:
            while True:
                self.poll()
                if should_stop():
                    break
                wait()
        if final:
            self.finish()
        return self.state.finished

    def finish(self) -> None:
        """Drain every event the log holds that was not read yet (plain: printed, in order), then show the final
        frame (rich) or the closing line (plain). Call it once, after the loop, when the writer is done."""
        while self.poll():
            pass  # poll reads in batches; stop only when nothing new is left
        if self.mode == "rich":
            self.console.print(self.render())
        elif self.mode == "plain":
            s = self.state
            self._print(f"run {s.run_id or '?'} {s.status} after {s.elapsed(self._now()):.1f}s")
