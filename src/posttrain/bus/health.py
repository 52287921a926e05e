"""Health: heartbeats with a progress token, and a watchdog on its own OS thread.

Guarantees:
- the watchdog learns about agents only from `agent.heartbeat.v1` / `agent.stopped.v1` events on the bus, so what
  it concludes can be re-derived from the log;
- an agent whose beats stop is `suspect` after `suspect_after_s` and `unhealthy` after `dead_after_s`; a busy agent
  whose progress token has not changed for `stall_after_s` is `unhealthy` (hung) even if it still beats;
- each transition is published once, as `agent.health.v1` to the coordinator, with the reason in words;
- the watchdog runs on its own thread, so a blocked agent thread (a long torch call, a deadlock) cannot blind it;
  `check(now)` is a pure step over a supplied clock, so tests drive it with a fake clock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from .bus import Bus
from .envelope import Envelope
from .events import make_event


class HealthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heartbeat_s: float = Field(1.0, gt=0, description="how often each agent beats")
    suspect_after_s: float = Field(5.0, gt=0, description="no beat for this long: suspect")
    dead_after_s: float = Field(15.0, gt=0, description="no beat for this long: unhealthy (dead)")
    stall_after_s: float = Field(900.0, gt=0, description="busy with a frozen progress token this long: hung")
    check_every_s: float = Field(0.2, gt=0)
    max_attempts: int = Field(3, ge=1, description="a failing handler is tried this many times, then dead-lettered")
    retry_backoff_s: float = Field(0.2, ge=0, description="first retry delay; doubles each attempt")


@dataclass
class _AgentRecord:
    last_beat: float
    token: tuple
    token_changed: float
    state: str
    task_id: str | None
    health: str = "healthy"


class Watchdog:
    def __init__(self, bus: Bus, options: HealthOptions, *, notify: str = "coordinator",
                 clock: Callable[[], float] = time.monotonic):
        self.bus = bus
        self.options = options
        self.notify = notify
        self.clock = clock
        self._records: dict[str, _AgentRecord] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        bus.observe(self._on_event)

    # -- observation (called on the publisher's thread) --------------------------------------------------------
    def _on_event(self, seq: int, env: Envelope) -> None:
        if env.type == "agent.heartbeat.v1":
            data = env.data
            progress = data["progress"]
            token = (data.get("task_id"), progress.get("stage"), progress.get("step"), progress.get("note"))
            now = self.clock()
            with self._lock:
                rec = self._records.get(data["agent"])
                if rec is None:
                    self._records[data["agent"]] = _AgentRecord(now, token, now, data["state"], data.get("task_id"))
                    return
                rec.last_beat = now
                if token != rec.token or data["state"] != rec.state:
                    rec.token, rec.token_changed = token, now
                rec.state, rec.task_id = data["state"], data.get("task_id")
                if rec.health == "suspect":
                    rec.health = "recovering"
        elif env.type == "agent.stopped.v1":
            with self._lock:
                rec = self._records.get(env.data["agent"])
                if rec is not None:
                    rec.state = "stopped"

    # -- judgement ---------------------------------------------------------------------------------------------
    def check(self, now: float | None = None) -> list[tuple[str, str, str]]:
        """Evaluate every agent at `now`; publish and return the new (agent, health, reason) transitions."""
        now = self.clock() if now is None else now
        o = self.options
        changes: list[tuple[str, str, str, str | None]] = []
        with self._lock:
            for name, rec in self._records.items():
                if rec.state == "stopped" or rec.health == "unhealthy":
                    continue
                silent = now - rec.last_beat
                frozen = now - rec.token_changed
                if silent >= o.dead_after_s:
                    verdict = ("unhealthy", f"no heartbeat for {silent:.1f} s (limit {o.dead_after_s:g} s): "
                                            "the agent's thread died or the process is stuck")
                elif rec.state == "busy" and frozen >= o.stall_after_s:
                    verdict = ("unhealthy", f"busy on task {rec.task_id} with no progress for {frozen:.1f} s "
                                            f"(limit {o.stall_after_s:g} s): the agent is hung")
                elif silent >= o.suspect_after_s:
                    verdict = ("suspect", f"no heartbeat for {silent:.1f} s (limit {o.suspect_after_s:g} s)")
                elif rec.health == "recovering":
                    verdict = ("healthy", "heartbeats resumed")
                else:
                    continue
                if verdict[0] != rec.health:
                    rec.health = verdict[0]
                    changes.append((name, verdict[0], verdict[1], rec.task_id))
        for name, health, reason, task_id in changes:
            self.bus.publish(make_event("agent.health.v1", "watchdog", self.bus.run_id,
                                        {"agent": name, "health": health, "reason": reason, "task_id": task_id},
                                        target=self.notify if self.notify in self.bus.agents else None))
        return [(n, h, r) for n, h, r, _ in changes]

    def health_of(self, agent: str) -> str | None:
        with self._lock:
            rec = self._records.get(agent)
            return rec.health if rec else None

    # -- thread ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.options.check_every_s):
            try:
                self.check()
            except RuntimeError:
                return  # the bus closed under us: the run is over

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
