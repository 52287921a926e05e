"""The run report (report.json + report.md), built from the run's event log alone.

Guarantees:
- the only input is `run_dir/events.sqlite` (and the run directory's name as a fallback run id): a report can be
  rebuilt at any time from the log, and says nothing the log does not support;
- a quantity that was never measured is `null` in JSON and "not measured" in Markdown, never a number;
- `status` is "succeeded" or "failed"; `interrupted` is true when the run was stopped from outside (Ctrl-C or
  SIGTERM: then status is "failed", the error's reason says so and the stage it stopped reads "interrupted",
  with its wall time up to the interrupt). A log without ``run.finished.v1`` (a crashed or still-running run) reports
  "failed" with an error saying the run did not finish, because its results are incomplete;
- `stages` are listed in the order they started (a skipped stage that never started sits where it was decided);
  a stage run again after the evaluation gate rejected a compressed model is `compress#2`, `evaluate#2`, ... after
  the earlier attempts, whose evaluate reads status "rejected";
- the accuracies are each model's last measurement: after a gate fallback, `compressed` is the kept artifact's.
- the rows data preparation dropped are said in report.md's Data section, per reason, as the data profile in the
  log records them (`data.profile.dropped`, and `eval_dropped` for separate evaluation data); report.md is also
  what `posttrain run` and `posttrain demo` print at the end of a run.

report.json keys: run_id, status, interrupted, method, rationale, runner_up, accuracy {base, aligned, compressed}
each {value, n, metric, answered (exact match: how many outputs had an answer the verifier reads, right or wrong;
null for other metrics)} or null, sizes_bytes {aligned, compressed}, stages [{name, status, wall_s}], error
{agent, task, reason} or null, data, training {method, steps, total_steps, last_step, metrics {name: {first, final,
min, max, nonfinite}}}, compression {method, path, reload_ok, size_bytes, base_size_bytes, ratio,
perplexity, base_perplexity, top1_agreement, tokens_per_s (the median of the timed runs), tokens_per_s_repeats
(each timed run's), load_seconds, runtime, positions, scored_on
(what the held-out positions are: completions | aligned_greedy_completions | mixed), scored_rows {source: rows},
max_new_tokens (cap of the aligned model's greedy completions) (each null when not measured),
details (the method's own record, e.g. implementation; null when none), reward (a reward model's score agreement
on held-out pairs: pairs, pairwise_accuracy, base_pairwise_accuracy, preference_agreement, mean_abs_score_diff,
max_abs_score_diff; null otherwise), rejected [{method, reason}] (by the
compressor's own gate)} or null, gate_rejections [{method, path, attempt, failures [{metric, before, after,
before_value, before_n, after_value, after_n, drop, allowed, text}], next_method (null: none left), reason}] (the
evaluation gate's verdicts on compressed models, in order), evals (every eval result), started_at, wall_s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from posttrain.bus.log import read_events
from posttrain.live.state import RunState, finite, fmt_bytes, metric_order

MODELS = ("base", "aligned", "compressed")
NOT_MEASURED = "not measured"


def load_state(run_dir: str | Path) -> RunState:
    """Fold a run's whole log. Raises FileNotFoundError naming the path when the run has no log."""
    run_dir = Path(run_dir)
    # Keep every message: `show` prints the whole timeline from the same fold.
    return RunState.from_events(read_events(run_dir / "events.sqlite"), max_messages=1_000_000)


def _json_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _training(state: RunState) -> dict[str, Any] | None:
    if not state.curves:
        return None
    metrics = {}
    for name in metric_order(state.curves):  # loss, reward, kl first: what a reader looks for
        points = state.curves[name]
        ok = finite(v for _, v in points)
        # JSON has no NaN: a non-finite value becomes null and is counted, so a divergence stays visible.
        metrics[name] = {"first": _json_float(points[0][1]), "final": _json_float(points[-1][1]),
                         "min": min(ok) if ok else None, "max": max(ok) if ok else None,
                         "nonfinite": len(points) - len(ok)}
    last_step = max(step for points in state.curves.values() for step, _ in points)
    return {"method": state.train_method, "steps": state.train_events, "total_steps": state.train_total_steps,
            "last_step": last_step, "metrics": metrics}


def _checkpoint_size(state) -> int | None:
    sizes = [c.get("size_bytes") for c in state.checkpoints if c.get("size_bytes") is not None]
    return sizes[-1] if sizes else None


def _error(state: RunState) -> dict[str, Any] | None:
    if state.status == "succeeded":
        return None
    if state.error:
        return {"agent": state.error.get("agent"), "task": state.error.get("task"),
                "reason": state.error.get("reason")}
    if state.status == "failed":
        return {"agent": None, "task": None, "reason": "the run failed without recording a reason"}
    last = state.failures[-1] if state.failures else None
    reason = "the run did not finish: the log has no run.finished.v1 event (crashed, killed, or still running)"
    if last:
        reason += f"; last failure: {last.get('reason')}"
    return {"agent": last.get("agent") if last else None, "task": last.get("task_id") if last else None,
            "reason": reason}


def build_report(run_dir: str | Path, state: RunState | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module docstring for the keys). `state`, when given, must be the
    fold of this run's whole log (callers that already folded it save a second read)."""
    run_dir = Path(run_dir)
    state = load_state(run_dir) if state is None else state
    accuracy = {}
    for model in MODELS:
        r = state.eval_for(model)
        accuracy[model] = {"value": r["value"], "n": r["n"], "metric": r["metric"],
                           "answered": r.get("answered")} if r else None
    accepted = [c for c in state.compress if c.get("accepted", True)]
    comp = accepted[-1] if accepted else None  # the artifact the pipeline kept (rejected attempts are listed apart)
    compression = None
    if comp:
        base = comp.get("base_size_bytes")
        compression = {"method": comp.get("method"), "path": comp.get("path"), "reload_ok": comp.get("reload_ok"),
                       "size_bytes": comp.get("size_bytes"), "base_size_bytes": base,
                       "ratio": comp["size_bytes"] / base if base else None,
                       **{k: comp.get(k) for k in ("perplexity", "base_perplexity", "top1_agreement", "tokens_per_s",
                                                   "tokens_per_s_repeats", "load_seconds", "runtime", "positions",
                                                   "scored_on", "scored_rows", "max_new_tokens", "details",
                                                   "reward")},
                       "rejected": [{"method": c.get("method"), "reason": c.get("reason")}
                                    for c in state.compress if not c.get("accepted", True)]}
    method = state.method or {}
    return {
        "run_id": state.run_id or run_dir.name,
        "status": "succeeded" if state.status == "succeeded" else "failed",
        "interrupted": state.interrupted is not None,
        "method": method.get("method"),
        "rationale": method.get("rationale"),
        "runner_up": method.get("runner_up"),
        "accuracy": accuracy,
        # The aligned size: the compressor's measurement of its input, else the trainer's of its checkpoint.
        "sizes_bytes": {"aligned": comp.get("base_size_bytes") if comp else _checkpoint_size(state),
                        "compressed": comp.get("size_bytes") if comp else None},
        "stages": [{"name": s.name, "status": s.status, "wall_s": s.wall_s} for s in state.stages.values()],
        "error": _error(state),
        "data": state.data_profile,
        "training": _training(state),
        "compression": compression,
        "gate_rejections": [dict(g) for g in state.gate_rejections],
        "evals": state.evals,
        "notes": [{"source": n.get("source"), "level": n.get("level"), "text": n.get("text")} for n in state.notes
                  if n.get("level") in ("info", "warning")],
        "benchmarks": {key: {model: {"value": r["value"], "n": r["n"], "ci_low": r.get("ci_low"),
                                     "ci_high": r.get("ci_high")} for model, r in per_model.items()}
                       for key, per_model in state.benchmark_results().items()},
        "started_at": state.started_at,
        "wall_s": state.elapsed() if state.started_at is not None else None,
    }


def _acc(entry: dict[str, Any] | None) -> str:
    return NOT_MEASURED if entry is None else f"{entry['value']:.3f}"


def _with_interval(entry: dict[str, Any] | None) -> str:
    """A benchmark cell: the value and its 95% interval; a result logged without one (see evaluate.stats) says so."""
    if not entry:
        return NOT_MEASURED
    if entry.get("ci_low") is None or entry.get("ci_high") is None:
        return f"{entry['value']:.3f} (no interval)"
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def _benchmark_n(per_model: dict[str, Any]) -> str:
    # One n when every measured model has it; otherwise each model's (MT-Bench counts only the parsed judgments).
    ns = [per_model[m]["n"] if per_model.get(m) else None for m in MODELS]
    measured = {n for n in ns if n is not None}
    if len(measured) == 1:
        return str(measured.pop())
    return " / ".join("-" if n is None else str(n) for n in ns)


def _num(v: Any, fmt: str = "{:.4g}") -> str:
    return NOT_MEASURED if v is None else fmt.format(v)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md from the dict `build_report` returns: what a person reads after a run."""
    r = report
    lines = [f"# Run `{r['run_id']}`: {r['status']}", ""]
    if r.get("wall_s") is not None:
        lines += [f"Total wall time: {r['wall_s']:.1f} s", ""]
    if r.get("error"):
        e = r["error"]
        lines += ["## Error", "", f"- agent: `{e.get('agent') or 'unknown'}`", f"- task: `{e.get('task') or '-'}`",
                  f"- reason: {e.get('reason')}", ""]
    lines += ["## Method", ""]
    if r.get("method"):
        lines += [f"**{r['method']}**" + (f" (runner-up: {r['runner_up']})" if r.get("runner_up") else ""), "",
                  f"Why: {r.get('rationale') or 'no rationale recorded'}", ""]
    else:
        lines += ["No method was selected.", ""]
    if r.get("data"):
        d = r["data"]
        profile = d.get("profile") or {}
        # Where the evaluation rows came from (a hold-out of this file, another file, the task's test split), so
        # the counts add up: rows read = training rows + evaluation rows + dropped ones.
        held = []
        if profile.get("eval_rows") is not None:
            src = profile.get("eval_source")
            held = [f"- evaluation rows: {profile['eval_rows']}" + (f" from `{src}`" if src else "")]
        lines += ["## Data", "", f"- source: `{d.get('source')}`", f"- kind: {d.get('kind')}",
                  f"- rows: {d.get('rows')}" + (" for training" if held else ""), *held, *_dropped_lines(profile),
                  ""]
    lines += ["## Accuracy", "", "| model | accuracy | n | metric | answered |", "|---|---|---|---|---|"]
    for model in MODELS:
        a = r["accuracy"].get(model)
        answered = a.get("answered") if a else None
        lines.append(f"| {model} | {_acc(a)} | {a['n'] if a else '-'} | {a['metric'] if a else '-'} | "
                     f"{'-' if answered is None else answered} |")
    chain = " → ".join(_acc(r["accuracy"].get(m)) for m in MODELS)
    lines += ["", f"base → aligned → compressed: {chain}", ""]
    if any((r["accuracy"].get(m) or {}).get("metric") == "token_accuracy" for m in MODELS):
        lines += ["token_accuracy: the share of held-out completion tokens predicted right (teacher-forced); its n "
                  "counts tokens, not rows.", ""]
    if any((r["accuracy"].get(m) or {}).get("answered") is not None for m in MODELS):
        lines += ["answered: outputs whose final answer the verifier could read (a `#### N` line), right or wrong; "
                  "an output without one scores 0 whatever its working says.", ""]
    if r.get("benchmarks"):
        lines += ["## Benchmarks", "", "| benchmark / metric | base [95% CI] | aligned [95% CI] | compressed [95% CI] "
                  "| n |", "|---|---|---|---|---|"]
        for key, per_model in r["benchmarks"].items():
            cells = [_with_interval(per_model.get(m)) for m in MODELS]
            lines.append(f"| {key} | {' | '.join(cells)} | {_benchmark_n(per_model)} |")
        lines.append("")
    sizes = r["sizes_bytes"]
    lines += ["## Sizes", "", "| model | size |", "|---|---|"]
    for model in ("aligned", "compressed"):
        v = sizes.get(model)
        lines.append(f"| {model} | {NOT_MEASURED if v is None else f'{fmt_bytes(v)} ({v} bytes)'} |")
    c = r.get("compression")
    if c:
        ratio = f", ratio {c['ratio']:.3f}" if c.get("ratio") is not None else ""
        impl = (c.get("details") or {}).get("implementation")
        lines += ["", f"Compression: {c['method']}{ratio}{f' ({impl})' if impl else ''}, "
                      f"reloaded: {'yes' if c['reload_ok'] else 'NO'}"]
        types = (c.get("details") or {}).get("tensor_types")
        if types:  # what a GGUF file really holds (llama.cpp substitutes types for short rows)
            lines.append("Tensor types in the file: " + ", ".join(f"{t} {n}" for t, n in types.items()))
        if c.get("top1_agreement") is not None:
            lines += [f"Against the aligned model on held-out rows: top-1 agreement {c['top1_agreement']:.4f}, "
                      f"perplexity {c['perplexity']:.4g} vs {c['base_perplexity']:.4g}; {_speed(c)} "
                      f"with {c['runtime']}, loaded in {c['load_seconds']:.2f} s"]
            if c.get("scored_on") is not None:
                lines.append(f"Scored on: {_scored_on(c)}")
        elif c.get("reward"):
            w = c["reward"]
            lines += [f"Against the aligned reward model on {w['pairs']} held-out pairs: preference agreement "
                      f"{w['preference_agreement']:.4f}, pairwise accuracy {w['pairwise_accuracy']:.4f} vs "
                      f"{w['base_pairwise_accuracy']:.4f}, score difference mean {w['mean_abs_score_diff']:.4g} / "
                      f"max {w['max_abs_score_diff']:.4g}; loaded in {c['load_seconds']:.2f} s with {c['runtime']}"]
        for rej in c.get("rejected") or []:
            lines.append(f"Rejected by the gate: {rej['method']}: {rej['reason']}")
    for g in r.get("gate_rejections") or []:
        then = f"next: {g['next_method']}" if g.get("next_method") else "no fallback left"
        lines.append(f"Rejected by the evaluation gate: {g['method']} (compress attempt {g['attempt']}): "
                     f"{'; '.join(f['text'] for f in g['failures'])}; {then}")
    if r.get("gate_rejections") and c and r["status"] == "succeeded":
        kept = r["accuracy"].get("compressed")
        lines.append(f"Kept: {c['method']}, compressed accuracy {_acc(kept)}" + (f" (n={kept['n']})" if kept else ""))
    lines.append("")
    t = r.get("training")
    lines += ["## Training", ""]
    if t:
        lines += [f"{t['steps']} metric events, last step {t['last_step']} of {t['total_steps']}"
                  f" ({t['method']})", "", "| metric | first | final | min | max |", "|---|---|---|---|---|"]
        for name, m in t["metrics"].items():
            # Here null means a non-finite value (the metric was measured), so it must not read "not measured".
            cells = ["non-finite" if m[k] is None else f"{m[k]:.4g}" for k in ("first", "final", "min", "max")]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    else:
        lines.append("No training metrics were recorded.")
    lines += ["", "## Stages", "", "| stage | status | wall time |", "|---|---|---|"]
    for s in r["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {_num(s['wall_s'], '{:.1f} s')} |")
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n['source']}: {n['text']}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def _speed(c: dict[str, Any]) -> str:
    """'531.9 tokens/s (median of 3 timed runs: 505.9, 543.1, 578.6)'; a log without the runs: the value alone."""
    runs = c.get("tokens_per_s_repeats")
    each = f" (median of {len(runs)} timed runs: {', '.join(f'{v:.1f}' for v in runs)})" if runs else ""
    return f"{c['tokens_per_s']:.1f} tokens/s{each}"


def _dropped_lines(profile: dict[str, Any]) -> list[str]:
    """The rows data preparation dropped, per reason, as the data profile records them ("dropped", and
    "eval_dropped" for separate evaluation data): one line each; none when the profile records nothing."""
    lines = []
    for key, what in (("dropped", "dropped while preparing"), ("eval_dropped", "dropped from the evaluation data")):
        dropped = profile.get(key)
        if dropped is None:
            continue
        if not dropped:
            lines.append(f"- {what}: none")
            continue
        total = sum(dropped.values())
        # Rows kept: every validated row of the training data (before hold-out and limit), or of the evaluation data.
        kept = profile.get("rows") if key == "dropped" else profile.get("eval_rows")
        of = f" of {kept + total} rows read" if kept is not None else ""
        reasons = ", ".join(f"{reason}: {n}" for reason, n in dropped.items())
        lines.append(f"- {what}: {total}{of} ({reasons})")
    return lines


def _scored_on(c: dict[str, Any]) -> str:
    """What the compression's held-out positions were, in words: rows per source and the positions."""
    cap = f", at most {c['max_new_tokens']} new tokens" if c.get("max_new_tokens") is not None else ""
    names = {"completion": "the rows' completions", "chosen": "the chosen completions of pairs",
             "aligned_greedy_completion": f"the aligned model's greedy completions of the prompts{cap}"}
    parts = [f"{n} rows: {names.get(source, source)}" for source, n in (c.get("scored_rows") or {}).items()]
    if c.get("positions") is not None:
        parts.append(f"{c['positions']} completion tokens")
    return f"{c['scored_on']} ({'; '.join(parts)})" if parts else c["scored_on"]


def _finite_only(obj: Any) -> Any:
    """The report with every non-finite float as null: JSON has no NaN, and a reader must not guess."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    return obj


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.json into `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    md_path, json_path = run_dir / "report.md", run_dir / "report.json"
    json_path.write_text(json.dumps(_finite_only(report), indent=2, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(report))
    return md_path, json_path
