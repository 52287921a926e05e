"""The event types of the bus and their payload models: the data contract between agents.

Guarantees: `make_event` and `Bus.publish` validate `data` against the model registered here for the event type
(unknown types and malformed payloads are refused before anything is logged). Payload models are the single place
a reader (live view, report, resume) learns what an event carries.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .envelope import Envelope


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(Payload):
    agent: str
    task: str | None = None
    reason: str


class RunStarted(Payload):
    run_dir: str
    config: dict[str, Any]


class RunFinished(Payload):
    status: Literal["succeeded", "failed"]
    error: ErrorInfo | None = None
    interrupted: Literal["SIGINT", "SIGTERM"] | None = None  # set when the run was stopped from outside (Ctrl-C)


class StageStarted(Payload):
    stage: str
    task_id: str
    agent: str
    attempt: int = 1  # > 1: the stage runs again (compress and evaluate after the evaluation gate rejected a method)


class StageCompleted(Payload):
    stage: str
    task_id: str
    # rejected: measured, but the gate said no; interrupted: the run was stopped (Ctrl-C, SIGTERM) mid-stage
    status: Literal["succeeded", "failed", "skipped", "rejected", "interrupted"]
    wall_s: float
    reason: str | None = None
    attempt: int = 1


class AgentStarted(Payload):
    agent: str
    pid: int
    thread: str


class AgentStopped(Payload):
    agent: str
    reason: str


class Progress(Payload):
    stage: str | None = None
    step: int = 0
    total: int | None = None
    note: str | None = None


class Heartbeat(Payload):
    agent: str
    state: Literal["starting", "idle", "busy", "stopped"]
    task_id: str | None = None
    progress: Progress


class AgentHealth(Payload):
    agent: str
    health: Literal["healthy", "suspect", "unhealthy"]
    reason: str
    task_id: str | None = None


class TaskAssigned(Payload):
    task_id: str
    stage: str
    params: dict[str, Any]
    deadline_s: float | None = None


class TaskCompleted(Payload):
    task_id: str
    stage: str
    result: dict[str, Any]


class TaskFailed(Payload):
    task_id: str
    stage: str
    reason: str
    error_type: str
    attempts: int


class DeadLettered(Payload):
    event_id: str
    event_type: str
    agent: str
    attempts: int
    reason: str


class DataProfiled(Payload):
    source: str
    kind: str
    rows: int
    profile: dict[str, Any]


class MethodSelected(Payload):
    method: str
    rationale: str
    runner_up: str | None = None
    explicit: bool = False


class TrainMetrics(Payload):
    method: str
    step: int
    total_steps: int
    metrics: dict[str, float]


class CheckpointSaved(Payload):
    step: int
    path: str
    size_bytes: int | None = None  # bytes of the checkpoint's weight files


class EvalResult(Payload):
    model: str  # "base" | "aligned" | "compressed"
    metric: str
    value: float
    n: int
    path: str
    samples_path: str | None = None
    dropped: dict[str, int] | None = None  # held-out rows not scored (e.g. emptied by truncation), by reason
    benchmark: str | None = None  # a standard benchmark (mmlu, gsm8k, ...); None: the run's own held-out data
    ci_low: float | None = None
    ci_high: float | None = None
    answered: int | None = None  # exact match: outputs with an answer the verifier can read (a "#### N" line)


class CompressResult(Payload):
    method: str
    path: str
    size_bytes: int
    base_size_bytes: int
    reload_ok: bool
    max_abs_logit_diff: float | None = None  # measured on a probe batch, reloaded artifact vs original
    perplexity: float | None = None
    base_perplexity: float | None = None
    top1_agreement: float | None = None
    tokens_per_s: float | None = None  # the median of the timed runs (compress.measure)
    tokens_per_s_repeats: list[float] | None = None  # each timed run's tokens/s, in the order they ran
    load_seconds: float | None = None
    runtime: str | None = None
    positions: int | None = None  # held-out tokens scored for perplexity and top-1 agreement
    scored_on: str | None = None  # completions | aligned_greedy_completions | mixed (compress.measure)
    scored_rows: dict[str, int] | None = None  # rows scored per source
    max_new_tokens: int | None = None  # cap of the aligned model's greedy completions, when it made any
    details: dict[str, Any] | None = None  # the method's own record, e.g. {"implementation": "llm-compressor"}
    reward: dict[str, Any] | None = None  # a reward model's score agreement on held-out pairs (compress.measure)
    accepted: bool = True  # False: the compression gate rejected it and a milder method was tried
    reason: str | None = None


class GateFailure(Payload):
    """One metric past its allowed drop between two models (`evaluate.gate`)."""
    metric: str  # the gate's key: "task" (the run's own held-out metric) or "benchmark/metric"
    before: str  # "base" | "aligned"
    after: str   # "aligned" | "compressed"
    before_value: float
    before_n: int
    after_value: float
    after_n: int
    drop: float
    allowed: float
    text: str  # the same, in one sentence


class GateRejected(Payload):
    """The coordinator's verdict on a compressed model the evaluation gate rejected: the next milder compression
    method it assigns, or none left (the run fails)."""
    method: str  # the compression method whose artifact was rejected
    path: str
    attempt: int  # of the compress stage that produced it
    failures: list[GateFailure]
    next_method: str | None = None  # None: no fallback left, the run fails
    reason: str


class Note(Payload):
    level: Literal["info", "warning", "error"]
    text: str


EVENT_TYPES: dict[str, type[Payload]] = {
    "run.started.v1": RunStarted,
    "run.finished.v1": RunFinished,
    "stage.started.v1": StageStarted,
    "stage.completed.v1": StageCompleted,
    "agent.started.v1": AgentStarted,
    "agent.stopped.v1": AgentStopped,
    "agent.heartbeat.v1": Heartbeat,
    "agent.health.v1": AgentHealth,
    "task.assigned.v1": TaskAssigned,
    "task.completed.v1": TaskCompleted,
    "task.failed.v1": TaskFailed,
    "event.deadlettered.v1": DeadLettered,
    "data.profiled.v1": DataProfiled,
    "method.selected.v1": MethodSelected,
    "train.metrics.v1": TrainMetrics,
    "train.checkpoint.v1": CheckpointSaved,
    "eval.result.v1": EvalResult,
    "compress.result.v1": CompressResult,
    "gate.rejected.v1": GateRejected,
    "run.note.v1": Note,
}


def validate_payload(type: str, data: dict[str, Any]) -> dict[str, Any]:
    """Return `data` normalised by its payload model; raise ValueError for unknown types or bad payloads."""
    model = EVENT_TYPES.get(type)
    if model is None:
        raise ValueError(f"unknown event type {type!r}; register it in posttrain.bus.events.EVENT_TYPES")
    return model.model_validate(data).model_dump(mode="json")


def make_event(type: str, source: str, run_id: str, data: Payload | dict[str, Any], *, topic: str | None = None,
               target: str | None = None, subject: str | None = None, correlation_id: str | None = None,
               causation_id: str | None = None, dataref: str | None = None) -> Envelope:
    """Build a validated envelope. The topic defaults to the type's first segment (``task``, ``train``...)."""
    raw = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    return Envelope(type=type, source=source, target=target, topic=topic or type.split(".")[0], subject=subject,
                    run_id=run_id, correlation_id=correlation_id, causation_id=causation_id,
                    data=validate_payload(type, raw), dataref=dataref)
