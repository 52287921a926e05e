"""The compressor agent: compresses the aligned model with the configured method, reloads and measures the artifact,
and falls back to milder methods when the quality gate rejects it.

Thin over `posttrain.compress.api`. Guarantees: calibration uses the run's own training rows and measurement the
held-out rows (their completions; rows without one, e.g. verifiable prompts, on the aligned model's greedy completion,
generated once for every attempt: `compress.measure`); every attempt is published as `compress.result.v1` with its
measured size, perplexity, top-1 agreement and speed, what was scored (`scored_on`, rows, positions), the method's
details (e.g. which implementation ran) and whether the gate accepted it and why; the stage's
result is the first accepted artifact, or the task fails naming every rejected attempt with its numbers. A method
that cannot run or raises (a missing library, bad options, a bug) ends the stage at once as a failed task naming the
method, the exception and every attempt rejected before it (never retried: the same inputs fail the same way); the
traceback of an unexpected exception goes to the log as an error note. Errors do not fall back: a fallback is a
milder setting for a quality gate, not a way to hide a method that does not work.

A reward model is measured on held-out preference pairs (`reward`: score agreement, pairwise accuracy of both); a
gate whose measure does not apply to the artifact (top-1 agreement or perplexity of a reward model) is not applied,
and a warning says so (`evaluate.gate` on the compressed model's reward accuracy still is). Every note the
compression records (what was not measured, a method's fallbacks such as GGUF tensors llama.cpp wrote at another
type) is published as a warning.

The methods tried, in order, are `[compress.method, *compress.fallback]` unless the task names its own
(`params.methods`: the coordinator's re-assignment after the evaluation gate rejected an artifact, the fallbacks not
yet tried); the result's `tried` lists the methods this task ran, the accepted one last.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from ..bus.envelope import Envelope
from ..compress.api import compress, measurement_targets
from ..config import RunConfig
from ._io import read_jsonl
from .runtime import AgentContext, TaskError


def gate_verdict(report: dict[str, Any], min_top1: float | None, max_ppl_ratio: float | None) -> str | None:
    """None when the artifact passes; else the reason, with the numbers. A measure that is None (does not apply,
    see `gates_not_applied`) is not checked."""
    if min_top1 is not None and report["top1_agreement"] is not None and report["top1_agreement"] < min_top1:
        return (f"top-1 agreement {report['top1_agreement']:.4f} over {report['positions']} held-out positions is "
                f"below the required {min_top1:g}")
    if max_ppl_ratio is not None and report["perplexity"] is not None:
        ratio = report["perplexity"] / report["base_perplexity"]
        if ratio > max_ppl_ratio:
            return (f"held-out perplexity {report['perplexity']:.4g} is {ratio:.3f}x the aligned model's "
                    f"{report['base_perplexity']:.4g} (allowed {max_ppl_ratio:g}x)")
    return None


def gates_not_applied(report: dict[str, Any], min_top1: float | None, max_ppl_ratio: float | None) -> list[str]:
    """The configured gates whose measure the artifact's report does not have (None: it does not apply)."""
    return [name for name, limit, key in (("compress.min_top1_agreement", min_top1, "top1_agreement"),
                                          ("compress.max_perplexity_ratio", max_ppl_ratio, "perplexity"))
            if limit is not None and report[key] is None]


class CompressorAgent:
    name = "compressor"
    subscriptions: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)

    def handle(self, env: Envelope, ctx: AgentContext) -> dict[str, Any] | None:
        if env.type != "task.assigned.v1":
            return None
        p, opts = env.data["params"], self.config.compress
        calibration = read_jsonl(p["train_path"], limit=256) if p.get("train_path") else []
        heldout = read_jsonl(p["eval_path"], limit=16) if p.get("eval_path") else []
        if not calibration or not heldout:
            raise TaskError("compression needs the run's training rows (calibration) and held-out rows (measurement)")
        # Every attempt is measured on the same targets; rows without a completion are completed by the aligned
        # model here, once.
        try:
            targets = measurement_targets(p["model"], heldout, opts.heldout_max_new_tokens)
        except ValueError as exc:  # a held-out row that cannot be scored, named by the message
            raise TaskError(f"cannot measure on the held-out rows ({p['eval_path']}): {exc}") from exc
        methods = p.get("methods") or [opts.method, *opts.fallback]
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise TaskError(f"params.methods must be a list of compression method strings, got {methods!r}")
        rejected = []
        for attempt, method in enumerate(methods):
            ctx.progress("compress", attempt, len(methods), method)
            out = self.run_dir / "artifacts" / "compressed" / method.replace(":", "-")
            try:
                report = compress(p["model"], method, out, calibration, heldout=heldout, options=opts.options,
                                  targets=targets)
            except Exception as exc:  # noqa: BLE001 - every failure ends the stage with its reason (see docstring)
                expected = isinstance(exc, (ImportError, NotImplementedError, ValueError))
                if not expected:
                    trace = traceback.format_exc(limit=8)[-3900:]
                    ctx.publish("run.note.v1", {"level": "error", "text": f"compressor: {method} raised:\n{trace}"})
                before = f" (rejected before it: {'; '.join(rejected)})" if rejected else ""
                what = str(exc) if expected else f"{type(exc).__name__}: {exc}"
                raise TaskError(f"{method} failed: {what}{before}") from exc
            for note in report.get("notes") or []:
                ctx.publish("run.note.v1", {"level": "warning", "text": f"{method}: {note}"})
            unchecked = gates_not_applied(report, opts.min_top1_agreement, opts.max_perplexity_ratio)
            if unchecked:
                ctx.publish("run.note.v1", {"level": "warning", "text": (
                    f"{method}: {' and '.join(unchecked)} not applied: the artifact has no such measure; "
                    "evaluate.gate still checks the compressed model")})
            reason = gate_verdict(report, opts.min_top1_agreement, opts.max_perplexity_ratio)
            ctx.publish("compress.result.v1", {
                "method": method, "path": report["artifact"], "size_bytes": report["size_bytes"],
                "base_size_bytes": report["base_size_bytes"], "reload_ok": True,
                "perplexity": report["perplexity"], "base_perplexity": report["base_perplexity"],
                "top1_agreement": report["top1_agreement"], "tokens_per_s": report["tokens_per_s"],
                "tokens_per_s_repeats": report.get("tokens_per_s_repeats"),
                "load_seconds": report["load_seconds"], "runtime": report["runtime"],
                "positions": report["positions"], "scored_on": report["scored_on"],
                "scored_rows": report["scored_rows"], "max_new_tokens": report["max_new_tokens"],
                "details": report.get("details"), "reward": report.get("reward"), "accepted": reason is None,
                "reason": reason},
                dataref=report["artifact"])
            if reason is None:
                ctx.progress("compress", len(methods), len(methods), "done")
                return {"path": report["artifact"], "method": method, "size_bytes": report["size_bytes"],
                        "base_size_bytes": report["base_size_bytes"], "rejected": rejected,
                        "tried": methods[:attempt + 1]}
            rejected.append(f"{method}: {reason}")
        raise TaskError("every compression method was rejected by the gate: " + "; ".join(rejected))
