"""The trainer agent: runs the selected technique on the run's data, streaming per-step metrics as events.

Thin over `posttrain.align` (sft, rm, dpo, ipo, simpo, orpo, kto, grpo) and `posttrain.models.lora`. Guarantees: the
method must fit the data kind (else a clear task failure); every optimizer step publishes `train.metrics.v1` and
advances the progress token the watchdog reads; the result is an HF-format checkpoint (safetensors + tokenizer +
chat template) under `checkpoints/<method>/final` — with LoRA, the adapter under `checkpoints/<method>/adapter` and
the merged model as the checkpoint the later stages use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..align.engine import save_pretrained
from ..align.grpo import GRPOSettings, train_grpo
from ..align.preference import PreferenceSettings, train_preference
from ..align.engine import TrainResult
from ..align.sft import train_sft
from ..bus.envelope import Envelope
from ..config import RunConfig
from ..models.loading import load_model, load_tokenizer, resolve_device, weights_size_bytes
from ..rewards.verifiable import hash_answer_reward
from ..select.rules import METHOD_KINDS
from ._io import read_jsonl
from .runtime import AgentContext, TaskError

OnStep = Callable[[int, dict[str, float]], None]


def run_technique(method: str, kind: str, model: Any, tokenizer: Any, rows: list[dict], cfg: RunConfig,
                  on_step: OnStep) -> TrainResult:
    """Translate the run configuration into one library call."""
    if method == "sft":
        return train_sft(model, tokenizer, rows, cfg.train, on_step=on_step, loss_on=cfg.sft.loss_on)
    if method in ("dpo", "ipo", "simpo", "orpo"):
        section = getattr(cfg, method)
        settings = PreferenceSettings(method=method, beta=section.beta,
                                      label_smoothing=getattr(section, "label_smoothing", 0.0),
                                      gamma=getattr(section, "gamma", 0.5),
                                      reference=getattr(section, "reference", "copy"))
        return train_preference(model, tokenizer, rows, cfg.train, settings, on_step)
    if method == "kto":
        from ..align.kto import KTOSettings, train_kto, unpair_preferences

        if kind == "preference":
            rows = unpair_preferences(rows, seed=cfg.seed)  # shuffled, so batches mix both labels
        k = cfg.kto
        settings = KTOSettings(beta=k.beta, desirable_weight=k.desirable_weight,
                               undesirable_weight=k.undesirable_weight, reference=k.reference)
        return train_kto(model, tokenizer, rows, cfg.train, settings, on_step=on_step)
    if method == "rm":
        from ..align.reward_model import RewardSettings, train_reward_model

        settings = RewardSettings(margin_field=cfg.rm.margin_field, center_coefficient=cfg.rm.center_coefficient)
        return train_reward_model(model, tokenizer, rows, cfg.train, settings, on_step=on_step)
    if method == "grpo":
        settings = GRPOSettings(**cfg.grpo.model_dump(exclude={"reward"}))
        return train_grpo(model, tokenizer, rows, cfg.train, settings, hash_answer_reward, on_step=on_step)
    raise TaskError(f"method {method!r} is not available")


class TrainerAgent:
    name = "trainer"
    subscriptions: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)

    def _load(self, method: str, ref: str) -> Any:
        cfg = self.config
        if method == "rm":
            from ..align.reward_model import load_reward_model

            return load_reward_model(ref)
        return load_model(ref, trust_remote_code=cfg.trust_remote_code)

    def handle(self, env: Envelope, ctx: AgentContext) -> dict[str, Any] | None:
        if env.type != "task.assigned.v1":
            return None
        p, cfg = env.data["params"], self.config
        method, kind = p["method"], p["kind"]
        if kind not in METHOD_KINDS.get(method, ()):
            raise TaskError(f"{method.upper()} trains on {' or '.join(METHOD_KINDS.get(method, ('?',)))} data "
                            f"but the data is '{kind}'")
        total = cfg.train.steps * (cfg.grpo.num_iterations if method == "grpo" else 1)
        ctx.progress("train", 0, total, "loading model")
        model = self._load(method, p["model"]).to(resolve_device(cfg.device))
        tokenizer = load_tokenizer(p["model"], trust_remote_code=cfg.trust_remote_code)
        if cfg.lora is not None:
            from ..models.lora import LoraOptions, apply_lora

            model = apply_lora(model, LoraOptions(**cfg.lora.model_dump()))
        rows = read_jsonl(p["train_path"])
        no_signal: list[bool] = []  # per GRPO step: every group's samples got the same reward (all advantages 0)

        def on_step(step: int, metrics: dict[str, float]) -> None:
            ctx.progress("train", step, total)
            if "frac_zero_std_groups" in metrics:
                no_signal.append(float(metrics["frac_zero_std_groups"]) >= 1.0)
            ctx.publish("train.metrics.v1", {"method": method, "step": step, "total_steps": total,
                                             "metrics": {k: float(v) for k, v in metrics.items()}})

        base = self.run_dir / "checkpoints" / method
        if cfg.train.checkpoint_every:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": str(base)})})
        try:
            result = run_technique(method, kind, model, tokenizer, rows, cfg, on_step)
        except ValueError as exc:  # no rows left after tokenization, bad settings: the user's to fix
            raise TaskError(str(exc)) from exc
        if no_signal and all(no_signal):
            # The run "succeeds", but the reward never told samples apart: say so rather than report a silent no-op.
            ctx.publish("run.note.v1", {"level": "warning", "text": (
                f"{method}: no reward signal in any of its {len(no_signal)} steps: within every group all "
                f"{cfg.grpo.num_generations} samples got the same reward, so every advantage was 0 and the reward did "
                "not move the policy (more samples per prompt, a higher temperature, or data the model can partly "
                "solve would give it one)")})
        extra: dict[str, Any] = {}
        if cfg.lora is not None:
            from ..models.lora import save_lora

            adapter, out = save_lora(model, tokenizer, base)
            extra["adapter"] = str(adapter)
        else:
            out = save_pretrained(model, tokenizer, base / "final")
        size = weights_size_bytes(out)
        ctx.publish("train.checkpoint.v1", {"step": result.steps, "path": str(out), "size_bytes": size},
                    dataref=str(out))
        return {"checkpoint": str(out), "method": method, "steps": result.steps, "rows": result.rows,
                "dropped": result.dropped, "final": {k: float(v) for k, v in result.final.items()},
                "size_bytes": size, **extra}
