"""The fold: what a run's log says about agents, stages, messages, curves and results."""

from posttrain.bus.log import read_events
from posttrain.live.state import RunState, summarize

from runlogs import KL, LOSS, REWARD, RUN_ID, T0, failed_run, successful_run


def test_fold_of_a_successful_run(tmp_path):
    events = read_events(successful_run(tmp_path / "r") / "events.sqlite")
    s = RunState.from_events(events)
    assert s.run_id == RUN_ID and s.status == "succeeded" and s.error is None
    assert s.started_at == T0 and s.finished_at == T0 + 20.0 and s.elapsed() == 20.0
    assert list(s.stages) == ["data", "select", "train", "compress", "evaluate"]
    assert [(x.status, x.wall_s) for x in s.stages.values()] == [
        ("succeeded", 1.5), ("succeeded", 0.5), ("succeeded", 5.0), ("succeeded", 2.0), ("succeeded", 6.0)]
    assert [p for p in s.curves["loss"]] == [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.0)]
    assert [v for _, v in s.curves["reward"]] == REWARD and [v for _, v in s.curves["kl"]] == KL
    assert [v for _, v in s.curves["grad_norm"]] == [1.0] * 4
    assert s.train_events == 4 and s.train_total_steps == 4 and s.train_method == "grpo"
    assert s.method == {"method": "grpo", "rationale": "verifiable answers", "runner_up": "sft", "explicit": False}
    assert s.data_profile["kind"] == "verifiable" and s.data_profile["rows"] == 100
    assert s.eval_for("base")["value"] == 0.3 and s.eval_for("compressed")["value"] == 0.48
    assert s.compress[0]["size_bytes"] == 1000
    assert s.agents["data"].task_id is None  # cleared by its task.completed
    assert len(s.checkpoints) == 1


def test_agents_from_heartbeats_health_and_assignments(tmp_path):
    s = RunState.from_events(read_events(successful_run(tmp_path / "r") / "events.sqlite"))
    assert set(s.agents) >= {"coordinator", "data", "trainer", "selector", "compressor", "evaluator"}
    trainer = s.agents["trainer"]
    assert trainer.state == "stopped"  # the last heartbeat said so
    assert trainer.health == "suspect" and trainer.health_reason == "slow beat"
    assert trainer.last_heartbeat == T0 + 19.0
    assert trainer.task_stage is None and trainer.task_id is None  # the stopped beat carries no task
    assert s.agents["coordinator"].state == "idle"


def test_progress_mid_training(tmp_path):
    events = read_events(successful_run(tmp_path / "r") / "events.sqlite")
    cut = next(i for i, e in enumerate(events) if e.envelope.type == "train.metrics.v1"
               and e.envelope.data["step"] == 2)
    s = RunState.from_events(events[:cut + 1])
    t = s.agents["trainer"]
    assert (t.state, t.task_id, t.stage, t.step, t.total) == ("busy", "t-train", "train", 2, 4)
    assert s.status == "running" and not s.finished
    assert s.stages["train"].status == "running" and s.stages["train"].wall_s is None
    assert [v for _, v in s.curves["loss"]] == LOSS[:2]


def test_messages_skip_heartbeats_and_keep_the_last_n(tmp_path):
    events = read_events(successful_run(tmp_path / "r") / "events.sqlite")
    s = RunState.from_events(events, max_messages=5)
    assert len(s.messages) == 5
    assert all(m.type != "agent.heartbeat.v1" for m in s.messages)
    assert s.messages[-1].type == "run.finished.v1" and s.messages[-1].seq == events[-1].seq
    full = RunState.from_events(events)
    beats = sum(e.envelope.type == "agent.heartbeat.v1" for e in events)
    assert len(full.messages) == len(events) - beats


def test_reapplying_an_event_changes_nothing(tmp_path):
    events = read_events(successful_run(tmp_path / "r") / "events.sqlite")
    s = RunState.from_events(events)
    assert not any(s.apply(e) for e in events)
    assert len(s.curves["loss"]) == 4 and s.train_events == 4


def test_failed_run_error_and_failures(tmp_path):
    s = RunState.from_events(read_events(failed_run(tmp_path / "f") / "events.sqlite"))
    assert s.status == "failed"
    assert s.error == {"agent": "trainer", "task": "t-train", "reason": "out of memory after 3 attempts"}
    assert s.failures[0]["agent"] == "trainer" and s.failures[0]["error_type"] == "OutOfMemoryError"
    assert s.stages["train"].status == "failed" and s.stages["train"].reason == "out of memory"


def test_summaries_are_short_key_fields():
    assert summarize("task.assigned.v1", {"task_id": "x", "stage": "train", "params": {"a": 1}}) == "stage=train"
    assert summarize("train.metrics.v1", {"method": "sft", "step": 3, "total_steps": 10,
                                          "metrics": {"loss": 0.5}}) == "step=3/10  loss=0.5"
    assert summarize("compress.result.v1", {"method": "int8", "path": "p", "size_bytes": 1024,
                                            "base_size_bytes": 4096, "reload_ok": True}) == \
        "method=int8  size=1.0KB  ratio=0.25  reload_ok=True"
    long = summarize("task.failed.v1", {"stage": "t", "reason": "x" * 300, "task_id": "a", "error_type": "E",
                                        "attempts": 1})
    assert len(long) < 100 and "…" in long
    assert summarize("train.checkpoint.v1", {"step": 1, "path": "/a" * 40 + "/ckpt"}).endswith("/a/ckpt")
    assert summarize("future.thing.v2", {"a": 1, "b": {"nested": 1}}) == "a=1"
