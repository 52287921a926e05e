"""Running one pipeline: the run directory, the bus, the agents, the watchdog, the live view and the report.

Guarantees:
- `runs/<id>/` holds `config.yaml` (resolved), `events.sqlite`, `checkpoints/`, `artifacts/`, `report.md`,
  `report.json`; the report is built from the event log alone;
- the run always ends: the coordinator finishes it, or this driver does when the coordinator itself is unhealthy or
  the run passes `run_timeout_s` — with a reason naming the agent; a hung agent thread is abandoned (daemon) rather
  than waited for, after the log has recorded everything up to that point;
- agents are started before `run.started.v1` is published, and the bus is closed before the report is written, so
  the report sees the complete log; the live view drains the log after the bus is closed, so its stream ends with
  every event the report counts;
- a Ctrl-C (or SIGTERM) ends the run as failed: the coordinator is stopped first (it can no longer move the run
  on), every stage the log shows started and not closed gets `stage.completed.v1` with status "interrupted" and
  its wall time up to the interrupt, then `run.finished.v1` says who was busy and carries `interrupted`;
- a Ctrl-C while the embedded model is being built says so in one line; the build leaves nothing in the cache
  (`models.embedded` builds into a temporary directory that is removed), so the next run builds it again.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.text import Text

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
from .bus.log import EventLog, read_events
from .config import RunConfig, dump_config
from .live.state import RunState
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
        from .models.embedded import RECIPE, cache_root, embedded_dir_name, embedded_model_dir, is_built

        build_log = None
        if not is_built(cache_root() / embedded_dir_name()):
            notice = console or Console(stderr=True)
            # Text, not a markup string: "[posttrain]" would be read as a style tag and vanish.
            notice.print(Text(
                f"[posttrain] building the embedded model once (cached under {cache_root()}): "
                f"{RECIPE['train']['steps']:,} SFT steps, two to three minutes on an idle 2-core CPU, several on a busy "
                "one" + ("" if view == "quiet" else "; progress and the time left at the measured rate below")),
                highlight=False, soft_wrap=True)
            if view != "quiet":  # progress lines (every 10% of the SFT steps), so a long first build is visibly alive
                build_log = lambda msg: notice.print(Text(f"[posttrain] embedded: {msg}"),  # noqa: E731
                                                     highlight=False, soft_wrap=True)
        try:
            embedded_model_dir(log=build_log)
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if exc.args and exc.args[0] == "SIGTERM" else "interrupted (Ctrl-C)"
            print(f"posttrain: the embedded model build was {what}; nothing was cached, the next run builds it "
                  "again", file=sys.stderr, flush=True)
            raise
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
        live.run_until_finished(stop_event=finished, final=False)
        finished.wait()
    except KeyboardInterrupt as exc:
        interrupted = "SIGTERM" if exc.args and exc.args[0] == "SIGTERM" else "SIGINT"
        if not finished.is_set():
            busy = [f"{r.agent.name} ({r.task_id})" for r in runners if r.task_id]
            what = "terminated (SIGTERM)" if interrupted == "SIGTERM" else "interrupted by the user (Ctrl-C)"
            reason = what + (f" while {', '.join(busy)} was busy" if busy else "")
            for runner in runners:  # the coordinator first: it must not start or close a stage from here on
                if runner.agent.name == "coordinator":
                    runner.stop(timeout=1.0)
            _close_open_stages(bus, run_dir / "events.sqlite", reason, start_env)
            bus.publish(make_event("run.finished.v1", RUNNER, run_id, {"status": "failed", "error": {
                "agent": RUNNER, "task": None, "reason": reason}, "interrupted": interrupted},
                correlation_id=start_env.id, causation_id=start_env.id))
    for runner in runners:
        runner.stop(timeout=1.0)
    watchdog.stop()
    bus.close()
    log.close()
    live.finish()  # the log is complete now: the view shows every event the report will count
    write_report(run_dir)
    import json

    report = json.loads((run_dir / "report.json").read_text())
    abandoned = tuple(r.agent.name for r in runners if r.alive)
    return RunOutcome(run_dir, report["status"], report, interrupted, abandoned)


def _close_open_stages(bus: Bus, log_path: Path, reason: str, start_env: Envelope) -> None:
    """Close, as "interrupted", every stage the log shows started and not completed; its wall time runs from its
    logged start to now (both wall-clock times, as every event's)."""
    state = RunState.from_events(read_events(log_path))
    now = time.time()
    for view in state.stages.values():
        if view.status != "running" or view.task_id is None or view.started is None:
            continue
        stage = view.name.rsplit("#", 1)[0] if view.attempt > 1 else view.name  # the label of attempt k is name#k
        bus.publish(make_event("stage.completed.v1", RUNNER, bus.run_id, {
            "stage": stage, "task_id": view.task_id, "status": "interrupted",
            "wall_s": round(max(0.0, now - view.started), 3), "reason": reason, "attempt": view.attempt},
            subject=stage, correlation_id=start_env.id, causation_id=start_env.id))


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
