"""Running an agent: one mailbox thread, one heartbeat thread, retries, dead letters, task replies.

An agent is any object with `name`, `subscriptions` (type prefixes) and `handle(env, ctx)`; optionally
`tick(ctx)` (called when the mailbox is idle, for deadlines) and `handles_tasks` (True when `task.assigned.v1`
events carry work whose result is the handler's return value). Composition, not inheritance: the runner owns the
threads, the agent owns only its logic.

Guarantees:
- messages are handled one at a time in mailbox order; an event id already handled is skipped (at-least-once
  delivery with idempotent handling);
- a failing handler is retried with exponential backoff up to `max_attempts`; then the event is dead-lettered
  (`event.deadlettered.v1` to the coordinator) and, for a task, `task.failed.v1` replies to the assigner with the
  error, so the coordinator always hears back;
- an error that cannot succeed on a retry (`PERMANENT_ERRORS`: bad input or settings, a missing file or model, a
  missing dependency, a programming error) is attempted once, then handled as above; a `TaskError` likewise, and
  it is not dead-lettered;
- a task handler's return value becomes `task.completed.v1`, replying to the assignment (same correlation id,
  causation id = the assignment);
- the heartbeat thread beats every `heartbeat_s` with the progress token the handler last set, and stops beating
  when the mailbox thread has died, after announcing `agent.stopped.v1`.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any, Protocol

from pydantic import ValidationError

from ..bus.bus import Bus
from ..bus.envelope import Envelope
from ..bus.events import Payload, make_event, validate_payload
from ..bus.health import HealthOptions
from ..data.errors import DataError
from ..models.loading import ModelSourceError

# Deterministic failures: the same input fails the same way, so a retry only delays the report (an offline hub id
# took minutes over three attempts). Everything else (RuntimeError such as CUDA out-of-memory, OSError such as a
# busy file or a network error, TimeoutError) may pass on a retry and is retried with backoff. FileNotFoundError
# and NotADirectoryError are OSErrors but deterministic; ModelSourceError (a bad model reference) is an OSError too.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, NotImplementedError, ImportError, FileNotFoundError,
    NotADirectoryError, IsADirectoryError, DataError, ValidationError, ModelSourceError)


def is_permanent(exc: BaseException) -> bool:
    """True when retrying the handler cannot change the outcome (see PERMANENT_ERRORS)."""
    return isinstance(exc, PERMANENT_ERRORS)


class Agent(Protocol):
    name: str
    subscriptions: tuple[str, ...]

    def handle(self, env: Envelope, ctx: "AgentContext") -> Any: ...


class TaskError(Exception):
    """An expected failure of a task (bad data, unsupported method): reported once, never retried."""


class AgentContext:
    """What a handler may do: publish events (causally linked to the message being handled) and report progress."""

    def __init__(self, runner: "AgentRunner"):
        self._runner = runner
        self.current: Envelope | None = None

    @property
    def run_id(self) -> str:
        return self._runner.bus.run_id

    @property
    def name(self) -> str:
        return self._runner.agent.name

    def publish(self, type: str, data: Payload | dict[str, Any], *, target: str | None = None,
                subject: str | None = None, dataref: str | None = None) -> Envelope:
        cur = self.current
        env = make_event(type, self.name, self.run_id, data, target=target,
                         subject=subject if subject is not None else (cur.subject if cur else None),
                         correlation_id=(cur.correlation_id or cur.id) if cur else None,
                         causation_id=cur.id if cur else None, dataref=dataref)
        self._runner.bus.publish(env)
        return env

    def progress(self, stage: str | None = None, step: int = 0, total: int | None = None,
                 note: str | None = None) -> None:
        """Update the progress token the heartbeats carry; the watchdog reads a frozen token as a hang."""
        self._runner.progress = {"stage": stage, "step": int(step), "total": total, "note": note}


class AgentRunner:
    def __init__(self, agent: Any, bus: Bus, options: HealthOptions):
        self.agent = agent
        self.bus = bus
        self.options = options
        self.mailbox = bus.register(agent.name)
        if getattr(agent, "subscriptions", ()):
            bus.subscribe(agent.name, *agent.subscriptions)
        self.ctx = AgentContext(self)
        self.state = "starting"
        self.task_id: str | None = None
        self.progress: dict[str, Any] = {"stage": None, "step": 0, "total": None, "note": None}
        self.crash: str | None = None
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"agent-{agent.name}", daemon=True)
        self._beat = threading.Thread(target=self._heartbeats, name=f"beat-{agent.name}", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.bus.publish(make_event("agent.started.v1", self.agent.name, self.bus.run_id,
                                    {"agent": self.agent.name, "pid": os.getpid(), "thread": self._thread.name}))
        self._thread.start()
        self._beat.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)
        self._beat.join(timeout=timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- threads -----------------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.state = "idle"
            while not self._stop.is_set():
                env = self.mailbox.get(timeout=0.05)
                if env is None:
                    tick = getattr(self.agent, "tick", None)
                    if tick is not None:
                        self._guarded(tick)
                    continue
                if env.id in self._seen:
                    continue
                self._seen.add(env.id)
                self._dispatch(env)
        except BaseException as exc:  # noqa: BLE001 - recorded; the thread ends here and the beats stop
            self.crash = f"{type(exc).__name__}: {exc}"

    def _guarded(self, fn: Any) -> None:
        try:
            fn(self.ctx)
        except Exception:  # a tick must never kill the agent; its failures surface through the log
            self._note("error", f"{self.agent.name}.tick failed:\n{traceback.format_exc(limit=3)}")

    def _dispatch(self, env: Envelope) -> None:
        is_task = env.type == "task.assigned.v1" and env.target == self.agent.name
        self.ctx.current = env
        if is_task:
            self.state, self.task_id = "busy", env.data["task_id"]
            self.ctx.progress(env.data["stage"], 0, None, "started")
        try:
            attempts, error = 0, None
            while attempts < self.options.max_attempts and not (attempts and self._stop.is_set()):
                attempts += 1
                try:
                    result = self.agent.handle(env, self.ctx)
                    error = None
                    break
                except TaskError as exc:
                    error = (exc, traceback.format_exc(limit=4))
                    break
                except Exception as exc:  # noqa: BLE001 - retried unless permanent, then dead-lettered below
                    error = (exc, traceback.format_exc(limit=6))
                    if is_permanent(exc):
                        break
                    if attempts < self.options.max_attempts:
                        time.sleep(self.options.retry_backoff_s * (2 ** (attempts - 1)))
            if error is None:
                if is_task:
                    self._reply(env, "task.completed.v1", {"task_id": env.data["task_id"], "stage": env.data["stage"],
                                                           "result": result or {}})
                return
            exc, trace = error
            reason = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, TaskError):
                self.ctx.publish("event.deadlettered.v1", {"event_id": env.id, "event_type": env.type,
                                                           "agent": self.agent.name, "attempts": attempts,
                                                           "reason": reason}, target=_coordinator(self.bus))
                self._note("error", f"{self.agent.name} failed on {env.type} after {attempts} attempt(s):\n{trace}")
            if is_task:
                self._reply(env, "task.failed.v1", {"task_id": env.data["task_id"], "stage": env.data["stage"],
                                                    "reason": reason, "error_type": type(exc).__name__,
                                                    "attempts": attempts})
        finally:
            self.ctx.current = None
            if is_task:
                self.state, self.task_id = "idle", None

    def _reply(self, request: Envelope, type: str, data: dict[str, Any]) -> None:
        self.bus.publish(request.reply(type, self.agent.name, validate_payload(type, data)))

    def _note(self, level: str, text: str) -> None:
        self.bus.publish(make_event("run.note.v1", self.agent.name, self.bus.run_id, {"level": level, "text": text[-4000:]}))

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.options.heartbeat_s):
            if not self._thread.is_alive():
                if not self._stop.is_set():
                    self._safe_publish("agent.stopped.v1", {"agent": self.agent.name,
                                                            "reason": f"thread died: {self.crash or 'unknown'}"})
                return
            self._safe_publish("agent.heartbeat.v1", {"agent": self.agent.name, "state": self.state,
                                                      "task_id": self.task_id, "progress": dict(self.progress)})
        self._safe_publish("agent.heartbeat.v1", {"agent": self.agent.name, "state": "stopped",
                                                  "task_id": None, "progress": dict(self.progress)})

    def _safe_publish(self, type: str, data: dict[str, Any]) -> None:
        try:
            self.bus.publish(make_event(type, self.agent.name, self.bus.run_id, data))
        except RuntimeError:
            pass  # the bus closed: the run is over and nobody is listening


def _coordinator(bus: Bus) -> str | None:
    return "coordinator" if "coordinator" in bus.agents else None
