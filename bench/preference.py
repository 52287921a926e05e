"""posttrain vs TRL (the peer), side by side: throughput, peak RSS and first-batch loss per alignment method.

    .venv/bin/python bench/preference.py [--methods sft,dpo,ipo,simpo,orpo,kto,reward] [--steps 20] [--batch 8]
                                         [--repeats 3] [--threads 2] [--lr 1e-4] [--max-length 128]

Prints one JSON line per method (and a line for each method it skipped, saying why), then a summary line. See
docs/benchmarks.md for what is measured, how the two sides are aligned and the last measured numbers.

- Same model on both sides: the oracle's tiny Llama (`/work/shared/oracle/tiny/policy`, fp32, `from_pretrained`), the
  same eos-terminated chat template set on the tokenizer of both sides, conversational rows (messages) built from the
  oracle's tiny datasets, the same steps, batch, lr (constant, no warm-up), max_length, grad clip 1.0, seed and torch
  threads; gradient checkpointing off, dropout off, no eval, no checkpoints, the peer logging every step.
- Identical batches: posttrain reshuffles its rows with its own seeded sampler; the rows it will consume are computed
  here with posttrain's own `cycle_batches` and handed to the peer in that order, with the peer's sampler set to
  `train_sampling_strategy="sequential"`. So step k sees the same rows on both sides.
- Each side of each method runs in its own subprocess (`bench/_preference_side.py`) so the peak RSS is per side;
  the sides alternate (posttrain A, peer A, posttrain B, peer B, ...) and the whole round is repeated `--repeats`
  times; throughput and RSS are the medians over repeats.
- TRL is not a dependency of posttrain: the peer runs in its own venv (`bench/.venv-peer`, git-ignored), created on
  first use with torch==2.13.0 first (the CPU build on disk), then trl==1.16.0 and transformers==5.25.0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))  # run from a checkout whether or not posttrain is pip-installed

ORACLE = Path(os.environ.get("POSTTRAIN_ORACLE", str(REPO.parent / "shared" / "oracle")))
PEER_VENV = HERE / ".venv-peer"
PEER_PINS = {"torch": "2.13.0", "trl": "1.16.0", "transformers": "5.25.0"}
ALL_METHODS = ["sft", "dpo", "ipo", "simpo", "orpo", "kto", "reward"]
PAIRWISE = {"dpo", "ipo", "simpo", "orpo", "reward"}

# The oracle template ends every turn with "<eos>\n". TRL's CPO/ORPO (experimental, old `build_tokenized_answer`
# path) append an EOS to any answer not ending in EOS, so with that template they would train on "… <eos>\n<eos>"
# while posttrain, TRL DPO/KTO/SFT train on "… <eos>\n". This variant puts the newline *before* the next turn instead,
# so every completion ends with exactly one EOS on every trainer of both sides. It is prefix-preserving.
BENCH_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
)

# Settings per method; the SimPO values are the paper's (posttrain's defaults), set explicitly on TRL's CPO.
SETTINGS = {
    "sft": {},
    "dpo": {"beta": 0.1},
    "ipo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma": 0.5},
    "orpo": {"beta": 0.1},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "reward": {},
}

NOTES = {
    "sft": "completion-only token-mean NLL on both (TRL SFT default loss_type chunked_nll, same math)",
    "dpo": "sigmoid loss, beta 0.1, reference = frozen copy of the initial policy on both; step-1 loss is ln 2 on "
           "both by construction, so grad norm and the step-2 loss are the informative checks",
    "ipo": "length-averaged log-ratios on both (TRL DPO loss_type ipo), tau 0.1; step-1 loss is 1/(4 tau^2) = 25 on "
           "both by construction; pairs whose chosen/rejected share a leading completion token were filtered out of "
           "the data because posttrain moves a common prefix into the prompt before averaging and TRL does not",
    "simpo": "TRL CPOTrainer(loss_type=simpo, cpo_alpha=0) with posttrain's paper defaults beta 2, gamma 0.5; "
             "common-prefix pairs filtered out (see ipo)",
    "orpo": "objectives differ on purpose: posttrain's NLL term covers completion tokens only, TRL's covers "
            "prompt+completion; the odds-ratio term (loss minus NLL) and rewards/chosen are compared instead",
    "kto": "beta 0.1, lambda_D = lambda_U = 1, KL pairs by rotation (i-1) within the micro-batch on both; step-1 "
           "loss is 0.5 on both by construction",
    "reward": "Bradley-Terry on a sequence-classification head (score head initialised from the same seed)",
}


# ------------------------------------------------------------------------------------------------ peer venv --------
def ensure_peer_venv(venv: Path, log=print) -> Path:
    """The peer's python; creates the venv (torch CPU first, then trl + transformers) when it is missing."""
    py = venv / "bin" / "python"
    probe = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
             f"{list(PEER_PINS)!r}}}))")
    if py.exists():
        got = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if got.returncode == 0:
            versions = json.loads(got.stdout)
            if all(versions.get(p, "").split("+")[0] == v for p, v in PEER_PINS.items()):
                return py
    log(json.dumps({"event": "peer_venv", "action": "create", "path": str(venv)}), flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    # torch first and pinned: the CPU build on disk; a looser pin would pull a multi-GB CUDA build.
    subprocess.run(pip + [f"torch=={PEER_PINS['torch']}"], check=True)
    subprocess.run(pip + [f"trl=={PEER_PINS['trl']}", f"transformers=={PEER_PINS['transformers']}"], check=True)
    return py


# ------------------------------------------------------------------------------------------------ data -------------
def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def build_rows(method: str, tokenizer) -> tuple[list[dict], dict]:
    """Conversational rows for `method` and facts about them (filtered count, token lengths)."""
    from posttrain.data.tokenize import encode_completion, encode_prompt

    data = ORACLE / "tiny" / "data"
    info: dict = {}
    if method == "sft":
        rows = [{"prompt": _user(r["prompt"]), "completion": _assistant(r["completion"])}
                for r in _read_jsonl(data / "sft.jsonl")]
        lengths = [len(encode_completion(tokenizer, r["prompt"], r["completion"]).input_ids) for r in rows]
    elif method == "kto":
        rows = [{"prompt": _user(r["prompt"]), "completion": _assistant(r["completion"]), "label": bool(r["label"])}
                for r in _read_jsonl(data / "kto.jsonl")]
        lengths = [len(encode_completion(tokenizer, r["prompt"], r["completion"]).input_ids) for r in rows]
        info["desirable"] = sum(r["label"] for r in rows)
    else:
        raw = _read_jsonl(data / "preference.jsonl")
        rows, lengths, filtered = [], [], 0
        for r in raw:
            row = {"prompt": _user(r["prompt"]), "chosen": _assistant(r["chosen"]),
                   "rejected": _assistant(r["rejected"])}
            p = encode_prompt(tokenizer, row["prompt"])
            c = encode_completion(tokenizer, row["prompt"], row["chosen"], prompt_ids=p)
            j = encode_completion(tokenizer, row["prompt"], row["rejected"], prompt_ids=p)
            if c.completion_ids[0] == j.completion_ids[0]:
                filtered += 1  # a shared leading token: posttrain would move it into the prompt (pitfall 20)
                continue
            rows.append(row)
            lengths += [len(c.input_ids), len(j.input_ids)]
        info["pairs_filtered_common_prefix"] = filtered
    info["rows"] = len(rows)
    info["seq_tokens_mean"] = round(statistics.mean(lengths), 1)
    info["seq_tokens_max"] = max(lengths)
    return rows, info


def consumption_order(n: int, batch: int, steps: int, seed: int) -> list[int]:
    """Indices of the rows posttrain's sampler feeds, in order, for `steps` micro-batches of `batch`."""
    from posttrain.align.batching import cycle_batches

    batches = cycle_batches(list(range(n)), batch, seed)
    return [i for _ in range(steps) for i in next(batches)]


# ------------------------------------------------------------------------------------------------ running ----------
def run_side(side: str, python: str, spec_path: Path, out_dir: Path, tag: str, env: dict, timeout: float,
             profile: bool = False) -> dict:
    out = out_dir / f"{tag}-{side}.json"
    cmd = [python, str(HERE / "_preference_side.py"), "--side", side, "--spec", str(spec_path), "--out", str(out)]
    if profile:
        cmd.append("--profile")
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout or "")[-2000:]
        return {"error": f"{side} exited {proc.returncode}", "stderr_tail": tail, "process_wall_s": wall}
    result = json.loads(out.read_text())
    result["process_wall_s"] = wall
    return result


def _median(values: list) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


def _at(values: list | None, i: int):
    return values[i] if values and len(values) > i else None


def summarise(method: str, pt_runs: list[dict], peer_runs: list[dict], spec: dict, info: dict) -> dict:
    pt_ok = [r for r in pt_runs if "error" not in r]
    peer_ok = [r for r in peer_runs if "error" not in r]
    line: dict = {"method": method}
    pt_sps = _median([r["samples_per_s"] for r in pt_ok])
    peer_sps = _median([r["samples_per_s"] for r in peer_ok])
    pt0 = pt_ok[0] if pt_ok else {}
    peer0 = peer_ok[0] if peer_ok else {}
    pt_first, peer_first = _at(pt0.get("losses"), 0), _at(peer0.get("losses"), 0)
    diff = abs(pt_first - peer_first) if pt_first is not None and peer_first is not None else None
    comparable = method != "orpo"
    line.update({
        "posttrain_samples_per_s": _r(pt_sps, 2), "peer_samples_per_s": _r(peer_sps, 2),
        "ratio": _r(pt_sps / peer_sps, 3) if pt_sps and peer_sps else None,
        "posttrain_peak_rss_mb": _r(_median([r["peak_rss_mb"] for r in pt_ok]), 1),
        "peer_peak_rss_mb": _r(_median([r["peak_rss_mb"] for r in peer_ok]), 1),
        "posttrain_first_loss": _r(pt_first, 6), "peer_first_loss": _r(peer_first, 6),
        "loss_abs_diff": _r(diff, 8), "comparable": comparable,
        "first_loss_agrees_1e-4": (diff is not None and diff <= 1e-4) if comparable else None,
        "posttrain_first_grad_norm": _r(_at(pt0.get("grad_norms"), 0), 5),
        "peer_first_grad_norm": _r(_at(peer0.get("grad_norms"), 0), 5),
        "posttrain_step2_loss": _r(_at(pt0.get("losses"), 1), 6), "peer_step2_loss": _r(_at(peer0.get("losses"), 1), 6),
        "posttrain_last_loss": _r(_at(pt0.get("losses"), -1), 6), "peer_last_loss": _r(_at(peer0.get("losses"), -1), 6),
        "steps": spec["steps"], "batch": spec["batch"], "timed_steps": pt0.get("timed_steps"),
        "max_length": spec["max_length"], "lr": spec["lr"], "threads": spec["threads"],
        "repeats": len(pt_runs), "posttrain_runs_samples_per_s": [_r(r.get("samples_per_s"), 2) for r in pt_ok],
        "peer_runs_samples_per_s": [_r(r.get("samples_per_s"), 2) for r in peer_ok],
        "posttrain_median_step_samples_per_s": _r(_median([r.get("median_step_samples_per_s") for r in pt_ok]), 2),
        "peer_median_step_samples_per_s": _r(_median([r.get("median_step_samples_per_s") for r in peer_ok]), 2),
        "loadavg_1min_max": _r(max([r.get("loadavg_end", 0.0) for r in pt_ok + peer_ok] or [0.0]), 2),
        "posttrain_rss_before_train_mb": _r(_median([r["rss_before_train_mb"] for r in pt_ok]), 1),
        "peer_rss_before_train_mb": _r(_median([r["rss_before_train_mb"] for r in peer_ok]), 1),
        **info,
    })
    if method == "orpo" and pt0 and peer0:
        beta = spec["settings"]["beta"]
        fm, pm = pt0.get("first_metrics", {}), peer0.get("first_metrics", {})
        # posttrain: loss = mean(-avg_c) + beta*L_OR and rewards/chosen = beta*mean(avg_c)  =>  beta*L_OR = loss + r_c/beta
        pt_or = pt_first + fm["rewards/chosen"] / beta if "rewards/chosen" in fm else None
        peer_or = -beta * pm["log_odds_ratio"] if "log_odds_ratio" in pm else None
        line.update({"posttrain_odds_ratio_term": _r(pt_or, 6), "peer_odds_ratio_term": _r(peer_or, 6),
                     "odds_ratio_term_abs_diff": _r(abs(pt_or - peer_or), 8) if None not in (pt_or, peer_or) else None,
                     "posttrain_rewards_chosen": _r(fm.get("rewards/chosen"), 6),
                     "peer_rewards_chosen": _r(pm.get("rewards/chosen"), 6),
                     "posttrain_nll_completion_only": _r(-fm["rewards/chosen"] / beta, 6) if "rewards/chosen" in fm else None,
                     "peer_nll_prompt_and_completion": _r(pm.get("nll_loss"), 6)})
    if method in ("simpo", "orpo") and pt0 and peer0:
        fm, pm = pt0.get("first_metrics", {}), peer0.get("first_metrics", {})
        line.setdefault("posttrain_rewards_chosen", _r(fm.get("rewards/chosen"), 6))
        line.setdefault("peer_rewards_chosen", _r(pm.get("rewards/chosen"), 6))
    if peer0.get("optim"):
        line["peer_optim"] = peer0["optim"]
    errors = [r for r in pt_runs + peer_runs if "error" in r]
    if errors:
        line["errors"] = [{k: e[k] for k in ("error", "stderr_tail")} for e in errors[:2]]
    line["notes"] = NOTES.get(method, "")
    if not comparable:
        line["comparable_reason"] = "NLL term scope differs (posttrain: completion tokens; TRL: prompt+completion)"
    return line


def method_available(method: str) -> tuple[bool, str]:
    import importlib.util

    module = {"kto": "posttrain.align.kto", "reward": "posttrain.align.reward_model"}.get(method)
    if module is None:
        return True, ""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return False, f"{module} does not exist in this checkout"
    if method == "reward":
        import importlib

        rm = importlib.import_module(module)
        if not any(hasattr(rm, n) for n in ("train_reward_model", "train_reward", "train_rm")):
            return False, f"{module} has no train_reward_model/train_reward function"
    return True, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides (1: robust on a shared 2-core machine)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--skip-steps", type=int, default=2, help="steps excluded from timing (warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-venv", default=str(PEER_VENV))
    parser.add_argument("--timeout", type=float, default=900, help="seconds per side process")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed rounds, run each side once more under cProfile + torch.profiler and "
                             "print where the time goes (not used for the throughput numbers)")
    parser.add_argument("--keep", help="keep the specs and per-process results in this folder")
    args = parser.parse_args()
    if args.steps <= args.skip_steps:
        parser.error("--steps must exceed --skip-steps")

    import torch
    import transformers
    from transformers import AutoTokenizer

    peer_py = ensure_peer_venv(Path(args.peer_venv))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    print(json.dumps({"event": "setup", "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                      "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_1min": os.getloadavg()[0], "python": platform.python_version(),
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "peer": {k: v for k, v in PEER_PINS.items()}, "posttrain_python": sys.executable,
                      "peer_python": str(peer_py), "model": str(ORACLE / "tiny" / "policy")}), flush=True)

    tokenizer = AutoTokenizer.from_pretrained(str(ORACLE / "tiny" / "policy"))
    tokenizer.chat_template = BENCH_CHAT_TEMPLATE
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-preference-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0", "HF_DATASETS_CACHE": str(work / "hf-datasets"),
                "PYTHONPATH": os.pathsep.join([str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))})
    peer_env = dict(env)
    peer_env.pop("PYTHONPATH")  # the peer must never see posttrain

    specs: dict[str, Path] = {}
    infos: dict[str, dict] = {}
    for method in methods:
        ok, why = method_available(method)
        if not ok:
            print(json.dumps({"method": method, "skipped": True, "reason": why}), flush=True)
            continue
        rows, info = build_rows(method, tokenizer)
        order = consumption_order(len(rows), args.batch, args.steps, args.seed)
        if method == "kto" and len(order) > len(rows):
            info["note_order"] = ("more rows consumed than exist: posttrain's KTO sampler keeps micro-batch rows "
                                  "distinct across the epoch boundary, so later batches may differ from the peer's")
        spec = {"method": method, "model_dir": str(ORACLE / "tiny" / "policy"), "chat_template": BENCH_CHAT_TEMPLATE,
                "steps": args.steps, "batch": args.batch, "lr": args.lr, "max_length": args.max_length,
                "threads": args.threads, "seed": args.seed, "skip_steps": args.skip_steps,
                "settings": SETTINGS[method], "rows_posttrain": rows, "rows_peer": [rows[i] for i in order]}
        path = work / f"spec-{method}.json"
        path.write_text(json.dumps(spec))
        specs[method], infos[method] = path, info

    runs: dict[str, dict[str, list]] = {m: {"posttrain": [], "peer": []} for m in specs}
    for rep in range(args.repeats):
        for method, path in specs.items():
            for side, py, side_env in (("posttrain", sys.executable, env), ("peer", str(peer_py), peer_env)):
                runs[method][side].append(run_side(side, py, path, work, f"{method}-{rep}", side_env, args.timeout))

    lines = []
    for method, path in specs.items():
        spec = json.loads(path.read_text())
        line = summarise(method, runs[method]["posttrain"], runs[method]["peer"], spec, infos[method])
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.profile:
        for method, path in specs.items():
            prof = {}
            for side, py, side_env in (("posttrain", sys.executable, env), ("peer", str(peer_py), peer_env)):
                r = run_side(side, py, path, work, f"{method}-profile", side_env, args.timeout, profile=True)
                prof[side] = r.get("profile") or {"error": r.get("error"), "stderr_tail": r.get("stderr_tail")}
                prof[side]["samples_per_s_under_profiler"] = _r(r.get("samples_per_s"), 2)
            print(json.dumps({"event": "profile", "method": method, **prof}), flush=True)
    ratios = {l["method"]: l["ratio"] for l in lines}
    print(json.dumps({"event": "summary", "ratios_posttrain_over_peer": ratios,
                      "ratio_below_1.5": [m for m, r in ratios.items() if r is not None and r < 1.5],
                      "posttrain_slower_than_peer": [m for m, r in ratios.items() if r is not None and r < 1.0],
                      "results_dir": str(work) if args.keep else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
