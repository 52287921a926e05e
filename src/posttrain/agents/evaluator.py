"""The evaluator agent: measures each model on the held-out rows, with real generation or real log-likelihoods.

Thin over `posttrain.evaluate`. Verifiable rows -> exact match of the `#### N` answer under greedy generation;
preference rows -> pairwise accuracy (chosen scored above rejected); demonstrations -> teacher-forced token accuracy;
any other kind -> nothing is measured, and a note says so. Every value comes with its n and per-sample
records under `artifacts/eval/`. The configured standard benchmarks run on each model; with
`evaluate.mt_bench_pairwise`, the aligned model's MT-Bench answers are also judged against the base model's (pairwise,
positions swapped), logged as benchmark `mt_bench_vs_base` with the win/tie/loss counts in a note.

The gate (`evaluate.gate`, the largest allowed drop per metric): a drop from base to aligned fails the task (no
compression can fix it); a drop from aligned to compressed alone is a verdict, not an error: the task completes with
`gate_failures` (one `GateFailure` record each, with the numbers) and the coordinator decides (a milder compression
method, or the run fails). A re-evaluation (`params.attempt` > 1) measures only the models it is given, gates them
against `base_results` (which then include the aligned model's), and writes its per-sample records to
`<model>.attempt<N>.jsonl` so the earlier attempt's records stay as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bus.envelope import Envelope
from ..config import RunConfig
from ..evaluate.exact_match import evaluate_exact_match
from ..evaluate.benchmarks.mt_bench import answers_from_samples
from ..evaluate.harness import generation_cap, run_benchmarks
from ..evaluate.pairwise import evaluate_pairwise
from ..evaluate.token_accuracy import evaluate_token_accuracy
from ..models.loading import is_reward_model, load_model, load_tokenizer, resolve_device, resolve_model_path
from ._io import read_jsonl
from .runtime import AgentContext, TaskError

METRIC_OF_KIND = {"verifiable": "exact_match", "preference": "pairwise_accuracy", "sft": "token_accuracy"}
PAIRWISE = "mt_bench_vs_base"  # the benchmark name the aligned-vs-base MT-Bench comparison is logged under


class EvaluatorAgent:
    name = "evaluator"
    subscriptions: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)

    def _load(self, ref: str):
        path = resolve_model_path(ref)
        if path.endswith(".gguf"):  # transformers dequantizes GGUF tensors to fp32 on load
            from transformers import AutoModelForCausalLM, AutoTokenizer

            p = Path(path)
            return (AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name),
                    AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name))
        if is_reward_model(path):  # an int8 artifact of a reward model too (load_reward_model handles both)
            from ..align.reward_model import load_reward_model

            return load_reward_model(path), load_tokenizer(path)
        return (load_model(ref, trust_remote_code=self.config.trust_remote_code),
                load_tokenizer(ref, trust_remote_code=self.config.trust_remote_code))

    def handle(self, env: Envelope, ctx: AgentContext) -> dict[str, Any] | None:
        if env.type != "task.assigned.v1":
            return None
        p, stage = env.data["params"], env.data["stage"]
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for name, ref in p["models"].items():
            ctx.progress(stage, 0, None, f"loading {name}")
            model, tokenizer = self._load(ref)
            model.to(resolve_device(self.config.device))
            measured = {}
            task = self._task_metric(ctx, stage, name, ref, model, tokenizer, p)
            if task is not None:
                measured["task"] = task
            measured.update(self._benchmarks(ctx, stage, name, ref, model, tokenizer, _attempt_suffix(p)))
            results[name] = measured
        failures = gate_drops(self.config.evaluate.gate, {**(p.get("base_results") or {}), **results})
        if any(f["before"] == "base" for f in failures):
            raise TaskError("gate failed: " + "; ".join(f["text"] for f in failures))
        return {"results": results, "gate_failures": failures}

    def _task_metric(self, ctx: AgentContext, stage: str, name: str, ref: str, model: Any, tokenizer: Any,
                     p: dict[str, Any]) -> dict[str, Any] | None:
        """The run's own held-out metric for one model, published as eval.result.v1 (None when not measurable)."""
        opts, kind = self.config.evaluate, p["eval_kind"]
        metric = METRIC_OF_KIND.get(kind)
        reward_run = p.get("method") == "rm"
        if metric is None or (reward_run and kind != "preference"):
            ctx.publish("run.note.v1", {"level": "warning", "text": (
                f"{name}: nothing measured on the held-out data: there is no metric for data of kind {kind!r}"
                + (" for a reward model" if reward_run else "") + "; set data_options.eval_data to prompts with "
                "checkable answers, preference pairs or demonstrations")})
            return None
        if reward_run and name == "base":
            ctx.publish("run.note.v1", {"level": "info", "text": (
                "base not measured: the base model has no reward head yet (one is added for training)")})
            return None
        rows = read_jsonl(p["eval_path"], limit=opts.limit)
        samples = self.run_dir / "artifacts" / "eval" / f"{name}{_attempt_suffix(p)}.jsonl"

        def progress(done: int, total: int) -> None:
            ctx.progress(stage, done, total, name)

        train = self.config.train
        if kind == "verifiable":
            r = evaluate_exact_match(model, tokenizer, rows, batch_size=opts.batch_size,
                                     max_new_tokens=opts.max_new_tokens, samples_path=samples, progress=progress)
        elif kind == "sft":
            r = evaluate_token_accuracy(model, tokenizer, rows, batch_size=opts.batch_size,
                                        max_length=train.max_length, samples_path=samples, progress=progress)
        else:
            r = evaluate_pairwise(model, tokenizer, rows, reward_model=reward_run, batch_size=opts.batch_size,
                                  max_length=train.max_length, max_prompt_length=train.max_prompt_length,
                                  samples_path=samples, progress=progress)
        payload = {"model": name, "metric": "reward_accuracy" if reward_run else metric, "value": float(r.value),
                   "n": int(r.n), "path": str(ref), "samples_path": str(samples),
                   "dropped": getattr(r, "dropped", None) or None, "answered": getattr(r, "answered", None)}
        ctx.publish("eval.result.v1", payload)
        return payload

    def _benchmarks(self, ctx: AgentContext, stage: str, name: str, ref: str, model: Any,
                    tokenizer: Any, suffix: str = "") -> dict[str, dict[str, Any]]:
        """The configured standard benchmarks for one model; each metric published as eval.result.v1."""
        opts = self.config.evaluate
        if not opts.benchmarks or is_reward_model(resolve_model_path(ref)):
            return {}
        samples = self._benchmark_samples(name, suffix)
        options: dict[str, Any] = {"allow_code_execution": opts.allow_code_execution}
        if opts.judge:
            options["judge"] = opts.judge
        if opts.judge_base_url:
            options["judge_base_url"] = opts.judge_base_url
        if opts.benchmark_max_new_tokens is not None:
            options.update(generation_cap(opts.benchmark_max_new_tokens))

        def progress(bench: str, done: int, total: int) -> None:
            ctx.progress(stage, done, total, f"{name}: {bench}")

        run = dict(data_dir=opts.data_dir, limit=opts.benchmark_limit, seed=self.config.seed,
                   batch_size=opts.batch_size, model_name=str(ref), progress=progress)
        out = run_benchmarks(model, tokenizer, list(opts.benchmarks), options=options, samples_path=samples, **run)
        measured = self._publish(ctx, name, ref, out, samples)
        if opts.mt_bench_pairwise and name == "aligned" and "mt_bench" in out["settings"]:
            measured.update(self._mt_bench_vs_base(ctx, ref, model, tokenizer, options, samples, run))
        return measured

    def _benchmark_samples(self, name: str, suffix: str = "") -> Path:
        return self.run_dir / "artifacts" / "eval" / f"{name}{suffix}.benchmarks.jsonl"

    def _mt_bench_vs_base(self, ctx: AgentContext, ref: str, model: Any, tokenizer: Any, options: dict[str, Any],
                          samples: Path, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The aligned model's MT-Bench answers against the base model's, pairwise with positions swapped.

        Both sides are the answers their single-mode runs already scored (read back from the samples files: the
        same seeded questions), so nothing is generated again; only the judge runs."""
        base_path = self._benchmark_samples("base")
        aligned = answers_from_samples(read_jsonl(samples))
        base = answers_from_samples(read_jsonl(base_path)) if base_path.exists() else {}
        missing = sorted(set(aligned) - set(base))
        if not aligned or missing:
            ctx.publish("run.note.v1", {"level": "warning", "text": (
                f"aligned vs base: {PAIRWISE} not measured: the base model's MT-Bench answers "
                + (f"to questions {missing} " if base else "") + f"are not in {base_path} (the evaluate_base "
                "stage must run mt_bench)")})
            return {}
        pair_samples = self.run_dir / "artifacts" / "eval" / "aligned.mt_bench_vs_base.jsonl"
        out = run_benchmarks(model, tokenizer, ["mt_bench"], samples_path=pair_samples,
                             options={**options, "mode": "pairwise", "answers": aligned, "baseline_answers": base,
                                      "baseline_name": "base"}, **run)
        return self._publish(ctx, "aligned", ref, out, pair_samples, label=PAIRWISE)

    def _publish(self, ctx: AgentContext, name: str, ref: str, out: dict[str, Any], samples: Path,
                 label: str | None = None) -> dict[str, dict[str, Any]]:
        """Each metric of a `run_benchmarks` result as eval.result.v1 (under `label` when given), skips and notes
        as run.note.v1; returns {"bench/metric": payload}."""
        measured = {}
        for bench, metrics in out["results"].items():
            for metric, m in metrics.items():
                payload = {"model": name, "metric": metric, "benchmark": label or bench, "value": float(m["value"]),
                           "n": int(m["n"]), "ci_low": m["ci_low"], "ci_high": m["ci_high"], "path": str(ref),
                           "samples_path": str(samples)}
                ctx.publish("eval.result.v1", payload)
                measured[f"{label or bench}/{metric}"] = payload
        for bench, reason in out["skipped"].items():
            ctx.publish("run.note.v1", {"level": "warning", "text": f"{name}: {label or bench} not measured: "
                                                                    f"{in_run_terms(reason)}"})
        for bench, notes in out["notes"].items():
            for note in notes:
                ctx.publish("run.note.v1", {"level": "info", "text": f"{name}: {label or bench}: {in_run_terms(note)}"})
        return measured


# The benchmarks speak `posttrain eval`'s flag; in a run the same setting is the run-config key.
_RUN_TERMS = (("give --data-dir DIR", "set evaluate.data_dir in the run config"),
              ("a --data-dir", "an evaluate.data_dir"), ("--data-dir", "evaluate.data_dir"))


def in_run_terms(text: str) -> str:
    """A benchmark's message with `--data-dir` named as the run-config key `evaluate.data_dir`."""
    for flag, key in _RUN_TERMS:
        text = text.replace(flag, key)
    return text


def _attempt_suffix(p: dict[str, Any]) -> str:
    attempt = int(p.get("attempt") or 1)
    return "" if attempt == 1 else f".attempt{attempt}"


def gate_failures(gate: dict[str, float], results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Each configured metric may drop at most its allowance from base to aligned and from aligned to compressed:
    one sentence with the numbers per drop past its allowance."""
    return [f["text"] for f in gate_drops(gate, results)]


def gate_drops(gate: dict[str, float], results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """`gate_failures` as records: the fields of `bus.events.GateFailure` (`text` is the sentence)."""
    failures = []
    for key, allowed in gate.items():
        for before, after in (("base", "aligned"), ("aligned", "compressed")):
            a, b = results.get(before, {}).get(key), results.get(after, {}).get(key)
            if a is None or b is None:
                continue
            drop = a["value"] - b["value"]
            if drop > allowed:
                failures.append({
                    "metric": key, "before": before, "after": after, "before_value": a["value"],
                    "before_n": a["n"], "after_value": b["value"], "after_n": b["n"], "drop": drop,
                    "allowed": allowed,
                    "text": f"{key} dropped from {a['value']:.4f} ({before}, n={a['n']}) to {b['value']:.4f} "
                            f"({after}, n={b['n']}), by {drop:.4f} > the allowed {allowed:g}"})
    return failures
