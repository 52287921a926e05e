"""The compressor agent: quantizes the aligned model, writes the artifact, reloads it and measures it.

Thin over `posttrain.compress.int8`. Guarantees: the artifact is reloaded from disk before it is reported; its size
and the uncompressed size are measured on disk; the logit difference is measured on a probe batch of real eval
prompts (the first held-out rows), reloaded artifact against the uncompressed model, each prompt run alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..bus.envelope import Envelope
from ..compress.int8 import load_int8, quantize_model_to_dir
from ..config import RunConfig
from ..models.loading import is_reward_model, load_model, load_tokenizer, resolve_model_path, weights_size_bytes
from ..data.tokenize import encode_prompt
from ._io import read_jsonl
from .runtime import AgentContext, TaskError


def probe_difference(model: Any, reloaded: Any, tokenizer: Any, eval_path: str | None,
                     rows: int = 4) -> tuple[float, bool]:
    """Max |logit difference| between the uncompressed model and the reloaded artifact over the prompts of the first
    held-out rows, each run alone (no padding counted); and whether every reloaded output is finite."""
    prompts = [r["prompt"] for r in read_jsonl(eval_path, limit=rows)] if eval_path else []
    if not prompts:
        raise TaskError("no held-out prompts to measure the compressed model on")
    worst, finite = 0.0, True
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            a, b = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
            worst = max(worst, float((a - b).abs().max()))
            finite = finite and bool(torch.isfinite(b).all())
    return worst, finite


class CompressorAgent:
    name = "compressor"
    subscriptions: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)

    def handle(self, env: Envelope, ctx: AgentContext) -> dict[str, Any] | None:
        if env.type != "task.assigned.v1":
            return None
        source = env.data["params"]["model"]
        method = self.config.compress.method
        ctx.progress("compress", 0, 3, "loading")
        if is_reward_model(source):
            from ..align.reward_model import load_reward_model

            model = load_reward_model(source)
        else:
            model = load_model(source, trust_remote_code=self.config.trust_remote_code)
        tokenizer = load_tokenizer(source, trust_remote_code=self.config.trust_remote_code)
        out = self.run_dir / "artifacts" / "compressed" / method
        ctx.progress("compress", 1, 3, "quantizing")
        quantize_model_to_dir(model, tokenizer, out)
        ctx.progress("compress", 2, 3, "reloading")
        reloaded = load_int8(out)
        diff, reload_ok = probe_difference(model, reloaded, tokenizer, env.data["params"].get("eval_path"))
        size, base = weights_size_bytes(out), weights_size_bytes(resolve_model_path(source))
        ctx.publish("compress.result.v1", {"method": method, "path": str(out), "size_bytes": size,
                                           "base_size_bytes": base, "reload_ok": reload_ok,
                                           "max_abs_logit_diff": diff}, dataref=str(out))
        ctx.progress("compress", 3, 3, "done")
        return {"path": str(out), "method": method, "size_bytes": size, "base_size_bytes": base,
                "reload_ok": reload_ok, "max_abs_logit_diff": diff}
