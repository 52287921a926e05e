"""Builders of small, fully known event logs for the live view, timeline and report tests.

The numbers here are inputs to the fold (what a run would have logged), not results of any computation."""

from __future__ import annotations

from pathlib import Path

from posttrain.bus.events import make_event
from posttrain.bus.log import EventLog

T0 = 1_000.0
RUN_ID = "run-test"


class Writer:
    """Appends validated events with chosen timestamps, so relative times in assertions are exact."""

    def __init__(self, run_dir: Path, run_id: str = RUN_ID):
        self.run_dir = Path(run_dir)
        self.log = EventLog(self.run_dir / "events.sqlite")
        self.run_id = run_id

    def emit(self, t: float, type: str, source: str, data: dict, target: str | None = None) -> int:
        env = make_event(type, source, self.run_id, data, target=target)
        return self.log.append(env.model_copy(update={"time": T0 + t}))

    def heartbeat(self, t: float, agent: str, state: str, task_id=None, stage=None, step=0, total=None) -> int:
        return self.emit(t, "agent.heartbeat.v1", agent, {"agent": agent, "state": state, "task_id": task_id,
                                                           "progress": {"stage": stage, "step": step,
                                                                        "total": total}})

    def close(self) -> None:
        self.log.close()


def start(w: Writer) -> None:
    w.emit(0.0, "run.started.v1", "coordinator", {"run_dir": str(w.run_dir), "config": {"seed": 1}})
    for i, agent in enumerate(("coordinator", "data", "trainer")):
        w.emit(0.1 + i * 0.01, "agent.started.v1", agent, {"agent": agent, "pid": 42, "thread": agent})
    w.heartbeat(0.5, "coordinator", "idle")
    w.heartbeat(0.5, "trainer", "idle")


def stage(w: Writer, t: float, name: str, agent: str, wall: float, status: str = "succeeded") -> None:
    w.emit(t, "stage.started.v1", "coordinator", {"stage": name, "task_id": f"t-{name}", "agent": agent})
    w.emit(t + 0.01, "task.assigned.v1", "coordinator", {"task_id": f"t-{name}", "stage": name, "params": {}},
           target=agent)
    if status == "succeeded":
        w.emit(t + wall - 0.01, "task.completed.v1", agent, {"task_id": f"t-{name}", "stage": name,
                                                            "result": {"ok": True}}, target="coordinator")
    w.emit(t + wall, "stage.completed.v1", "coordinator", {"stage": name, "task_id": f"t-{name}",
                                                          "status": status, "wall_s": wall,
                                                          "reason": None if status == "succeeded" else "boom"})


LOSS = [2.0, 1.5, 1.2, 1.0]
REWARD = [0.1, 0.2, 0.4, 0.5]
KL = [0.0, 0.01, 0.02, 0.03]


def successful_run(run_dir: Path) -> Path:
    """data -> select -> train (4 steps) -> compress -> evaluate, succeeded at t=20."""
    w = Writer(run_dir)
    start(w)
    stage(w, 1.0, "data", "data", 1.5)
    w.emit(1.2, "data.profiled.v1", "data", {"source": "embedded", "kind": "verifiable", "rows": 100,
                                             "profile": {"duplicates": 0}})
    stage(w, 3.0, "select", "selector", 0.5)
    w.emit(3.2, "method.selected.v1", "selector", {"method": "grpo", "rationale": "verifiable answers",
                                                   "runner_up": "sft"})
    w.emit(3.6, "eval.result.v1", "evaluator", {"model": "base", "metric": "exact_match", "value": 0.3, "n": 50,
                                                "answered": 40, "path": "artifacts/base"})
    w.emit(4.0, "stage.started.v1", "coordinator", {"stage": "train", "task_id": "t-train", "agent": "trainer"})
    w.emit(4.01, "task.assigned.v1", "coordinator", {"task_id": "t-train", "stage": "train", "params": {}},
           target="trainer")
    for i in range(4):
        w.heartbeat(4.5 + i, "trainer", "busy", "t-train", "train", i + 1, 4)
        w.emit(4.6 + i, "train.metrics.v1", "trainer", {"method": "grpo", "step": i + 1, "total_steps": 4,
                                                        "metrics": {"loss": LOSS[i], "reward": REWARD[i],
                                                                    "kl": KL[i], "grad_norm": 1.0}})
    w.emit(8.8, "train.checkpoint.v1", "trainer", {"step": 4, "path": "checkpoints/train"})
    w.emit(9.0, "stage.completed.v1", "coordinator", {"stage": "train", "task_id": "t-train",
                                                      "status": "succeeded", "wall_s": 5.0})
    w.emit(9.5, "agent.health.v1", "watchdog", {"agent": "trainer", "health": "suspect", "reason": "slow beat"})
    stage(w, 10.0, "compress", "compressor", 2.0)
    w.emit(11.5, "compress.result.v1", "compressor", {"method": "int8", "path": "artifacts/int8",
                                                      "size_bytes": 1000, "base_size_bytes": 4000,
                                                      "reload_ok": True})
    stage(w, 13.0, "evaluate", "evaluator", 6.0)
    w.emit(18.0, "eval.result.v1", "evaluator", {"model": "aligned", "metric": "exact_match", "value": 0.5,
                                                 "n": 50, "answered": 50, "path": "artifacts/aligned"})
    w.emit(18.5, "eval.result.v1", "evaluator", {"model": "compressed", "metric": "exact_match", "value": 0.48,
                                                 "n": 50, "answered": 49, "path": "artifacts/compressed"})
    w.heartbeat(19.0, "trainer", "stopped")
    w.emit(20.0, "run.finished.v1", "coordinator", {"status": "succeeded"})
    w.close()
    return Path(run_dir)


def failed_run(run_dir: Path) -> Path:
    """data succeeds, the base is measured, training fails with an out-of-memory error at t=7."""
    w = Writer(run_dir, run_id="run-failed")
    start(w)
    stage(w, 1.0, "data", "data", 1.0)
    w.emit(2.5, "eval.result.v1", "evaluator", {"model": "base", "metric": "exact_match", "value": 0.25,
                                                "n": 40, "path": "artifacts/base"})
    w.emit(3.0, "stage.started.v1", "coordinator", {"stage": "train", "task_id": "t-train", "agent": "trainer"})
    w.emit(6.0, "task.failed.v1", "trainer", {"task_id": "t-train", "stage": "train", "reason": "out of memory",
                                              "error_type": "OutOfMemoryError", "attempts": 3},
           target="coordinator")
    w.emit(6.5, "stage.completed.v1", "coordinator", {"stage": "train", "task_id": "t-train", "status": "failed",
                                                      "wall_s": 3.5, "reason": "out of memory"})
    w.emit(7.0, "run.finished.v1", "coordinator", {"status": "failed", "error": {
        "agent": "trainer", "task": "t-train", "reason": "out of memory after 3 attempts"}})
    w.close()
    return Path(run_dir)


def interrupted_run(run_dir: Path) -> Path:
    """data succeeds; training is at step 2 of 10 when Ctrl-C stops the run at t=6: the runner closes the train
    stage as interrupted (wall 3.0 s from its start at t=3) and finishes the run; the agents' last beats, logged
    as they stop, come after the end."""
    w = Writer(run_dir, run_id="run-interrupted")
    start(w)
    stage(w, 1.0, "data", "data", 1.0)
    w.emit(3.0, "stage.started.v1", "coordinator", {"stage": "train", "task_id": "t-train", "agent": "trainer"})
    w.emit(3.01, "task.assigned.v1", "coordinator", {"task_id": "t-train", "stage": "train", "params": {}},
           target="trainer")
    for i in range(2):
        w.heartbeat(4.0 + i, "trainer", "busy", "t-train", "train", i + 1, 10)
        w.emit(4.1 + i, "train.metrics.v1", "trainer", {"method": "sft", "step": i + 1, "total_steps": 10,
                                                        "metrics": {"loss": LOSS[i]}})
    reason = "interrupted by the user (Ctrl-C) while trainer (t-train) was busy"
    w.emit(6.0, "stage.completed.v1", "runner", {"stage": "train", "task_id": "t-train", "status": "interrupted",
                                                 "wall_s": 3.0, "reason": reason})
    w.emit(6.0, "run.finished.v1", "runner", {"status": "failed", "interrupted": "SIGINT",
                                              "error": {"agent": "runner", "task": None, "reason": reason}})
    w.heartbeat(6.1, "coordinator", "stopped")
    w.heartbeat(6.1, "trainer", "stopped", None, "train", 2, 10)
    w.close()
    return Path(run_dir)
