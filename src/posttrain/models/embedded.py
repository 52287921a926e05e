"""The embedded default model: a small real ``LlamaForCausalLM`` pre-trained on the arithmetic task, built locally.

``posttrain demo`` runs on it without any download. The build (``build_embedded``):

1. draws the embedded task (``posttrain.tasks.arithmetic``) with the split seed the data agent uses, so the
   test split here is the very split the demo evaluates on (``make_splits`` puts the first ``n_test`` drawn
   questions in test whatever ``n_train`` is, so a larger training draw leaves the test split unchanged);
2. trains a byte-level BPE tokenizer with a chat template on the train split's text;
3. creates a ``LlamaForCausalLM`` from ``RECIPE``'s sizes and fine-tunes it with ``posttrain.align.sft.train_sft``
   on the train split until it is partly competent;
4. measures greedy exact match on the test split with ``posttrain.evaluate.exact_match`` and records the measured
   value (with n) in ``embedded.json``, next to the recipe and the build time;
5. saves everything in HF format (safetensors, tokenizer + chat template, generation config with eos/pad).

Why two answer conventions: the SFT corpus ends most addition and subtraction solutions in ``The answer is N.``
and most multiplication and two-step ones in GSM8K's ``#### N`` (``RECIPE["task"]["alt_format_rates"]``), as a
corpus pooled from differently formatted sources does. The task's verifier and the exact-match evaluation accept
only ``#### N`` (like lm-eval's GSM8K strict match), so the built model answers part of the test split in a form
that scores 0 although its arithmetic may be right. That is the room alignment has on this model: at 0.6M
parameters GRPO does not measurably improve the arithmetic itself within a demo's budget, but a verifier's reward
does teach it the required answer form (docs/benchmarks.md, "What GRPO does for the embedded model", measures both).

Guarantees:
- Deterministic given the seed on a given machine, torch build and thread count (CPU kernels may reduce in a
  different order elsewhere, so another machine can produce slightly different weights and a different measured
  score; the score in ``embedded.json`` is always the one measured for the weights beside it).
- The caller's RNG states (python ``random``, numpy, torch) are restored after a build.
- A directory is only ever seen complete: the build writes into a temporary sibling directory and renames it into
  place; ``embedded.json`` is written last, and a directory counts as built only when it holds an
  ``embedded.json`` of the current ``VERSION``. An ``fcntl`` lock serialises builders of the same directory across
  processes, and a waiting builder reuses the finished result instead of building again.
- The cache lives under ``$POSTTRAIN_CACHE`` (else ``~/.cache/posttrain``) in a directory named after ``VERSION``
  and the seed; changing the recipe means bumping ``VERSION``, which makes every cache rebuild.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Bump whenever anything below (or the task's templates, or the tokenizer builder) changes the built model.
VERSION = "arith-v4"
MANIFEST = "embedded.json"

# The data agent draws the demo's task with make_splits(seed=0) and its default test size; keep these equal so
# the recorded score is on the demo's own test split.
TASK_SPLIT_SEED = 0

RECIPE: dict[str, Any] = {
    # The SFT corpus is pooled from two answer conventions (see "Why two answer conventions" above).
    "task": {"split_seed": TASK_SPLIT_SEED, "n_train": 4000, "n_test": 200,
             "alt_format_rates": {"add": 0.8, "subtract": 0.8, "multiply": 0.2, "two_step": 0.2}},
    "tokenizer": {"vocab_size": 512},
    "model": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 1024, "tie_word_embeddings": True},
    "train": {"steps": 2000, "batch_size": 32, "grad_accum": 1, "lr": 2e-3, "warmup_steps": 30,
              "schedule": "cosine", "max_grad_norm": 1.0, "max_length": 256, "weight_decay": 0.0},
    "eval": {"max_new_tokens": 64, "batch_size": 100},
}


def cache_root() -> Path:
    """``$POSTTRAIN_CACHE`` when set and non-empty, else ``~/.cache/posttrain``."""
    env = os.environ.get("POSTTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "posttrain"


def embedded_dir_name(seed: int = 0) -> str:
    return f"embedded-{VERSION}-seed{seed}"


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The ``embedded.json`` of a directory, or None when missing or unreadable."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_built(directory: str | Path) -> bool:
    """True when ``directory`` holds a finished build of the current ``VERSION``."""
    manifest = read_manifest(directory)
    return bool(manifest) and manifest.get("version") == VERSION and (Path(directory) / "config.json").exists()


def embedded_model_dir(seed: int = 0, force: bool = False,
                       log: Callable[[str], None] | None = None) -> Path:
    """The cached embedded model directory for ``seed``, built on first use (or rebuilt when ``force``)."""
    return build_embedded(cache_root() / embedded_dir_name(seed), seed=seed, force=force, log=log)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    # train_sft seeds the global RNGs; a library call should not leave the caller's streams changed.
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def progress_timing(step: int, total: int, elapsed_s: float) -> str:
    """' (12 s, about 1.8 min left at this rate)' from the measured rate so far; ' (12 s)' on the last step."""
    if step >= total:
        return f" ({elapsed_s:.0f} s)"
    left = elapsed_s / step * (total - step)
    left_text = f"{left:.0f} s" if left < 90 else f"{left / 60:.1f} min"
    return f" ({elapsed_s:.0f} s, about {left_text} left at this rate)"


def build_embedded(out_dir: str | Path, seed: int = 0, force: bool = False,
                   log: Callable[[str], None] | None = None) -> Path:
    """Build the embedded model into ``out_dir`` (unless it already holds a current build and not ``force``).

    Returns ``out_dir``. See the module docstring for the steps and guarantees; ``log`` receives progress lines.
    """
    out_dir = Path(out_dir)
    if not force and is_built(out_dir):
        return out_dir
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        # Another process may have finished the same build while we waited for the lock.
        if not force and is_built(out_dir):
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        try:
            with _preserved_rng():
                _build_into(tmp, seed, log or (lambda _msg: None))
            _replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    # os.rename cannot replace a non-empty directory: move the old one aside first, then drop it.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(out: Path, seed: int, log: Callable[[str], None]) -> None:
    # Imported here: keeps `import posttrain.models.embedded` cheap for callers that only read the cache path.
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from ..align.engine import TrainOptions
    from ..align.sft import train_sft
    from ..evaluate.exact_match import evaluate_exact_match
    from ..tasks.arithmetic import make_splits, sft_rows, verifiable_rows
    from .files import give_umask_modes
    from .tokenizer_builder import build_tokenizer

    started = time.perf_counter()
    task, tcfg, mcfg, train_cfg, ecfg = (RECIPE[k] for k in ("task", "tokenizer", "model", "train", "eval"))

    train_items, test_items = make_splits(seed=task["split_seed"], n_train=task["n_train"], n_test=task["n_test"])
    rows = sft_rows(train_items, alt_format_rates=task["alt_format_rates"], seed=seed)
    # The tokenizer's length limit is the model's (transformers warns past it, not past some larger number).
    tokenizer = build_tokenizer((r["prompt"][0]["content"] + "\n" + r["completion"][0]["content"] for r in rows),
                                tcfg["vocab_size"], model_max_length=mcfg["max_position_embeddings"])
    log(f"tokenizer: {len(tokenizer)} tokens from {len(train_items)} training problems")

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **mcfg)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: LlamaForCausalLM, {n_params} parameters")

    options = TrainOptions(seed=seed, **train_cfg)
    every = max(1, options.steps // 10)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % every == 0 or step == options.steps:
            log(f"sft step {step}/{options.steps} loss {metrics['loss']:.4f}"
                + progress_timing(step, options.steps, time.perf_counter() - train_started))

    train_started = time.perf_counter()
    result = train_sft(model, tokenizer, rows, options, on_step=on_step)
    train_seconds = time.perf_counter() - train_started
    model.eval()

    score = evaluate_exact_match(model, tokenizer, verifiable_rows(test_items), batch_size=ecfg["batch_size"],
                                 max_new_tokens=ecfg["max_new_tokens"], samples_path=out / "eval_samples.jsonl")
    log(f"test exact match {score.value:.3f} ({score.correct}/{score.n})")

    # Plain greedy defaults for anyone calling model.generate directly; eos stops, pad is a distinct token.
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False,
                                               max_new_tokens=ecfg["max_new_tokens"])
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    give_umask_modes(out)

    lo, hi = score.ci95
    manifest = {
        "version": VERSION,
        "seed": seed,
        "recipe": RECIPE,
        "tokenizer": {"vocab_size": len(tokenizer)},
        "model": {"class": "LlamaForCausalLM", "parameters": n_params},
        "train": {"rows": result.rows, "steps": result.steps, "final_loss": result.final.get("loss"),
                  "seconds": round(train_seconds, 2)},
        "eval": {"metric": "exact_match", "split": "test", "value": score.value, "n": score.n,
                 "correct": score.correct, "answered": score.answered, "ci95": [lo, hi], "decoding": "greedy",
                 "max_new_tokens": ecfg["max_new_tokens"], "samples": "eval_samples.jsonl"},
        "build_seconds": round(time.perf_counter() - started, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
    }
    # Written last: its presence (with the current VERSION) is what marks the directory as complete.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def embedded_info(seed: int = 0) -> dict[str, Any] | None:
    """The manifest of the cached build for ``seed`` if it exists (never builds)."""
    directory = cache_root() / embedded_dir_name(seed)
    return read_manifest(directory) if is_built(directory) else None
