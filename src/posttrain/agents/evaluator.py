"""The evaluator agent: measures each model on the held-out rows, with real generation or real log-likelihoods.

Thin over `posttrain.evaluate`. Verifiable rows -> exact match of the `#### N` answer under greedy generation;
preference rows -> pairwise accuracy (chosen scored above rejected); demonstrations -> teacher-forced token accuracy;
any other kind -> nothing is measured, and a note says so. Every value comes with its n and per-sample
records under `artifacts/eval/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bus.envelope import Envelope
from ..compress.int8 import is_int8_artifact, load_int8
from ..config import RunConfig
from ..evaluate.exact_match import evaluate_exact_match
from ..evaluate.pairwise import evaluate_pairwise
from ..evaluate.token_accuracy import evaluate_token_accuracy
from ..models.loading import is_reward_model, load_model, load_tokenizer, resolve_device, resolve_model_path
from ._io import read_jsonl
from .runtime import AgentContext

METRIC_OF_KIND = {"verifiable": "exact_match", "preference": "pairwise_accuracy", "sft": "token_accuracy"}


class EvaluatorAgent:
    name = "evaluator"
    subscriptions: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)

    def _load(self, ref: str):
        path = resolve_model_path(ref)
        if is_int8_artifact(path):
            return load_int8(path), load_tokenizer(path)
        if is_reward_model(path):
            from ..align.reward_model import load_reward_model

            return load_reward_model(path), load_tokenizer(path)
        return (load_model(ref, trust_remote_code=self.config.trust_remote_code),
                load_tokenizer(ref, trust_remote_code=self.config.trust_remote_code))

    def handle(self, env: Envelope, ctx: AgentContext) -> dict[str, Any] | None:
        if env.type != "task.assigned.v1":
            return None
        p, opts = env.data["params"], self.config.evaluate
        kind = p["eval_kind"]
        metric = METRIC_OF_KIND.get(kind)
        if metric is None:
            ctx.publish("run.note.v1", {"level": "warning", "text": (
                f"nothing measured: there is no held-out metric for data of kind {kind!r}; set "
                "data_options.eval_data to prompts with checkable answers, preference pairs or demonstrations")})
            return {"results": {}}
        rows = read_jsonl(p["eval_path"], limit=opts.limit)
        stage = env.data["stage"]
        results = {}
        reward_run = p.get("method") == "rm"
        if reward_run and kind != "preference":
            ctx.publish("run.note.v1", {"level": "warning", "text": (
                f"nothing measured: a reward model is evaluated on held-out preference pairs, not on {kind!r} data")})
            return {"results": {}}
        for name, ref in p["models"].items():
            if reward_run and name == "base":
                ctx.publish("run.note.v1", {"level": "info", "text": (
                    "base not measured: the base model has no reward head yet (one is added for training)")})
                continue
            ctx.progress(stage, 0, len(rows), f"loading {name}")
            model, tokenizer = self._load(ref)
            model.to(resolve_device(self.config.device))
            samples = self.run_dir / "artifacts" / "eval" / f"{name}.jsonl"

            def progress(done: int, total: int, _name: str = name) -> None:
                ctx.progress(stage, done, total, _name)

            if kind == "verifiable":
                r = evaluate_exact_match(model, tokenizer, rows, batch_size=opts.batch_size,
                                         max_new_tokens=opts.max_new_tokens, samples_path=samples, progress=progress)
            elif kind == "sft":
                r = evaluate_token_accuracy(model, tokenizer, rows, batch_size=opts.batch_size,
                                            max_length=self.config.train.max_length, samples_path=samples,
                                            progress=progress)
            else:
                r = evaluate_pairwise(model, tokenizer, rows, reward_model=reward_run, batch_size=opts.batch_size,
                                      max_length=self.config.train.max_length,
                                      max_prompt_length=self.config.train.max_prompt_length, samples_path=samples, progress=progress)
            payload = {"model": name, "metric": "reward_accuracy" if reward_run else metric, "value": float(r.value), "n": int(r.n), "path": str(ref),
                       "samples_path": str(samples), "dropped": getattr(r, "dropped", None) or None}
            ctx.publish("eval.result.v1", payload)
            results[name] = payload
        return {"results": results}
