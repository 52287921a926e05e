"""The coordinator ends the run with a clear reason when an agent hangs, crashes, dies or keeps failing —
within a bounded time, with every event up to that point in the log. Stage agents are stand-ins here (no models):
these tests are about orchestration, and the stand-ins carry paths only, no measurements."""

import threading
import time

import pytest

from posttrain.agents.coordinator import Coordinator
from posttrain.bus.log import read_events
from posttrain.config import RunConfig
from posttrain.run import execute

OUTPUTS = {
    "data": {"kind": "verifiable", "profile": {}, "model": "stand-in", "train_path": "t.jsonl",
             "eval_path": "e.jsonl", "eval_kind": "verifiable"},
    "selector": {"method": "grpo"},
    "trainer": {"checkpoint": "ckpt"},
    "compressor": {"path": "compressed"},
    "evaluator": {},
}


class StandIn:
    subscriptions = ()

    def __init__(self, name):
        self.name = name
        self.tasks = 0

    def handle(self, env, ctx):
        if env.type == "task.assigned.v1":
            self.tasks += 1
            return OUTPUTS[self.name]


class Hangs(StandIn):
    """Blocks its own thread (not an await): only a watchdog on another thread can notice."""

    def handle(self, env, ctx):
        if env.type == "task.assigned.v1":
            ctx.progress("train", 1, 10)
            threading.Event().wait(60)


class Crashes(StandIn):
    def handle(self, env, ctx):
        if env.type == "task.assigned.v1":
            self.tasks += 1
            raise RuntimeError("boom: CUDA out of memory (simulated fault for the test)")


class Raises(StandIn):
    """Raises the given error on its task, counting attempts."""

    def __init__(self, name, error):
        super().__init__(name)
        self.error = error

    def handle(self, env, ctx):
        if env.type == "task.assigned.v1":
            self.tasks += 1
            raise self.error


class Dies(StandIn):
    def handle(self, env, ctx):
        if env.type == "task.assigned.v1":
            raise SystemExit("the trainer's thread exits")


def _config(tmp_path, **health):
    opts = {"heartbeat_s": 0.05, "suspect_after_s": 0.5, "dead_after_s": 1.0, "stall_after_s": 0.6,
            "check_every_s": 0.05, "max_attempts": 3, "retry_backoff_s": 0.01}
    opts.update(health)
    return RunConfig(runs_dir=str(tmp_path), health=opts, run_timeout_s=30)


def _cast(config, trainer):
    cast = {name: StandIn(name) for name in OUTPUTS}
    cast["trainer"] = trainer
    return {"coordinator": Coordinator(config), **cast}


def _run(tmp_path, trainer, **health):
    config = _config(tmp_path, **health)
    started = time.monotonic()
    outcome = execute(config, view="quiet", agents=_cast(config, trainer))
    return outcome, time.monotonic() - started


def _types(run_dir):
    return [e.envelope.type for e in read_events(run_dir / "events.sqlite")]


STAGES = ["data", "select", "evaluate_base", "train", "compress", "evaluate"]


def _check_log_up_to_failure(outcome, agent="trainer", stage="train"):
    """The whole story of a failed run is in its log: seq numbers 1..N with no gap, every assignment of the stages
    before the failure closed by exactly one completion (and nothing assigned after the failing stage), the failing
    stage closed as failed, and run.finished.v1 the last event except the agents' own heartbeats as they stop,
    naming the agent and the task. Returns the error the log holds (the report must say the same)."""
    logged = list(read_events(outcome.run_dir / "events.sqlite"))
    assert [e.seq for e in logged] == list(range(1, len(logged) + 1))
    events = [e.envelope for e in logged]
    types = [e.type for e in events]
    assert types.count("run.finished.v1") == 1
    end = types.index("run.finished.v1")
    assert set(types[end + 1:]) <= {"agent.heartbeat.v1"}, types[end + 1:]
    assigned = [e for e in events if e.type == "task.assigned.v1"]
    assert [a.data["stage"] for a in assigned] == STAGES[:STAGES.index(stage) + 1]
    assert [e.data["stage"] for e in events if e.type == "stage.started.v1"] == STAGES[:STAGES.index(stage) + 1]
    failing = assigned[-1]
    for a in assigned[:-1]:
        replies = [(i, e) for i, e in enumerate(events) if e.type in ("task.completed.v1", "task.failed.v1")
                   and e.correlation_id == a.correlation_id and e.causation_id == a.id]
        assert len(replies) == 1 and replies[0][1].type == "task.completed.v1", a.data["stage"]
        assert replies[0][0] < events.index(failing)
    assert failing.target == agent
    # The failing task never completes: a crash is answered by one task.failed, a hang or a death by nothing.
    answers = [e.type for e in events if e.type in ("task.completed.v1", "task.failed.v1")
               and e.correlation_id == failing.correlation_id and e.causation_id == failing.id]
    assert answers in ([], ["task.failed.v1"]), answers
    closed = [e for e in events if e.type == "stage.completed.v1" and e.data["task_id"] == failing.data["task_id"]]
    assert len(closed) == 1 and closed[0].data["status"] == "failed" and events.index(closed[0]) < end
    finished = events[end]
    err = finished.data["error"]
    assert finished.data["status"] == "failed" and finished.source == "coordinator"
    assert err["agent"] == agent and err["task"] == failing.data["task_id"] and err["reason"]
    assert closed[0].data["reason"] == err["reason"]
    assert outcome.report["error"] == err
    return err


def test_successful_run_stage_order_and_one_completion_per_assignment(tmp_path):
    outcome, _ = _run(tmp_path, StandIn("trainer"))
    assert outcome.status == "succeeded"
    events = [e.envelope for e in read_events(outcome.run_dir / "events.sqlite")]
    stages = [e.data["stage"] for e in events if e.type == "stage.started.v1"]
    assert stages == ["data", "select", "evaluate_base", "train", "compress", "evaluate"]
    assigned = [e for e in events if e.type == "task.assigned.v1"]
    for a in assigned:
        replies = [e for e in events if e.type in ("task.completed.v1", "task.failed.v1")
                   and e.correlation_id == a.correlation_id and e.causation_id == a.id]
        assert len(replies) == 1 and replies[0].type == "task.completed.v1"
    assert _types(outcome.run_dir).count("run.finished.v1") == 1


@pytest.mark.parametrize("trainer", [StandIn("trainer"), Crashes("trainer")], ids=["succeeded", "failed"])
def test_a_finished_run_folder_holds_its_log_as_one_file(tmp_path, trainer, capsys):
    # Regression: events.sqlite-wal and -shm were left next to events.sqlite (made again by the report's read-only
    # reader after the writer had removed them); reading the run afterwards must not make them either.
    from posttrain.cli import main

    outcome, _ = _run(tmp_path, trainer, max_attempts=1)
    assert outcome.status == ("succeeded" if type(trainer) is StandIn else "failed")
    logs = lambda: sorted(p.name for p in outcome.run_dir.iterdir() if p.name.startswith("events"))  # noqa: E731
    assert logs() == ["events.sqlite"]
    assert main(["show", str(outcome.run_dir)]) == 0 and main(["runs", "--runs-dir", str(tmp_path)]) == 0
    assert logs() == ["events.sqlite"]


def test_hung_agent_ends_the_run_with_a_clear_reason(tmp_path):
    outcome, wall = _run(tmp_path, Hangs("trainer"))
    assert outcome.status == "failed"
    err = _check_log_up_to_failure(outcome)
    assert err["task"].startswith("train-") and f"busy on task {err['task']}" in err["reason"]
    assert "no progress" in err["reason"] and "hung" in err["reason"]
    assert wall < 15
    types = _types(outcome.run_dir)
    assert "task.assigned.v1" in types and "agent.health.v1" in types and types.count("run.finished.v1") == 1
    stages = {s["name"]: s["status"] for s in outcome.report["stages"]}
    assert stages["train"] == "failed" and "compress" not in stages


def test_crashing_agent_is_retried_then_the_run_fails_naming_it(tmp_path):
    crasher = Crashes("trainer")
    outcome, wall = _run(tmp_path, crasher)
    assert outcome.status == "failed" and crasher.tasks == 3
    err = _check_log_up_to_failure(outcome)
    assert "stage 'train' failed after 3 attempt(s)" in err["reason"] and "RuntimeError: boom" in err["reason"]
    types = _types(outcome.run_dir)
    assert "event.deadlettered.v1" in types and types.count("task.failed.v1") == 1
    assert wall < 15


def _validation_error():
    from pydantic import BaseModel, ValidationError

    class M(BaseModel):
        n: int

    try:
        M(n="x")
    except ValidationError as exc:
        return exc


def _permanent_errors():
    from posttrain.data.errors import DataError
    from posttrain.models.loading import ModelSourceError

    return [ValueError("unknown benchmark 'mmluu'"), TypeError("bad argument"), KeyError("prompt"),
            FileNotFoundError("no such file: t.jsonl"), NotADirectoryError("x is not a directory"),
            ImportError("no module named llmcompressor"), NotImplementedError("not for this model"),
            DataError("t.jsonl", 3, "prompt", "a non-empty prompt", "null"), _validation_error(),
            ModelSourceError("not a local path and the hub is offline (HF_HUB_OFFLINE is set) with no cached copy: "
                             "org/name")]


@pytest.mark.parametrize("error", _permanent_errors(), ids=lambda e: type(e).__name__)
def test_deterministic_errors_are_attempted_once(tmp_path, error):
    raiser = Raises("trainer", error)
    outcome, _ = _run(tmp_path, raiser)
    assert outcome.status == "failed" and raiser.tasks == 1
    err = _check_log_up_to_failure(outcome)
    assert f"stage 'train' failed after 1 attempt(s): {type(error).__name__}: " in err["reason"]
    failed = [e for e in read_events(outcome.run_dir / "events.sqlite") if e.envelope.type == "task.failed.v1"]
    assert [f.envelope.data["attempts"] for f in failed] == [1]


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: unspecified launch failure"),
                                   OSError("[Errno 16] Device or resource busy"), TimeoutError("read timed out")],
                         ids=lambda e: type(e).__name__)
def test_transient_errors_are_retried_up_to_max_attempts(tmp_path, error):
    raiser = Raises("trainer", error)
    outcome, _ = _run(tmp_path, raiser, max_attempts=4)
    assert outcome.status == "failed" and raiser.tasks == 4
    err = _check_log_up_to_failure(outcome)
    assert f"stage 'train' failed after 4 attempt(s): {type(error).__name__}: " in err["reason"]


def test_agent_whose_thread_dies_ends_the_run(tmp_path):
    outcome, wall = _run(tmp_path, Dies("trainer"))
    assert outcome.status == "failed"
    err = _check_log_up_to_failure(outcome)
    assert "thread died" in err["reason"] and "SystemExit" in err["reason"]
    assert wall < 15


def test_task_deadline_fails_the_run(tmp_path):
    config = _config(tmp_path, stall_after_s=100)
    config = config.model_copy(update={"task_timeout_s": 0.5})
    outcome = execute(config, view="quiet", agents=_cast(config, Hangs("trainer")))
    assert outcome.status == "failed"
    err = _check_log_up_to_failure(outcome)
    assert "stage 'train' passed its deadline of 0.5 s without a reply" in err["reason"]


def test_gate_failures_name_the_metric_and_the_numbers():
    from posttrain.agents.evaluator import gate_failures

    results = {"base": {"task": {"value": 0.40, "n": 200}}, "aligned": {"task": {"value": 0.45, "n": 200}},
               "compressed": {"task": {"value": 0.30, "n": 200}}}
    assert gate_failures({"task": 0.2}, results) == []
    failures = gate_failures({"task": 0.1}, results)
    assert failures == ["task dropped from 0.4500 (aligned, n=200) to 0.3000 (compressed, n=200), by 0.1500 > "
                        "the allowed 0.1"]
