"""One side of `bench/preference.py`: trains one method with posttrain or with TRL (the peer) and writes a JSON result.

    python bench/_preference_side.py --side posttrain|peer --spec SPEC.json --out RESULT.json

Runs in its own process so that the peak RSS (`ru_maxrss` of this process) belongs to one side only. The posttrain side
runs with posttrain's venv and never imports TRL; the peer side runs with the peer venv (`bench/.venv-peer`) and never
imports posttrain. Both sides read the same spec: model directory, chat template, rows (already in the order the
peer's sequential sampler must consume them), steps, batch, lr, max_length, threads, seed and the method settings.

Timing: a timestamp is taken at the end of every optimizer step (posttrain's `on_step`, the peer's `on_step_end`);
throughput is measured from the end of step `skip_steps` to the end of the last step, so model loading,
tokenization, trainer construction and the first (warm-up) steps are excluded on both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _median_step_rate(step_ends: list[float], batch: int, skip: int) -> float | None:
    """batch / median step duration over the timed steps: less sensitive to a transient stall on a shared machine."""
    gaps = sorted(b - a for a, b in zip(step_ends[max(skip - 1, 0):], step_ends[max(skip, 1):]))
    if not gaps:
        return None
    mid = len(gaps) // 2
    median = gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2
    return batch / median if median > 0 else None


def _throughput(step_ends: list[float], batch: int, skip: int) -> tuple[float | None, float | None, int]:
    """(samples/s, seconds, steps timed) between the end of step `skip` and the end of the last step."""
    if len(step_ends) <= skip:
        return None, None, 0
    start = step_ends[skip - 1] if skip > 0 else None
    if start is None:
        return None, None, 0
    timed = len(step_ends) - skip
    seconds = step_ends[-1] - start
    return (timed * batch / seconds if seconds > 0 else None), seconds, timed


def _load(spec: dict, kind: str = "causal") -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if spec.get("chat_template"):
        tok.chat_template = spec["chat_template"]
    torch.manual_seed(spec["seed"])
    if kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1,
                                                                   dtype=torch.float32)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    # Dropout off on both sides (TRL's disable_dropout does the same on its side; the tiny Llama has none anyway).
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()  # off on both sides (TRL's config says so on its side)
    return model, tok


# ---------------------------------------------------------------------------------------------- posttrain ----------
def run_posttrain(spec: dict) -> dict:
    import torch

    from posttrain.align.engine import TrainOptions

    method = spec["method"]
    s = spec["settings"]
    options = TrainOptions(steps=spec["steps"], batch_size=spec["batch"], grad_accum=1, lr=spec["lr"],
                           weight_decay=0.0, warmup_steps=0, schedule="constant", max_grad_norm=1.0,
                           max_length=spec["max_length"], seed=spec["seed"])
    model, tok = _load(spec, "reward" if method == "reward" else "causal")
    rows = spec["rows_posttrain"]
    step_ends: list[float] = []
    history: list[dict] = []

    def on_step(step: int, metrics: dict) -> None:
        step_ends.append(time.perf_counter())
        history.append(dict(metrics))

    rss_setup = _peak_rss_mb()
    started = time.perf_counter()
    if method == "sft":
        from posttrain.align.sft import train_sft
        result = train_sft(model, tok, rows, options, on_step=on_step)
    elif method in ("dpo", "ipo", "simpo", "orpo"):
        from posttrain.align.preference import PreferenceSettings, train_preference
        settings = PreferenceSettings(method=method, beta=s.get("beta"), gamma=s.get("gamma", 0.5),
                                      reference="copy")
        result = train_preference(model, tok, rows, options, settings, on_step=on_step)
    elif method == "kto":
        result = _posttrain_kto(model, tok, rows, options, s, on_step)
    elif method == "reward":
        result = _posttrain_reward(model, tok, rows, options, s, on_step)
    else:
        raise ValueError(f"unknown method {method!r}")
    total = time.perf_counter() - started
    sps, secs, timed = _throughput(step_ends, spec["batch"], spec["skip_steps"])
    dropped = dict(getattr(result, "dropped", {}) or {})
    first = history[0] if history else {}
    return {
        "side": "posttrain", "method": method,
        "median_step_samples_per_s": _median_step_rate(step_ends, spec["batch"], spec["skip_steps"]),
        "loadavg_end": os.getloadavg()[0], "steps": len(history), "samples_per_s": sps, "timed_s": secs,
        "timed_steps": timed, "train_call_s": total, "peak_rss_mb": _peak_rss_mb(), "rss_before_train_mb": rss_setup,
        "losses": [h.get("loss") for h in history], "grad_norms": [h.get("grad_norm") for h in history],
        "first_metrics": {k: v for k, v in first.items() if isinstance(v, (int, float))},
        "dropped": dropped, "torch_threads": torch.get_num_threads(),
    }


def _call_with_settings(fn: Any, settings_cls: Any, values: dict, model: Any, tok: Any, rows: Any, options: Any,
                        on_step: Any) -> Any:
    import dataclasses
    import inspect

    params = inspect.signature(fn).parameters
    kwargs: dict = {}
    if "on_step" in params:
        kwargs["on_step"] = on_step
    if settings_cls is not None:
        names = ({f.name for f in dataclasses.fields(settings_cls)} if dataclasses.is_dataclass(settings_cls)
                 else set(getattr(settings_cls, "model_fields", {}) or inspect.signature(settings_cls).parameters))
        settings = settings_cls(**{k: v for k, v in values.items() if k in names})
        return fn(model, tok, rows, options, settings, **kwargs)
    for k, v in values.items():
        if k in params:
            kwargs[k] = v
    return fn(model, tok, rows, options, **kwargs)


def _posttrain_kto(model: Any, tok: Any, rows: list, options: Any, s: dict, on_step: Any) -> Any:
    from posttrain.align import kto

    settings_cls = getattr(kto, "KTOSettings", None)
    values = {"beta": s.get("beta", 0.1), "desirable_weight": s.get("desirable_weight", 1.0),
              "undesirable_weight": s.get("undesirable_weight", 1.0), "reference": "copy"}
    return _call_with_settings(kto.train_kto, settings_cls, values, model, tok, rows, options, on_step)


def _posttrain_reward(model: Any, tok: Any, rows: list, options: Any, s: dict, on_step: Any) -> Any:
    from posttrain.align import reward_model as rm

    fn = next((getattr(rm, n) for n in ("train_reward_model", "train_reward", "train_rm") if hasattr(rm, n)), None)
    if fn is None:
        raise RuntimeError("posttrain.align.reward_model has no train_reward_model/train_reward function")
    settings_cls = next((getattr(rm, n) for n in ("RewardSettings", "RewardModelSettings") if hasattr(rm, n)), None)
    return _call_with_settings(fn, settings_cls, {}, model, tok, rows, options, on_step)


# ---------------------------------------------------------------------------------------------- peer (TRL) ---------
def run_peer(spec: dict) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    method = spec["method"]
    s = spec["settings"]
    model, tok = _load(spec, "reward" if method == "reward" else "causal")
    dataset = Dataset.from_list(spec["rows_peer"])
    step_ends: list[float] = []
    logs: dict[int, dict] = {}

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                logs_by_step = logs_store.setdefault(state.global_step, {})
                logs_by_step.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    logs_store = logs
    out_dir = tempfile.mkdtemp(prefix="peer-")
    common = dict(output_dir=out_dir, per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
                  max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no",
                  report_to="none", disable_tqdm=True, gradient_checkpointing=False, bf16=False, fp16=False,
                  use_cpu=True, seed=spec["seed"], dataloader_num_workers=0, train_sampling_strategy="sequential",
                  max_length=spec["max_length"])
    if method == "sft":
        cfg = trl.SFTConfig(**common, packing=False)
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    elif method in ("dpo", "ipo"):
        cfg = trl.DPOConfig(**common, beta=s["beta"], loss_type=["sigmoid" if method == "dpo" else "ipo"],
                            precompute_ref_log_probs=False)
        trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    elif method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        cfg = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, beta=s["beta"], simpo_gamma=s["gamma"])
        trainer = CPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        cfg = ORPOConfig(**common, beta=s["beta"])
        trainer = ORPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    elif method == "kto":
        cfg = trl.KTOConfig(**common, beta=s.get("beta", 0.1), desirable_weight=s.get("desirable_weight", 1.0),
                            undesirable_weight=s.get("undesirable_weight", 1.0), precompute_ref_log_probs=False)
        trainer = trl.KTOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    elif method == "reward":
        cfg = trl.RewardConfig(**common)
        trainer = trl.RewardTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    else:
        raise ValueError(f"unknown method {method!r}")
    trainer.add_callback(Recorder())
    rss_setup = _peak_rss_mb()
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    sps, secs, timed = _throughput(step_ends, spec["batch"], spec["skip_steps"])
    steps = sorted(logs)
    first = logs.get(1, {})
    return {
        "side": "peer", "method": method,
        "median_step_samples_per_s": _median_step_rate(step_ends, spec["batch"], spec["skip_steps"]),
        "loadavg_end": os.getloadavg()[0], "steps": len(step_ends), "samples_per_s": sps, "timed_s": secs,
        "timed_steps": timed, "train_call_s": total, "peak_rss_mb": _peak_rss_mb(), "rss_before_train_mb": rss_setup,
        "losses": [logs[k].get("loss") for k in steps], "grad_norms": [logs[k].get("grad_norm") for k in steps],
        "first_metrics": first, "torch_threads": torch.get_num_threads(), "optim": str(cfg.optim),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }


# ---------------------------------------------------------------------------------------------- profiling ----------
# Where a side's time goes: cProfile buckets (posttrain only: the names are posttrain's) and a torch-op summary
# (both sides), as shares of the whole train call (tokenization and reference set-up included, model loading not).
_BUCKETS = {
    # bucket: (file suffix, function name) pairs whose cumulative times are added
    "tokenize_before_loop": [("align/sft.py", "encode_sft_rows"), ("align/preference.py", "encode_pairs"),
                             ("align/kto.py", "encode_unpaired"), ("align/reward_model.py", "_encode")],
    "reference_setup": [("align/reference.py", "make_reference"), ("align/reference.py", "run_frozen")],
    "collate": [("data/collate.py", "collate_completions"), ("data/collate.py", "collate_masked")],
    "all_forwards": [("align/logprobs.py", "token_logprobs"), ("align/reward_model.py", "sequence_scores")],
    "reference_forward": [("align/reference.py", "sequence_logprobs"), ("align/reference.py", "token_logprobs")],
    "backward": [("torch/_tensor.py", "backward")],
    "clip_grad_norm": [("nn/utils/clip_grad.py", "clip_grad_norm_")],
    "optimizer_step": [("optim/adamw.py", "step"), ("optim/adam.py", "step")],
    "zero_grad": [("optim/optimizer.py", "zero_grad")],
}


def _cprofile_buckets(stats: Any, total: float) -> dict:
    out = {}
    for bucket, keys in _BUCKETS.items():
        ct = 0.0
        for (filename, _line, func), (_cc, _nc, _tt, cum, _callers) in stats.stats.items():
            if any(filename.endswith(suffix) and func == name for suffix, name in keys):
                ct += cum
        if keys:
            out[bucket] = round(ct / total, 4) if total else None
    if "all_forwards" in out and "reference_forward" in out:
        out["policy_forward"] = round(out["all_forwards"] - out["reference_forward"], 4)
    return out


def _op_summary(prof: Any, vocab: int, total_s: float) -> dict:
    """Shares of the train call in matmuls, in matmuls touching the vocabulary dimension (the LM head, forward and
    backward; the score head of a reward model is tiny), in optimizer kernels, and the top self-time ops."""
    mm = head = 0.0
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"):
            t = ev.self_cpu_time_total / 1e6
            mm += t
            if any(isinstance(shape, (list, tuple)) and vocab in shape for shape in (ev.input_shapes or [])):
                head += t
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"matmul_share": round(mm / total_s, 4), "lm_head_matmul_share": round(head / total_s, 4),
            "top_ops_self_s": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in ops}}


def run_profiled(side: str, spec: dict) -> dict:
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = run_posttrain if side == "posttrain" else run_peer
    profiler = cProfile.Profile()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        profiler.enable()
        result = runner(spec)
        profiler.disable()
    total = result["train_call_s"]
    stats = pstats.Stats(profiler)
    with open(spec["model_dir"] + "/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    result["profile"] = {"train_call_s": round(total, 3), **_op_summary(prof, vocab, total)}
    if side == "posttrain":
        result["profile"]["cprofile_shares"] = _cprofile_buckets(stats, total)
    top = sorted(((v[3], f"{Path(k[0]).name}:{k[2]}") for k, v in stats.stats.items()
                  if "/posttrain/" in k[0] or "/trl/" in k[0]), reverse=True)[:12]
    result["profile"]["top_cumulative_s"] = {name: round(ct, 3) for ct, name in top}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=["posttrain", "peer"], required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile", action="store_true", help="add cProfile and torch-profiler shares (slower)")
    args = parser.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    import torch

    torch.set_num_threads(spec["threads"])
    if args.profile:
        result = run_profiled(args.side, spec)
    else:
        result = run_posttrain(spec) if args.side == "posttrain" else run_peer(spec)
    result["pid"] = os.getpid()
    result["python"] = sys.executable
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
