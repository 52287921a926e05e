"""The coordinator: plans the stages, assigns each as a task over the bus, collects results, watches health.

Guarantees:
- stages run in plan order, one task each; a task is an `task.assigned.v1` request to one agent and is closed by
  exactly one `task.completed.v1` or `task.failed.v1` reply with the same correlation id;
- the run always ends with exactly one `run.finished.v1`: succeeded after the last stage, or failed with
  {agent, task, reason} when a task fails, an agent is unhealthy (dead or hung), an agent stops, an event is
  dead-lettered, or a task passes its deadline — never a hang;
- its state is built only from the events it receives, so it can be re-derived from the log;
- the evaluation gate (`evaluate.gate`) acts on compression: when the evaluate stage reports that the compressed
  model dropped past an allowance against the aligned one (`gate_failures`), the coordinator publishes
  `gate.rejected.v1` (the metric(s) with the numbers, the rejected method, the next one), then assigns compress
  again (attempt k+1) with the methods of `[compress.method, *compress.fallback]` not yet tried, and evaluate again
  on the new compressed model only (its aligned results are the earlier attempt's). With none left, the
  `gate.rejected.v1` says so and the run fails with the gate's numbers. A drop from base to aligned is the
  evaluator's task failure and fails the run (no compression can fix it);
- a failed first compress task (`task.failed.v1`: the method raised or every method was rejected by the
  compressor's own gate) does not leave the aligned model unmeasured: the evaluate stage still runs, on the aligned
  model alone, and the run then fails with the compress failure as its error (a later failure is added to that
  reason). Anything else that ends a compress stage (an unhealthy agent, a passed deadline) fails the run at once.
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
    attempt: int = 1  # > 1: compress / evaluate again after the evaluation gate rejected a compressed model

    @property
    def label(self) -> str:
        """The stage as views name it (`live.state` folds attempt k > 1 as `name#k`)."""
        return self.name if self.attempt == 1 else f"{self.name}#{self.attempt}"


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
    params: dict[str, Any] | None = None


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
        self._untried: list[str] = []        # compression methods after the one the last compress task kept
        self._compress_attempt = 0
        self._gate_rejected: list[str] = []  # methods whose artifacts the evaluation gate rejected, in order
        self._deferred: tuple[str, str, str] | None = None  # (agent, task, reason) of a compress failure held back

    # -- messages ----------------------------------------------------------------------------------------------
    def handle(self, env: Envelope, ctx: AgentContext) -> None:
        if self.finished:
            return
        kind, data = env.type, env.data
        if kind == "run.started.v1":
            self._assign_next(ctx)
        elif kind == "task.completed.v1":
            if self._is_pending(data["task_id"]):
                stage, result = self.pending.stage, data["result"]
                if stage.name == "evaluate" and result.get("gate_failures"):
                    self._gate_rejected_compression(ctx, result)
                    return
                self._record(result)
                self._close_stage(ctx, "succeeded")
                self._assign_next(ctx)
        elif kind == "task.failed.v1":
            if self._is_pending(data["task_id"]):
                reason = (f"stage '{self.pending.stage.label}' failed after {data['attempts']} attempt(s): "
                          f"{data['reason']}")
                if not self._evaluate_despite_failed_compress(ctx, env.source, data["task_id"], reason):
                    self._fail(ctx, env.source, data["task_id"], reason)
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
            self._fail(ctx, p.stage.agent, p.task_id, f"stage '{p.stage.label}' passed its deadline of "
                                                      f"{self.config.task_timeout_s:g} s without a reply")

    # -- helpers -----------------------------------------------------------------------------------------------
    def _is_pending(self, task_id: str) -> bool:
        return self.pending is not None and self.pending.task_id == task_id

    def _task_of(self, agent: str) -> str | None:
        return self.pending.task_id if self.pending and self.pending.stage.agent == agent else None

    def _record(self, result: dict[str, Any]) -> None:
        """Keep a completed stage's result for the stages after it."""
        p = self.pending
        name = p.stage.name
        if name == "evaluate" and "evaluate" in self.results:
            # A re-evaluation measures only the new compressed model: the aligned results stay the first attempt's.
            result = {**result, "results": {**self.results["evaluate"].get("results", {}), **result["results"]}}
        if name == "compress":
            # The compressor tries its methods in order and stops at the first its own gate accepts; one that does
            # not say what it tried ran the first.
            methods = (p.params or {}).get("methods") or []
            tried = result.get("tried") or methods[:1]
            self._untried, self._compress_attempt = methods[len(tried):], p.stage.attempt
        self.results[name] = result

    def _gate_rejected_compression(self, ctx: AgentContext, result: dict[str, Any]) -> None:
        """The evaluate stage measured a compressed model past the gate: try the next milder method, or fail."""
        p, comp = self.pending, self.results.get("compress") or {}
        failures = result["gate_failures"]
        rejected = comp.get("method") or "the compressed model"
        self._gate_rejected.append(rejected)
        next_method = self._untried[0] if self._untried else None
        numbers = "; ".join(f["text"] for f in failures)
        verdict = (f"the evaluation gate rejected {rejected}: {numbers}; " +
                   (f"trying {next_method} next" if next_method else "no compression fallback left"))
        ctx.publish("gate.rejected.v1", {"method": rejected, "path": str(comp.get("path")),
                                         "attempt": self._compress_attempt, "failures": failures,
                                         "next_method": next_method, "reason": verdict})
        if next_method is None:
            self._fail(ctx, p.stage.agent, p.task_id, f"gate failed: {numbers} (compression methods rejected by "
                                                      f"the gate: {', '.join(self._gate_rejected)}; no fallback "
                                                      "left)")
            return
        self._record(result)
        self._close_stage(ctx, "rejected", verdict)
        attempt = self._compress_attempt + 1
        self.plan[self._next_index:self._next_index] = [Stage("compress", "compressor", attempt),
                                                         Stage("evaluate", "evaluator", attempt)]
        self._assign_next(ctx)

    def _evaluate_despite_failed_compress(self, ctx: AgentContext, agent: str, task: str, reason: str) -> bool:
        """A first compress task failed: close it, evaluate the aligned model anyway and fail the run after that
        with this failure. False (nothing done) when that does not apply: another stage, a re-compression (the
        aligned model is measured already), or no evaluate stage planned."""
        p = self.pending
        evaluate = [s for s in self.plan[self._next_index:] if s.name == "evaluate"]
        if p.stage.name != "compress" or "evaluate" in self.results or self._deferred or not evaluate:
            return False
        self._deferred = (agent, task, reason)
        self._close_stage(ctx, "failed", reason)
        self.plan[self._next_index:] = evaluate[:1]  # its params name the aligned model only ("compress" has none)
        self._assign_next(ctx)
        return True

    def _assign_next(self, ctx: AgentContext) -> None:
        if self._next_index >= len(self.plan):
            if self._deferred is not None:  # the aligned model is measured; the run still failed
                self._fail(ctx, *self._deferred)
                return
            self.finished = True
            ctx.publish("run.finished.v1", {"status": "succeeded", "error": None})
            return
        stage = self.plan[self._next_index]
        self._next_index += 1
        task_id = f"{stage.name}-{new_id()[:8]}"
        now = self.clock()
        self.pending = _Pending(stage, task_id, now, now + self.config.task_timeout_s)
        ctx.publish("stage.started.v1", {"stage": stage.name, "task_id": task_id, "agent": stage.agent,
                                         "attempt": stage.attempt}, subject=stage.name)
        try:
            params = self.pending.params = self._params_for(stage)
        except (KeyError, TypeError, ValueError) as exc:
            # An earlier stage's result lacks what this stage needs: a bug to report, not a deadline to wait out.
            self._fail(ctx, "coordinator", task_id, f"could not prepare stage '{stage.label}' from earlier results: "
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
                                           "wall_s": round(self.clock() - p.started, 3), "reason": reason,
                                           "attempt": p.stage.attempt}, subject=p.stage.name)
        self.pending = None

    def _fail(self, ctx: AgentContext, agent: str, task: str | None, reason: str) -> None:
        if self.finished:
            return
        self._close_stage(ctx, "failed", reason)
        if self._deferred is not None and (agent, task, reason) != self._deferred:
            # The run failed at compress first; what failed while the aligned model was evaluated comes after.
            first_agent, first_task, first_reason = self._deferred
            agent, task, reason = first_agent, first_task, f"{first_reason}; then {agent} failed too: {reason}"
        self.finished = True
        ctx.publish("run.finished.v1", {"status": "failed", "error": {"agent": agent, "task": task, "reason": reason}})

    def _params_for(self, s: Stage) -> dict[str, Any]:
        """The dynamic inputs of a stage: paths and choices produced by earlier stages (never tensors)."""
        r, stage = self.results, s.name
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
            # The coordinator owns the order: attempt 1 every configured method, a re-run the ones not yet tried.
            methods = [self.config.compress.method, *self.config.compress.fallback] if s.attempt == 1 else self._untried
            return {"model": r["train"]["checkpoint"], "eval_path": r["data"]["eval_path"],
                    "train_path": r["data"]["train_path"], "methods": list(methods), "attempt": s.attempt}
        if stage == "evaluate" and s.attempt > 1:
            return {"models": {"compressed": r["compress"]["path"]}, "eval_path": r["data"]["eval_path"],
                    "eval_kind": r["data"]["eval_kind"], "method": r["select"]["method"], "attempt": s.attempt,
                    "base_results": {**((r.get("evaluate_base") or {}).get("results") or {}),
                                     "aligned": r["evaluate"]["results"]["aligned"]}}
        if stage == "evaluate":
            models = {"aligned": r["train"]["checkpoint"]}
            if "compress" in r:
                models["compressed"] = r["compress"]["path"]
            return {"models": models, "eval_path": r["data"]["eval_path"], "eval_kind": r["data"]["eval_kind"],
                    "method": r["select"]["method"],
                    "base_results": (r.get("evaluate_base") or {}).get("results")}
        raise ValueError(f"no parameters defined for stage {stage!r}")
