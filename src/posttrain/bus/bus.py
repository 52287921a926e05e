"""In-process bus: log first, then deliver to per-agent mailboxes; request/reply with deadlines.

Guarantees:
- `publish` validates the payload, commits the event to the run's log, and only then delivers it; an event that
  could not be logged is never delivered, and an event addressed to nobody known is never logged;
- exactly one `run.finished.v1` per run: later ones are dropped;
- each agent has one FIFO mailbox drained by one thread, and logging + delivery happen under one lock, so an agent
  sees its messages in log order whatever the number of publishing threads;
- delivery: to `target` if set, plus every agent subscribed to a matching type prefix (each agent at most once);
- a reply (an event whose `causation_id` is a pending request's id) resolves that request's future instead of
  going to a mailbox; `request` raises `RequestTimeout` at its deadline;
- observers (watchdog, run driver) see every event synchronously after it is logged.

This is the `inproc` backend of the `Bus` interface; a Ray backend keeps the same methods (DESIGN.md §2).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from .envelope import Envelope
from .events import validate_payload
from .log import EventLog


class RequestTimeout(TimeoutError):
    pass


class Mailbox:
    """A FIFO of envelopes for one agent."""

    def __init__(self, owner: str):
        self.owner = owner
        self._queue: "queue.Queue[Envelope]" = queue.Queue()

    def put(self, env: Envelope) -> None:
        self._queue.put(env)

    def get(self, timeout: float | None = None) -> Envelope | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def qsize(self) -> int:
        return self._queue.qsize()


class Bus:
    def __init__(self, log: EventLog, run_id: str):
        self.log = log
        self.run_id = run_id
        self._lock = threading.RLock()
        self._mailboxes: dict[str, Mailbox] = {}
        self._subscriptions: dict[str, list[str]] = {}  # agent -> type prefixes
        self._pending: dict[str, Future] = {}
        self._observers: list[Callable[[int, Envelope], None]] = []
        self._closed = False
        self._finished = False

    # -- wiring ------------------------------------------------------------------------------------------------
    def register(self, agent: str) -> Mailbox:
        with self._lock:
            if agent in self._mailboxes:
                raise ValueError(f"agent {agent!r} is already registered on the bus")
            box = self._mailboxes[agent] = Mailbox(agent)
            return box

    def subscribe(self, agent: str, *type_prefixes: str) -> None:
        with self._lock:
            self._subscriptions.setdefault(agent, []).extend(type_prefixes)

    def observe(self, callback: Callable[[int, Envelope], None]) -> None:
        with self._lock:
            self._observers.append(callback)

    @property
    def agents(self) -> list[str]:
        with self._lock:
            return list(self._mailboxes)

    # -- sending -----------------------------------------------------------------------------------------------
    def publish(self, env: Envelope) -> int | None:
        """Log `env` (commit), then deliver it. Returns its seq, or None for a second `run.finished.v1`.

        Logging and delivery happen under one lock, so every mailbox receives events in log order even when many
        threads publish at once. The recipients are resolved before logging: an event nobody can receive is refused
        and never logged. A run finishes once: the first `run.finished.v1` wins and later ones are dropped."""
        validate_payload(env.type, env.data)
        if env.run_id != self.run_id:
            raise ValueError(f"event for run {env.run_id!r} published on the bus of run {self.run_id!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the bus of run {self.run_id} is closed; {env.type} from {env.source} dropped")
            if env.type == "run.finished.v1":
                if self._finished:
                    return None
                self._finished = True
            future = self._pending.get(env.causation_id) if env.causation_id else None
            recipients = [] if future is not None else self._recipients(env)
            seq = self.log.append(env)
            if future is not None:
                self._pending.pop(env.causation_id, None)
            for observer in self._observers:
                observer(seq, env)
            if future is not None:
                future.set_result(env)
            for box in recipients:
                box.put(env)
        return seq

    def _recipients(self, env: Envelope) -> list[Mailbox]:
        names: list[str] = []
        if env.target is not None:
            if env.target not in self._mailboxes:
                raise ValueError(f"{env.type} from {env.source} targets unknown agent {env.target!r}")
            names.append(env.target)
        for agent, prefixes in self._subscriptions.items():
            if agent not in names and agent != env.source and any(env.type.startswith(p) for p in prefixes):
                names.append(agent)
        return [self._mailboxes[n] for n in names]

    def request(self, env: Envelope, timeout: float) -> Envelope:
        """Publish `env` and wait for the event whose causation_id is `env.id`; RequestTimeout at the deadline."""
        future: Future = Future()
        with self._lock:
            self._pending[env.id] = future
        try:
            self.publish(env)
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise RequestTimeout(f"no reply to {env.type} ({env.id}) from {env.target} within {timeout:g} s") from None
        finally:
            with self._lock:
                self._pending.pop(env.id, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
