"""Running one pipeline: the run directory, the bus, the agents, the watchdog, the live view and the report.

Guarantees:
- `runs/<id>/` holds `config.yaml` (resolved), `events.sqlite`, `checkpoints/`, `artifacts/`, `report.md`,
  `report.json`; the report is built from the event log alone;
- the run always ends: the coordinator finishes it, or this driver does when the coordinator itself is unhealthy or
  the run passes `run_timeout_s` — with a reason naming the agent; a hung agent thread is abandoned (daemon) rather
  than waited for, after the log has recorded everything up to that point;
- agents are started before `run.started.v1` is published, and the bus is closed before the report is written, so
  the report sees the complete log.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from .agents.compressor import CompressorAgent
from .agents.coordinator import Coordinator
from .agents.data import DataAgent
from .agents.evaluator import EvaluatorAgent
from .agents.runtime import AgentRunner
from .agents.selector import SelectorAgent
from .agents.trainer import TrainerAgent
from .bus.bus import Bus
from .bus.envelope import Envelope
from .bus.events import make_event
from .bus.health import Watchdog
from .bus.log import EventLog
from .config import RunConfig, dump_config
from .live.terminal import LiveView
from .report import write_report

RUNNER = "runner"


@dataclass
class RunOutcome:
    run_dir: Path
    status: str
    report: dict[str, Any]
    interrupted: str | None = None  # "SIGINT" (Ctrl-C) or "SIGTERM" when the run was stopped from outside
    abandoned_agents: tuple[str, ...] = ()  # agent threads still busy (hung, or interrupted mid-step)


def new_run_id(prefix: str | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{prefix + '-' if prefix else ''}{stamp}-{uuid.uuid4().hex[:6]}"


def default_agents(config: RunConfig, run_dir: Path) -> dict[str, Any]:
    return {"coordinator": Coordinator(config), "data": DataAgent(config, run_dir),
            "selector": SelectorAgent(config), "trainer": TrainerAgent(config, run_dir),
            "compressor": CompressorAgent(config, run_dir), "evaluator": EvaluatorAgent(config, run_dir)}


def execute(config: RunConfig, *, view: str = "plain", console: Console | None = None,
            agents: dict[str, Any] | None = None,
            customize: Callable[[dict[str, Any]], None] | None = None) -> RunOutcome:
    """Run the pipeline described by `config`; `customize` may replace agents (tests inject faulty ones).

    A KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI) ends the run as failed with the reason
    recorded, and the report is still written."""
    if config.model == "embedded" and agents is None:
        # Set-up, not a stage: building the embedded model (once, then cached) must not count against a stage's
        # progress watchdog, and the user should see it happen.
        from .models.embedded import cache_root, embedded_dir_name, embedded_model_dir, is_built

        if not is_built(cache_root() / embedded_dir_name()):
            (console or Console(stderr=True)).print(
                f"[posttrain] building the embedded model once (cached under {cache_root()}): about a minute on an "
                "idle 2-core CPU, several minutes on a busy one", highlight=False, soft_wrap=True)
        embedded_model_dir()
    run_id = new_run_id(config.run_name)
    run_dir = Path(config.runs_dir).resolve() / run_id
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))

    log = EventLog(run_dir / "events.sqlite")
    bus = Bus(log, run_id)
    cast = agents if agents is not None else default_agents(config, run_dir)
    if customize is not None:
        customize(cast)
    runners = [AgentRunner(agent, bus, config.health) for agent in cast.values()]
    watchdog = Watchdog(bus, config.health)
    finished = threading.Event()
    final: dict[str, Envelope] = {}

    def on_event(seq: int, env: Envelope) -> None:
        if env.type == "run.finished.v1" and "env" not in final:
            final["env"] = env
            finished.set()

    bus.observe(on_event)
    for runner in runners:
        runner.start()
    watchdog.start()
    start_env = make_event("run.started.v1", RUNNER, run_id, {"run_dir": str(run_dir),
                                                              "config": config.model_dump(mode="json")},
                           target="coordinator")
    bus.publish(start_env)
    guard = threading.Thread(target=_guard, name="run-guard", daemon=True,
                             args=(bus, watchdog, runners, config, finished, start_env))
    guard.start()

    live = LiveView(run_dir / "events.sqlite", mode=view, console=console)
    interrupted = None
    try:
        live.run_until_finished(stop_event=finished)
        finished.wait()
    except KeyboardInterrupt as exc:
        interrupted = "SIGTERM" if exc.args and exc.args[0] == "SIGTERM" else "SIGINT"
        if not finished.is_set():
            busy = [f"{r.agent.name} ({r.task_id})" for r in runners if r.task_id]
            what = "terminated (SIGTERM)" if interrupted == "SIGTERM" else "interrupted by the user (Ctrl-C)"
            bus.publish(make_event("run.finished.v1", RUNNER, run_id, {"status": "failed", "error": {
                "agent": RUNNER, "task": None,
                "reason": what + (f" while {', '.join(busy)} was busy" if busy else "")}},
                correlation_id=start_env.id, causation_id=start_env.id))
    for runner in runners:
        runner.stop(timeout=1.0)
    watchdog.stop()
    bus.close()
    log.close()
    write_report(run_dir)
    import json

    report = json.loads((run_dir / "report.json").read_text())
    abandoned = tuple(r.agent.name for r in runners if r.alive)
    return RunOutcome(run_dir, report["status"], report, interrupted, abandoned)


def _guard(bus: Bus, watchdog: Watchdog, runners: list[AgentRunner], config: RunConfig,
           finished: threading.Event, start_env: Envelope) -> None:
    """Ends the run when the coordinator cannot: it is unhealthy or dead, or the run passed its deadline."""
    deadline = time.monotonic() + config.run_timeout_s
    coordinator = next((r for r in runners if r.agent.name == "coordinator"), None)
    while not finished.wait(0.2):
        reason = None
        if coordinator is None:
            reason = ("coordinator", "no coordinator agent is registered")
        elif not coordinator.alive:
            reason = ("coordinator", f"the coordinator's thread died: {coordinator.crash or 'unknown'}")
        elif watchdog.health_of("coordinator") == "unhealthy":
            reason = ("coordinator", "the coordinator is unhealthy (see agent.health events)")
        elif time.monotonic() > deadline:
            reason = ("coordinator", f"the run passed its deadline of {config.run_timeout_s:g} s")
        if reason is not None:
            env = make_event("run.finished.v1", RUNNER, bus.run_id,
                             {"status": "failed", "error": {"agent": reason[0], "task": None, "reason": reason[1]}},
                             correlation_id=start_env.id, causation_id=start_env.id)
            try:
                bus.publish(env)
            except RuntimeError:
                pass
            return
