"""The data agent: loads, detects the kind of, validates and profiles the run's data; hands the rest a path.

Thin over `posttrain.data` (user data) and `posttrain.tasks.arithmetic` (the embedded task). Guarantees: a data
problem becomes a task failure whose reason names the file, row, field and what was expected; on success the
normalised train and eval rows are written under `artifacts/data/` (complete files only) and referenced by path.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..bus.envelope import Envelope
from ..config import RunConfig
from ..data import prepare
from ..data.errors import DataError
from ..data.profile import profile as profile_rows
from ..models.loading import load_tokenizer
from ..tasks import arithmetic
from ._io import write_jsonl
from .runtime import AgentContext, TaskError

EMBEDDED_SOURCE = "embedded:arithmetic"


class DataAgent:
    name = "data"
    subscriptions: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)

    def handle(self, env: Envelope, ctx: AgentContext) -> dict[str, Any] | None:
        if env.type != "task.assigned.v1":
            return None
        cfg, opts = self.config, self.config.data_options
        ctx.progress("data", 0, None, "loading tokenizer")
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        try:
            if cfg.data is None:
                train_items, test_items = arithmetic.make_splits(seed=0)
                kind, train_rows = embedded_training_rows(cfg.method, train_items, cfg.seed)
                source = f"{EMBEDDED_SOURCE} ({kind})"
                eval_rows, eval_kind = arithmetic.verifiable_rows(test_items), "verifiable"
                if cfg.method == "rm":  # a reward model is measured on held-out pairs, not by generation
                    eval_rows, eval_kind = arithmetic.preference_rows(test_items, seed=cfg.seed), "preference"
                eval_source = f"{EMBEDDED_SOURCE} (test split)"
                dropped: dict[str, int] = {}
                ctx.progress("data", 1, 3, "profiling")
                profile = dict(profile_rows(train_rows, kind, tokenizer))
            else:
                ctx.progress("data", 1, 3, f"validating {cfg.data}")
                prepared = prepare(cfg.data, kind=opts.kind, split=opts.split, tokenizer=tokenizer,
                                   drop_empty=opts.drop_empty)
                kind, source, dropped = str(prepared.kind.value if hasattr(prepared.kind, "value") else prepared.kind), \
                    prepared.source, dict(prepared.dropped)
                rows = list(prepared.rows)
                eval_dropped = None
                if opts.eval_data:
                    ev = prepare(opts.eval_data, split=opts.eval_split, tokenizer=tokenizer, drop_empty=opts.drop_empty)
                    eval_rows, eval_kind, eval_source = list(ev.rows), str(getattr(ev.kind, "value", ev.kind)), ev.source
                    eval_dropped = dict(ev.dropped)  # reported as the training data's are
                    train_rows = rows
                else:
                    train_rows, eval_rows = hold_out(rows, opts.eval_size, cfg.seed)
                    eval_kind, eval_source = kind, f"{source} (held out: {len(eval_rows)} rows, seed {cfg.seed})"
                if opts.limit is not None:
                    train_rows = train_rows[:opts.limit]
                profile = dict(prepared.profile)
                if eval_dropped is not None:
                    profile["eval_dropped"] = eval_dropped
        except DataError as exc:
            raise TaskError(str(exc)) from exc
        ctx.progress("data", 2, 3, "writing")
        data_dir = self.run_dir / "artifacts" / "data"
        train_path, eval_path = data_dir / "train.jsonl", data_dir / "eval.jsonl"
        write_jsonl(train_path, train_rows)
        write_jsonl(eval_path, eval_rows)
        profile.update({"train_rows": len(train_rows), "eval_rows": len(eval_rows), "dropped": dropped,
                        "eval_source": eval_source})
        ctx.publish("data.profiled.v1", {"source": source, "kind": kind, "rows": len(train_rows), "profile": profile},
                    dataref=str(train_path))
        ctx.progress("data", 3, 3, "done")
        return {"kind": kind, "source": source, "train_path": str(train_path), "eval_path": str(eval_path),
                "eval_kind": eval_kind, "rows": len(train_rows), "eval_rows": len(eval_rows), "profile": profile,
                "model": cfg.model}


def embedded_training_rows(method: str, items: list, seed: int) -> tuple[str, list[dict]]:
    """The embedded task in the form the method trains on: prompts with answers (GRPO, and `auto`), pairs of the
    correct solution against one with an arithmetic slip (preference methods and KTO, which converts them), or the
    worked solutions as demonstrations (SFT). Evaluation is always exact match on the test split."""
    if method in ("dpo", "ipo", "simpo", "orpo", "rm", "kto"):
        return "preference", arithmetic.preference_rows(items, seed=seed)
    if method == "sft":
        return "sft", arithmetic.sft_rows(items)
    return "verifiable", arithmetic.verifiable_rows(items)


def hold_out(rows: list[dict], eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Split off `eval_size` rows (seeded shuffle) for evaluation; at least one row stays for training."""
    if len(rows) < 2:
        raise TaskError(f"need at least 2 valid rows to hold some out for evaluation, got {len(rows)}; "
                        "give data_options.eval_data")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    k = min(eval_size, len(rows) // 2)
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in order[:k]]

