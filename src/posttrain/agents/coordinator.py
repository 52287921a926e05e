"""The coordinator: plans the stages, assigns each as a task over the bus, collects results, watches health.

Guarantees:
- stages run in plan order, one task each; a task is an `task.assigned.v1` request to one agent and is closed by
  exactly one `task.completed.v1` or `task.failed.v1` reply with the same correlation id;
- the run always ends with exactly one `run.finished.v1`: succeeded after the last stage, or failed with
  {agent, task, reason} when a task fails, an agent is unhealthy (dead or hung), an agent stops, an event is
  dead-lettered, or a task passes its deadline — never a hang;
- its state is built only from the events it receives, so it can be re-derived from the log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from ..bus.envelope import Envelope, new_id
from ..config import RunConfig
from .runtime import AgentContext


@dataclass(frozen=True)
class Stage:
    name: str
    agent: str


def plan_stages(config: RunConfig) -> list[Stage]:
    stages = [Stage("data", "data"), Stage("select", "selector")]
    if config.evaluate.enabled:
        stages.append(Stage("evaluate_base", "evaluator"))
    stages.append(Stage("train", "trainer"))
    if config.compress.enabled:
        stages.append(Stage("compress", "compressor"))
    if config.evaluate.enabled:
        stages.append(Stage("evaluate", "evaluator"))
    return stages


@dataclass
class _Pending:
    stage: Stage
    task_id: str
    started: float
    deadline: float


class Coordinator:
    name = "coordinator"
    subscriptions = ("agent.health.", "agent.stopped.", "event.deadlettered.")

    def __init__(self, config: RunConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.plan = plan_stages(config)
        self.clock = clock
        self.results: dict[str, dict[str, Any]] = {}
        self.pending: _Pending | None = None
        self.finished = False
        self._next_index = 0

    # -- messages ----------------------------------------------------------------------------------------------
    def handle(self, env: Envelope, ctx: AgentContext) -> None:
        if self.finished:
            return
        kind, data = env.type, env.data
        if kind == "run.started.v1":
            self._assign_next(ctx)
        elif kind == "task.completed.v1":
            if self._is_pending(data["task_id"]):
                stage = self.pending.stage
                self._close_stage(ctx, "succeeded")
                self.results[stage.name] = data["result"]
                self._assign_next(ctx)
        elif kind == "task.failed.v1":
            if self._is_pending(data["task_id"]):
                self._fail(ctx, env.source, data["task_id"],
                           f"stage '{data['stage']}' failed after {data['attempts']} attempt(s): {data['reason']}")
        elif kind == "agent.health.v1" and data["health"] == "unhealthy":
            self._fail(ctx, data["agent"], self._task_of(data["agent"]) or data.get("task_id"), data["reason"])
        elif kind == "agent.stopped.v1":
            self._fail(ctx, data["agent"], self._task_of(data["agent"]), f"agent stopped: {data['reason']}")
        elif kind == "event.deadlettered.v1":
            # A task's own failure arrives as task.failed right after; anything else dead-lettered ends the run.
            if not (self.pending and self.pending.stage.agent == data["agent"]):
                self._fail(ctx, data["agent"], None, f"{data['event_type']} could not be handled after "
                                                     f"{data['attempts']} attempt(s): {data['reason']}")

    def tick(self, ctx: AgentContext) -> None:
        if self.finished or self.pending is None:
            return
        if self.clock() > self.pending.deadline:
            p = self.pending
            self._fail(ctx, p.stage.agent, p.task_id, f"stage '{p.stage.name}' passed its deadline of "
                                                      f"{self.config.task_timeout_s:g} s without a reply")

    # -- helpers -----------------------------------------------------------------------------------------------
    def _is_pending(self, task_id: str) -> bool:
        return self.pending is not None and self.pending.task_id == task_id

    def _task_of(self, agent: str) -> str | None:
        return self.pending.task_id if self.pending and self.pending.stage.agent == agent else None

    def _assign_next(self, ctx: AgentContext) -> None:
        if self._next_index >= len(self.plan):
            self.finished = True
            ctx.publish("run.finished.v1", {"status": "succeeded", "error": None})
            return
        stage = self.plan[self._next_index]
        self._next_index += 1
        task_id = f"{stage.name}-{new_id()[:8]}"
        now = self.clock()
        self.pending = _Pending(stage, task_id, now, now + self.config.task_timeout_s)
        ctx.publish("stage.started.v1", {"stage": stage.name, "task_id": task_id, "agent": stage.agent},
                    subject=stage.name)
        try:
            params = self._params_for(stage.name)
        except (KeyError, TypeError, ValueError) as exc:
            # An earlier stage's result lacks what this stage needs: a bug to report, not a deadline to wait out.
            self._fail(ctx, "coordinator", task_id, f"could not prepare stage '{stage.name}' from earlier results: "
                                                    f"{type(exc).__name__}: {exc}")
            return
        ctx.publish("task.assigned.v1", {"task_id": task_id, "stage": stage.name, "params": params,
                                         "deadline_s": self.config.task_timeout_s},
                    target=stage.agent, subject=stage.name)

    def _close_stage(self, ctx: AgentContext, status: str, reason: str | None = None) -> None:
        p = self.pending
        if p is None:
            return
        ctx.publish("stage.completed.v1", {"stage": p.stage.name, "task_id": p.task_id, "status": status,
                                           "wall_s": round(self.clock() - p.started, 3), "reason": reason},
                    subject=p.stage.name)
        self.pending = None

    def _fail(self, ctx: AgentContext, agent: str, task: str | None, reason: str) -> None:
        if self.finished:
            return
        self._close_stage(ctx, "failed", reason)
        self.finished = True
        ctx.publish("run.finished.v1", {"status": "failed", "error": {"agent": agent, "task": task, "reason": reason}})

    def _params_for(self, stage: str) -> dict[str, Any]:
        """The dynamic inputs of a stage: paths and choices produced by earlier stages (never tensors)."""
        r = self.results
        if stage == "data":
            return {}
        if stage == "select":
            return {"kind": r["data"]["kind"], "profile": r["data"]["profile"]}
        if stage == "evaluate_base":
            return {"models": {"base": r["data"]["model"]}, "eval_path": r["data"]["eval_path"],
                    "eval_kind": r["data"]["eval_kind"], "method": r["select"]["method"]}
        if stage == "train":
            return {"method": r["select"]["method"], "model": r["data"]["model"], "kind": r["data"]["kind"],
                    "train_path": r["data"]["train_path"]}
        if stage == "compress":
            return {"model": r["train"]["checkpoint"], "eval_path": r["data"]["eval_path"],
                    "train_path": r["data"]["train_path"]}
        if stage == "evaluate":
            models = {"aligned": r["train"]["checkpoint"]}
            if "compress" in r:
                models["compressed"] = r["compress"]["path"]
            return {"models": models, "eval_path": r["data"]["eval_path"], "eval_kind": r["data"]["eval_kind"],
                    "method": r["select"]["method"],
                    "base_results": (r.get("evaluate_base") or {}).get("results")}
        raise ValueError(f"no parameters defined for stage {stage!r}")
