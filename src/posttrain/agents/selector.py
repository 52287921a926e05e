"""The selector agent: chooses the alignment method from the data kind and the machine, and says why.

Thin over `posttrain.select.rules`. The parameter count is read from the model's config on the meta device
(no weights are loaded), so the rationale's numbers are measured, not guessed.
"""

from __future__ import annotations

from typing import Any

import torch

from ..bus.envelope import Envelope
from ..config import RunConfig
from ..models.loading import resolve_model_path
from ..select.rules import Machine, select_method
from .runtime import AgentContext, TaskError


def count_params_from_config(name_or_path: str, trust_remote_code: bool = False) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


class SelectorAgent:
    name = "selector"
    subscriptions: tuple[str, ...] = ()

    def __init__(self, config: RunConfig):
        self.config = config

    def handle(self, env: Envelope, ctx: AgentContext) -> dict[str, Any] | None:
        if env.type != "task.assigned.v1":
            return None
        params = env.data["params"]
        ctx.progress("select", 0, 1, "measuring the model and machine")
        num_params = count_params_from_config(self.config.model, self.config.trust_remote_code)
        try:
            rows = int(params["profile"].get("train_rows", params["profile"].get("rows", 0)))
            choice = select_method(params["kind"], rows, num_params, Machine.detect(),
                                   explicit=None if self.config.method == "auto" else self.config.method,
                                   lora=self.config.lora is not None)
        except ValueError as exc:
            raise TaskError(str(exc)) from exc
        ctx.publish("method.selected.v1", {"method": choice.method, "rationale": choice.rationale,
                                           "runner_up": choice.runner_up, "explicit": choice.explicit})
        ctx.progress("select", 1, 1, "done")
        return {"method": choice.method, "rationale": choice.rationale, "runner_up": choice.runner_up,
                "num_params": num_params}
