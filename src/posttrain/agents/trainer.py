"""The trainer agent: runs the selected technique on the run's data, streaming per-step metrics as events.

Thin over `posttrain.align` (sft, dpo, grpo). Guarantees: the method must fit the data kind (else a clear task
failure); every optimizer step publishes `train.metrics.v1` and advances the progress token the watchdog reads; the
result is an HF-format checkpoint (safetensors + tokenizer + chat template) under `checkpoints/<method>/final`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..align.preference import train_dpo
from ..align.engine import save_pretrained
from ..align.grpo import GRPOSettings, train_grpo
from ..align.sft import train_sft
from ..bus.envelope import Envelope
from ..config import RunConfig
from ..models.loading import load_model, load_tokenizer, weights_size_bytes
from ..rewards.verifiable import hash_answer_reward
from ..select.rules import METHOD_KIND
from ._io import read_jsonl
from .runtime import AgentContext, TaskError


class TrainerAgent:
    name = "trainer"
    subscriptions: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)

    def handle(self, env: Envelope, ctx: AgentContext) -> dict[str, Any] | None:
        if env.type != "task.assigned.v1":
            return None
        p, cfg = env.data["params"], self.config
        method, kind = p["method"], p["kind"]
        if METHOD_KIND.get(method) != kind:
            raise TaskError(f"{method.upper()} trains on '{METHOD_KIND.get(method)}' data but the data is '{kind}'")
        ctx.progress("train", 0, cfg.train.steps, "loading model")
        model = load_model(p["model"], trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(p["model"], trust_remote_code=cfg.trust_remote_code)
        rows = read_jsonl(p["train_path"])
        total = cfg.train.steps * (cfg.grpo.num_iterations if method == "grpo" else 1)

        def on_step(step: int, metrics: dict[str, float]) -> None:
            ctx.progress("train", step, total)
            ctx.publish("train.metrics.v1", {"method": method, "step": step, "total_steps": total,
                                             "metrics": {k: float(v) for k, v in metrics.items()}})

        try:
            if method == "sft":
                result = train_sft(model, tokenizer, rows, cfg.train, on_step=on_step)
            elif method == "dpo":
                result = train_dpo(model, tokenizer, rows, cfg.train, beta=cfg.dpo.beta,
                                   label_smoothing=cfg.dpo.label_smoothing, on_step=on_step)
            elif method == "grpo":
                g = cfg.grpo
                settings = GRPOSettings(**g.model_dump(exclude={"reward"}))
                result = train_grpo(model, tokenizer, rows, cfg.train, settings, hash_answer_reward, on_step=on_step)
            else:
                raise TaskError(f"method {method!r} is not available")
        except ValueError as exc:  # no rows left after tokenization, bad settings: the user's to fix
            raise TaskError(str(exc)) from exc
        out = self.run_dir / "checkpoints" / method / "final"
        save_pretrained(model, tokenizer, out)
        size = weights_size_bytes(out)
        ctx.publish("train.checkpoint.v1", {"step": result.steps, "path": str(out), "size_bytes": size},
                    dataref=str(out))
        return {"checkpoint": str(out), "method": method, "steps": result.steps, "rows": result.rows,
                "dropped": result.dropped, "final": {k: float(v) for k, v in result.final.items()},
                "size_bytes": size}
