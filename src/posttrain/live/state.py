"""The run as seen from its event log: one pure fold shared by the live views, `show` and the report.

Guarantees:
- `RunState.apply(event)` depends only on the event and the state before it: no clock, no file, no network. Folding
  the same log always gives the same state, whether read at once or in polled batches.
- Events are applied in `seq` order; an event whose seq is not greater than the last applied one is ignored, so a
  reader that re-reads an overlapping batch cannot double-count a metric.
- Unknown event types (a newer writer) are kept in `messages` and otherwise ignored, never an error.
- `summarize(type, data)` gives the few payload fields that matter, short, for one-line displays.
- A stage that runs again (`attempt` k > 1 in stage.started / stage.completed: compress and evaluate after the
  evaluation gate rejected a compressed model) is its own entry `name#k` in `stages`, after the earlier attempts,
  which keep their status; logs without `attempt` fold as attempt 1, as before.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

from posttrain.bus.log import LoggedEvent

HEARTBEAT = "agent.heartbeat.v1"
FINISHED = "run.finished.v1"
# Heartbeats arrive every second per agent: a message list of them would hide everything else.
QUIET_TYPES = frozenset({HEARTBEAT})


@dataclass
class AgentView:
    name: str
    state: str = "unknown"        # starting | idle | busy | stopped (from heartbeats / agent.stopped)
    health: str = "unknown"       # healthy | suspect | unhealthy (from agent.health.v1)
    health_reason: str | None = None
    last_heartbeat: float | None = None
    task_id: str | None = None
    task_stage: str | None = None  # the stage of the task it was last assigned
    stage: str | None = None       # progress token from the last heartbeat
    step: int = 0
    total: int | None = None
    note: str | None = None


@dataclass
class StageView:
    name: str                    # the stage, or `stage#k` for its attempt k > 1
    status: str = "running"      # running | succeeded | failed | skipped | rejected (measured; the gate said no)
    #                              | interrupted (the run was stopped mid-stage)
    agent: str | None = None
    task_id: str | None = None
    started: float | None = None
    wall_s: float | None = None
    reason: str | None = None
    attempt: int = 1


def stage_label(stage: str, attempt: int | None) -> str:
    """How views name attempt k of a stage: the stage itself the first time, `stage#k` after."""
    return stage if not attempt or attempt == 1 else f"{stage}#{attempt}"


@dataclass
class MessageView:
    seq: int
    time: float
    type: str
    source: str
    target: str | None
    summary: str


PATH_KEYS = frozenset({"path", "run_dir", "source", "samples_path"})


def _short(value: Any, width: int = 48, tail: bool = False) -> str:
    """`value` on one line, at most `width` characters; `tail` keeps the end (a path's informative part)."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    text = " ".join(text.split())  # a multi-line reason must stay on one display line
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if tail else text[: width - 1] + "…"


def fmt_bytes(n: int | float | None) -> str:
    """Bytes as a human size (``1.5MB``); ``?`` when unknown."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)  # unreachable


# The log stores payloads with sorted keys, so display order has to be chosen: the headline metrics first.
HEADLINE_METRICS = ("loss", "reward", "reward_mean", "kl")


def metric_order(names: Iterable[str]) -> list[str]:
    """Metric names with loss, reward, reward_mean, kl first (when present), then the rest alphabetically."""
    names = list(names)
    return [n for n in HEADLINE_METRICS if n in names] + sorted(n for n in names if n not in HEADLINE_METRICS)


def summarize(type: str, data: dict[str, Any]) -> str:
    """The key payload fields of an event as ``k=v`` pairs, short enough for one terminal line."""
    d = data or {}

    def kv(*keys: str) -> list[str]:
        return [f"{k}={_short(d[k], tail=k in PATH_KEYS)}" for k in keys if d.get(k) is not None]

    if type == "train.metrics.v1":
        parts = [f"step={d.get('step')}/{d.get('total_steps')}"]
        metrics = d.get("metrics") or {}
        parts += [f"{k}={_short(metrics[k])}" for k in metric_order(metrics)[:5]]
        return "  ".join(parts)
    if type == "run.finished.v1":
        err = d.get("error") or {}
        return "  ".join(kv("status") + ([f"error={_short(err.get('agent'))}: {_short(err.get('reason'), 80)}"]
                                         if err else []))
    if type == "task.completed.v1":
        keys = ",".join(list((d.get("result") or {}).keys())[:6])
        return "  ".join(kv("stage") + ([f"result=[{keys}]"] if keys else []))
    if type == "compress.result.v1":
        ratio = (d["size_bytes"] / d["base_size_bytes"]) if d.get("base_size_bytes") else None
        parts = kv("method") + [f"size={fmt_bytes(d.get('size_bytes'))}"]
        if ratio is not None:
            parts.append(f"ratio={ratio:.2f}")
        return "  ".join(parts + kv("reload_ok"))
    if type == "eval.result.v1":
        return "  ".join(kv("model", "metric", "value", "n", "answered"))
    if type == "gate.rejected.v1":
        metrics = ",".join(f.get("metric", "?") for f in d.get("failures") or [])
        return "  ".join(kv("method") + [f"metrics={metrics}", f"next={d.get('next_method') or 'none'}"])
    if type in ("stage.started.v1", "stage.completed.v1") and (d.get("attempt") or 1) > 1:
        d = {**d, "stage": stage_label(d.get("stage"), d.get("attempt"))}
    if type == "run.note.v1":
        return f"{d.get('level')}: {_short(d.get('text'), 80)}"
    keys = {
        "run.started.v1": ("run_dir",),
        "stage.started.v1": ("stage", "agent"),
        "stage.completed.v1": ("stage", "status", "wall_s", "reason"),
        "agent.started.v1": ("agent", "pid"),
        "agent.stopped.v1": ("agent", "reason"),
        "agent.health.v1": ("agent", "health", "reason"),
        "task.assigned.v1": ("stage",),
        "task.failed.v1": ("stage", "reason", "attempts"),
        "event.deadlettered.v1": ("event_type", "agent", "attempts", "reason"),
        "data.profiled.v1": ("kind", "rows", "source"),
        "method.selected.v1": ("method", "runner_up"),
        "train.checkpoint.v1": ("step", "path"),
        "agent.heartbeat.v1": ("agent", "state"),
    }.get(type)
    if keys is None:  # an unknown type: its first few scalar fields are the best guess at what matters
        keys = tuple(k for k, v in d.items() if isinstance(v, (str, int, float, bool)))[:4]
    return "  ".join(kv(*keys))


class RunState:
    """Everything the views and the report show, folded from the log. See the module docstring for guarantees."""

    def __init__(self, max_messages: int = 200):
        self.run_id: str | None = None
        self.run_dir: str | None = None
        self.config: dict[str, Any] = {}
        self.started_at: float | None = None   # run.started time, else the first event's time
        self.finished_at: float | None = None
        self.last_time: float | None = None
        self.status = "pending"                # pending | running | succeeded | failed
        self.error: dict[str, Any] | None = None
        self.interrupted: str | None = None    # "SIGINT" | "SIGTERM" when the run was stopped from outside
        self.agents: dict[str, AgentView] = {}
        self.stages: dict[str, StageView] = {}  # insertion order is the order stages first appeared
        self.messages: deque[MessageView] = deque(maxlen=max_messages)
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.train_method: str | None = None
        self.train_total_steps: int | None = None
        self.train_events = 0
        self.method: dict[str, Any] | None = None
        self.data_profile: dict[str, Any] | None = None
        self.evals: list[dict[str, Any]] = []
        self.compress: list[dict[str, Any]] = []
        self.gate_rejections: list[dict[str, Any]] = []  # gate.rejected.v1 payloads: the evaluation gate's verdicts
        self.checkpoints: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []  # task.failed and event.deadlettered payloads, with the sender
        self.notes: list[dict[str, Any]] = []
        self.last_seq = 0
        self.n_events = 0

    @classmethod
    def from_events(cls, events: Iterable[LoggedEvent], max_messages: int = 200) -> "RunState":
        state = cls(max_messages=max_messages)
        for ev in events:
            state.apply(ev)
        return state

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed")

    def elapsed(self, now: float | None = None) -> float:
        """Seconds since the run started: to its end when finished, else to `now` (default: the last event)."""
        if self.started_at is None:
            return 0.0
        end = self.finished_at if self.finished_at is not None else (now if now is not None else self.last_time)
        return max(0.0, (end or self.started_at) - self.started_at)

    def eval_for(self, model: str) -> dict[str, Any] | None:
        """The last eval.result.v1 payload for `model` (base | aligned | compressed), or None if never measured."""
        for result in reversed(self.evals):
            if result.get("model") == model and not result.get("benchmark"):
                return result
        return None

    def benchmark_results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{"benchmark/metric": {model: payload}} for the standard benchmarks, last result per model."""
        table: dict[str, dict[str, dict[str, Any]]] = {}
        for result in self.evals:
            if result.get("benchmark"):
                table.setdefault(f"{result['benchmark']}/{result['metric']}", {})[result["model"]] = result
        return table

    def _agent(self, name: str) -> AgentView:
        if name not in self.agents:
            self.agents[name] = AgentView(name)
        return self.agents[name]

    def _stage(self, name: str) -> StageView:
        if name not in self.stages:
            self.stages[name] = StageView(name)
        return self.stages[name]

    def apply(self, logged: LoggedEvent) -> bool:
        """Fold one event in. Returns False (and changes nothing) for an event already applied."""
        if logged.seq <= self.last_seq:
            return False
        self.last_seq = logged.seq
        self.n_events += 1
        env = logged.envelope
        t, d = env.time, env.data or {}
        if self.run_id is None:
            self.run_id = env.run_id
        if self.started_at is None:
            self.started_at = t
        self.last_time = t if self.last_time is None else max(self.last_time, t)
        if self.status == "pending":
            self.status = "running"
        if env.type not in QUIET_TYPES:
            self.messages.append(MessageView(logged.seq, t, env.type, env.source, env.target,
                                             summarize(env.type, d)))
        handler = getattr(self, "_on_" + env.type.replace(".", "_"), None)
        if handler is not None:
            handler(env.source, env.target, t, d)
        return True

    # One handler per event type; the name is the type with dots as underscores.

    def _on_run_started_v1(self, source, target, t, d) -> None:
        self.started_at = t  # the run's clock starts here even if an agent logged something earlier
        self.run_dir = d.get("run_dir")
        self.config = d.get("config") or {}

    def _on_run_finished_v1(self, source, target, t, d) -> None:
        self.status = d.get("status", "failed")
        self.finished_at = t
        self.interrupted = d.get("interrupted")
        if d.get("error"):
            self.error = dict(d["error"])
        elif self.status == "failed" and self.failures:
            # A failed finish without an error: the last task failure is the best account of why.
            last = self.failures[-1]
            self.error = {"agent": last.get("agent"), "task": last.get("task_id"), "reason": last.get("reason")}

    def _on_stage_started_v1(self, source, target, t, d) -> None:
        stage = self._stage(stage_label(d["stage"], d.get("attempt")))
        stage.status, stage.agent, stage.task_id, stage.started = "running", d.get("agent"), d.get("task_id"), t
        stage.wall_s, stage.reason, stage.attempt = None, None, d.get("attempt") or 1

    def _on_stage_completed_v1(self, source, target, t, d) -> None:
        stage = self._stage(stage_label(d["stage"], d.get("attempt")))
        stage.attempt = d.get("attempt") or 1
        stage.status, stage.wall_s, stage.reason = d.get("status", "succeeded"), d.get("wall_s"), d.get("reason")
        stage.task_id = stage.task_id or d.get("task_id")

    def _on_agent_started_v1(self, source, target, t, d) -> None:
        agent = self._agent(d.get("agent") or source)
        agent.state = "starting"

    def _on_agent_stopped_v1(self, source, target, t, d) -> None:
        agent = self._agent(d.get("agent") or source)
        agent.state, agent.note = "stopped", d.get("reason")

    def _on_agent_heartbeat_v1(self, source, target, t, d) -> None:
        agent = self._agent(d.get("agent") or source)
        progress = d.get("progress") or {}
        if d.get("task_id") != agent.task_id:
            agent.task_stage = None  # the beat is the authority on the current task; the stage was another's
        agent.state, agent.last_heartbeat, agent.task_id = d.get("state", agent.state), t, d.get("task_id")
        agent.stage, agent.step, agent.total = progress.get("stage"), progress.get("step", 0), progress.get("total")
        agent.note = progress.get("note")

    def _on_agent_health_v1(self, source, target, t, d) -> None:
        agent = self._agent(d.get("agent") or source)
        agent.health, agent.health_reason = d.get("health", "unknown"), d.get("reason")

    def _on_task_assigned_v1(self, source, target, t, d) -> None:
        self._agent(source)  # the coordinator appears in the table even before its first heartbeat
        if target:
            agent = self._agent(target)
            agent.task_id, agent.task_stage = d.get("task_id"), d.get("stage")

    def _task_ended(self, agent_name: str, task_id: str | None) -> None:
        # The agent is free once it answers; until its next beat the table must not show the old task as current.
        agent = self.agents.get(agent_name)
        if agent is not None and agent.task_id == task_id:
            agent.task_id, agent.task_stage = None, None

    def _on_task_completed_v1(self, source, target, t, d) -> None:
        self._task_ended(source, d.get("task_id"))

    def _on_task_failed_v1(self, source, target, t, d) -> None:
        self._task_ended(source, d.get("task_id"))
        self.failures.append({"agent": source, **d})

    def _on_event_deadlettered_v1(self, source, target, t, d) -> None:
        self.failures.append({"agent": d.get("agent") or source, "task_id": None, **d})

    def _on_data_profiled_v1(self, source, target, t, d) -> None:
        self.data_profile = dict(d)

    def _on_method_selected_v1(self, source, target, t, d) -> None:
        self.method = dict(d)

    def _on_train_metrics_v1(self, source, target, t, d) -> None:
        self.train_events += 1
        self.train_method, self.train_total_steps = d.get("method"), d.get("total_steps")
        step = int(d.get("step", 0))
        for name, value in (d.get("metrics") or {}).items():
            try:
                self.curves.setdefault(name, []).append((step, float(value)))
            except (TypeError, ValueError):
                continue  # a non-numeric metric cannot be drawn; the payload model should not allow it anyway

    def _on_train_checkpoint_v1(self, source, target, t, d) -> None:
        self.checkpoints.append(dict(d))

    def _on_eval_result_v1(self, source, target, t, d) -> None:
        self.evals.append(dict(d))

    def _on_compress_result_v1(self, source, target, t, d) -> None:
        self.compress.append(dict(d))

    def _on_gate_rejected_v1(self, source, target, t, d) -> None:
        self.gate_rejections.append(dict(d))

    def _on_run_note_v1(self, source, target, t, d) -> None:
        self.notes.append({"source": source, "time": t, **d})


def finite(values: Iterable[float]) -> list[float]:
    """The finite values only: NaN/inf (a diverged step) must not break min/max or a sparkline's scale."""
    return [v for v in values if math.isfinite(v)]
