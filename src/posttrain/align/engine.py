"""The one training loop every technique shares: optimizer, schedule, accumulation, clipping, seeds, checkpoints.

Guarantees:
- A technique supplies only a loss over one micro-batch, as a *sum* over its units (tokens or sequences) together
  with the number of units; the engine divides the accumulated gradients by the unit count of the *whole
  accumulation window*. The same effective batch therefore gives the same loss and gradients whatever the
  micro-batch split (ALGORITHMS.md pitfall 3), and a window with no units gives a finite zero update.
- Checkpoints are HF format (`save_pretrained`, safetensors, tokenizer + chat template) that `from_pretrained`
  reloads; optimizer/scheduler state is saved as tensors and loaded with `weights_only=True`.
- `set_seed` makes a run deterministic on a given machine and torch build.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..models.files import give_umask_modes


class TrainOptions(BaseModel):
    """Settings of the shared loop. Technique-specific settings live in each technique's own options."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of the peak")
    max_grad_norm: float | None = Field(1.0, description="clip the global grad norm; None disables")
    max_length: int = Field(512, ge=8, description="max tokens of prompt + completion")
    max_prompt_length: int | None = Field(None, description="left-truncate prompts longer than this")
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1, description="save a checkpoint (HF weights + optimizer, "
                                                                 "schedule and RNG state) every N optimizer steps "
                                                                 "under output_dir/step-N")
    output_dir: str | None = Field(None, description="where periodic checkpoints go (needed by checkpoint_every)")


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    rows: int = 0

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


@dataclass
class LossOutput:
    """A micro-batch's contribution: `loss_sum` over `units`, plus metric sums to be averaged the same way."""

    loss_sum: torch.Tensor
    units: float
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_counts: dict[str, float] = field(default_factory=dict)

    def add_metric(self, name: str, total: float, count: float) -> None:
        self.metric_sums[name] = self.metric_sums.get(name, 0.0) + float(total)
        self.metric_counts[name] = self.metric_counts.get(name, 0.0) + float(count)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def disable_dropout(model: torch.nn.Module) -> None:
    """Switch every dropout off (nn.Dropout layers and the attention-dropout rates HF attention reads), so the
    policy in train mode computes exactly what its reference or its rollout computed in eval mode: DPO's step-0
    loss is ln 2 and a GRPO ratio is 1 on policy (TRL does the same by default for its offline trainers)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def _lr_lambda(options: TrainOptions) -> Callable[[int], float]:
    total, warmup, floor = options.steps, options.warmup_steps, options.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if options.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if options.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only: biases and norm gains are not regularised (standard AdamW practice).
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    return all(p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
               and p.device.type in ("cpu", "cuda") for p in params)


def applied_gradient(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> torch.Tensor:
    """The gradient an optimizer step is about to apply to `param` (for step pre-hooks): its `.grad`, divided by the
    optimizer's `grad_scale` when the engine has handed normalisation and clipping to the fused kernel."""
    scale = getattr(optimizer, "grad_scale", None)
    return param.grad / scale if scale is not None else param.grad.detach().clone()


class Engine:
    """Owns the optimizer and schedule of one model and performs optimizer steps from micro-batches."""

    def __init__(self, model: torch.nn.Module, options: TrainOptions, tokenizer: Any = None):
        self.model = model
        self.options = options
        self.tokenizer = tokenizer
        if options.checkpoint_every and not options.output_dir:
            raise ValueError("checkpoint_every needs output_dir: where should the checkpoints go?")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        fused = _fused_ok(self.params)
        # fused: one kernel for all parameters instead of a Python loop over them (4-8% of a small model's step).
        self.optimizer = torch.optim.AdamW(_param_groups(model, options.weight_decay), lr=options.lr,
                                           betas=options.adam_betas, fused=fused)
        self._scales_in_kernel = fused and getattr(self.optimizer, "_step_supports_amp_scaling", False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(options))
        self.step_count = 0

    def step(self, micro_batches: Iterable[Any], loss_fn: Callable[[Any], LossOutput]) -> dict[str, float]:
        """One optimizer step over the micro-batches of an accumulation window; returns the step's metrics."""
        started = time.perf_counter()
        self.model.train()
        total_units, loss_total = 0.0, 0.0
        metric_sums: dict[str, float] = {}
        metric_counts: dict[str, float] = {}
        for batch in micro_batches:
            out = loss_fn(batch)
            out.loss_sum.backward()
            total_units += out.units
            loss_total += float(out.loss_sum.detach())
            for k, v in out.metric_sums.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
                metric_counts[k] = metric_counts.get(k, 0.0) + out.metric_counts.get(k, 0.0)
        if not math.isfinite(loss_total):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the loss is not finite ({loss_total}) at step {self.step_count + 1}: the "
                                     "update was not applied; lower the learning rate or check the data")
        grad_norm = self._normalise_and_clip(1.0 / max(total_units, 1.0))
        lr = self.scheduler.get_last_lr()[0]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.grad_scale = None
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        metrics = {"loss": loss_total / max(total_units, 1.0), "grad_norm": grad_norm, "lr": lr, "units": total_units,
                   "step_s": time.perf_counter() - started}
        for k, v in metric_sums.items():
            if metric_counts.get(k):
                metrics[k] = v / metric_counts[k]
        every = self.options.checkpoint_every
        if every and self.step_count % every == 0:
            self.save_checkpoint(Path(self.options.output_dir) / f"step-{self.step_count}", self.tokenizer)
        return metrics

    def _normalise_and_clip(self, scale: float) -> float:
        """Divide the summed gradients by the window's units and clip them to max_grad_norm; returns the pre-clip norm.

        Both are one common factor, so they are applied once: the fused AdamW kernel divides by `grad_scale` as it
        reads each gradient (the protocol torch's GradScaler uses), otherwise one foreach multiply. Either way no extra
        pass over the gradients beyond the norm itself (two passes were ~5% of a small model's step)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        norm = float(torch.nn.utils.get_total_norm(grads)) * scale
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the gradient norm is not finite ({norm}) at step {self.step_count + 1}: the "
                                     "update was not applied; lower the learning rate or check the data")
        max_norm = self.options.max_grad_norm
        factor = scale * (min(1.0, max_norm / (norm + 1e-6)) if max_norm is not None else 1.0)  # as clip_grad_norm_
        if factor != 1.0:
            if self._scales_in_kernel:
                self.optimizer.grad_scale = torch.tensor(1.0 / factor, dtype=torch.float32, device=grads[0].device)
            else:
                torch._foreach_mul_(grads, factor)
        return norm

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write an HF-format model (+ tokenizer) and the resumable loop state to `directory`."""
        directory = Path(directory)
        save_pretrained(self.model, tokenizer, directory)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "step": self.step_count, "torch_rng": torch.get_rng_state()}
        torch.save(state, directory / "trainer_state.pt")
        return directory

    def load_state(self, directory: str | Path) -> None:
        """Restore optimizer, schedule, step and RNG written by `save_checkpoint` (weights load separately)."""
        state = torch.load(Path(directory) / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        torch.set_rng_state(state["torch_rng"])


def train_loop(engine: "Engine", feed: Iterator[Any], loss_fn: Callable[[Any], LossOutput], steps: int,
               result: TrainResult, on_step: Callable[[int, dict[str, float]], None] | None = None,
               finish: Callable[[dict[str, float], Any], None] | None = None) -> TrainResult:
    """`steps` optimizer steps over windows from `feed`; `finish(metrics, window)` may complete a step's metrics
    (e.g. a std from summed squares) before they are recorded and reported to `on_step`."""
    for _ in range(steps):
        window = next(feed)
        metrics = engine.step(window, loss_fn)
        if finish is not None:
            finish(metrics, window)
        result.history.append(metrics)
        if on_step is not None:
            on_step(engine.step_count, metrics)
    result.steps = engine.step_count
    engine.model.eval()
    return result


def save_pretrained(model: torch.nn.Module, tokenizer: Any, directory: str | Path) -> Path:
    """Save `model` (safetensors) and `tokenizer` (with its chat template) in HF format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    give_umask_modes(directory)
    return directory
