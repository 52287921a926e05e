"""The `posttrain` command line.

    posttrain demo [--quiet | --plain] [--key.sub VALUE ...]     the whole pipeline on the embedded default
    posttrain run CONFIG.yaml [--quiet | --plain] [--key.sub VALUE ...]
    posttrain show RUN            a past run's timeline, from its event log
    posttrain watch RUN           follow a (running) run's live view from its event log
    posttrain runs                the runs under --runs-dir
    posttrain compress --model M --method METHOD [--calibration FILE] --out DIR
    posttrain eval --model M --benchmarks mmlu,gsm8k,... --data-dir DIR [--limit N] [--output FILE.json]
    posttrain embedded build [--force]   (re)build the cached embedded model
    posttrain embedded path              the cached embedded model's directory (built first if needed)

Contract: `demo` and `run` print the run directory's path as the last line of stdout; their exit status is 0 when
the run succeeded, 1 when it failed, 2 for a usage or configuration error. A failed run also says why on stderr,
in one line: `posttrain: run failed: AGENT (TASK): REASON`. `eval` exits 1 when it measured nothing (every
benchmark skipped or without a metric), after writing its JSON with the reasons.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
import threading
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .compress.llmc import QuantExtraMissing  # import-light: llm-compressor itself is imported only when used
from .config import ConfigError, load_config, parse_overrides
from .models.loading import ModelSourceError  # torch is loaded by config already


def _demo_config_path() -> Path:
    return Path(str(resources.files("posttrain") / "configs" / "demo.yaml"))


def _view_mode(args: argparse.Namespace) -> str:
    from .live.terminal import choose_mode

    return choose_mode(args.quiet, args.plain)


def failure_line(report: dict) -> str:
    """`posttrain: run failed: AGENT (TASK): REASON` from a failed run's report, on one line (no task: no parens)."""
    err = report.get("error") or {}
    task = f" ({err['task']})" if err.get("task") else ""
    reason = " ".join(str(err.get("reason") or "no reason was recorded").split())
    return f"posttrain: run failed: {err.get('agent') or 'unknown agent'}{task}: {reason}"


def _cmd_pipeline(args: argparse.Namespace, extra: list[str]) -> int:
    from .report import render_markdown
    from .run import execute

    config_path = _demo_config_path() if args.command == "demo" else Path(args.config)
    try:
        overrides = parse_overrides(extra)
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"posttrain: {exc}", file=sys.stderr)
        return 2
    console = Console()
    outcome = execute(config, view=_view_mode(args), console=console)
    if not args.quiet:
        if console.is_terminal:
            from rich.markdown import Markdown

            console.print(Markdown(render_markdown(outcome.report)))
        else:
            print(render_markdown(outcome.report))
    code = {"SIGINT": 130, "SIGTERM": 143}.get(outcome.interrupted or "", 0 if outcome.status == "succeeded" else 1)
    if outcome.status != "succeeded":
        print(failure_line(outcome.report), file=sys.stderr, flush=True)
    if outcome.abandoned_agents:
        print(f"posttrain: abandoning busy agent thread(s): {', '.join(outcome.abandoned_agents)}", file=sys.stderr,
              flush=True)
    print(outcome.run_dir, flush=True)  # the contract: the run directory is the last line of stdout
    if outcome.abandoned_agents:
        # A thread still inside a torch call cannot be joined, and letting the interpreter tear it down aborts the
        # process; everything is logged and reported, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _resolve_run(run: str, runs_dir: str) -> Path:
    path = Path(run)
    if path.name == "events.sqlite" and path.is_file():
        return path.parent
    if (path / "events.sqlite").exists():
        return path
    candidate = Path(runs_dir) / run
    if (candidate / "events.sqlite").exists():
        return candidate
    if candidate == path:  # an absolute RUN, or --runs-dir . : one place was looked at, say it once
        raise FileNotFoundError(f"no run {run!r}: {path} holds no events.sqlite")
    raise FileNotFoundError(f"no run {run!r}: neither {path} nor {candidate} holds an events.sqlite")


def _cmd_show(args: argparse.Namespace) -> int:
    from .timeline import format_timeline

    print(format_timeline(_resolve_run(args.run, args.runs_dir)), end="")  # the timeline ends with its own newline
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from .live.terminal import LiveView

    run_dir = _resolve_run(args.run, args.runs_dir)
    LiveView(run_dir / "events.sqlite", mode=_view_mode(args)).run_until_finished(timeout_s=args.timeout)
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from .timeline import list_runs

    runs = list_runs(args.runs_dir)
    if not runs:
        print(f"no runs under {args.runs_dir}")
        return 0
    print(_runs_line("run", "status", "method", "wall", "directory"))
    for r in runs:
        wall = f"{r['wall_s']:.1f}s" if r.get("wall_s") is not None else "-"
        print(_runs_line(r["run_id"], r["status"], str(r.get("method") or "-"), wall, str(r["dir"])))
    return 0


def _runs_line(run_id: str, status: str, method: str, wall: str, directory: str) -> str:
    """One line of `posttrain runs`, the header included: the same columns, so the header sits over them."""
    return f"{run_id:<40} {status:<11} {method:<6} {wall:>8}  {directory}"


def _humaneval_sampling(num_samples: int | None, ks: str | None, names: list[str]) -> dict:
    """HumanEval's `num_samples` / `ks` options from the flags, refused (ValueError) before any model loads."""
    if num_samples is None and ks is None:
        return {}
    if "humaneval" not in names:
        raise ValueError("--num-samples and --ks apply to humaneval, which is not in --benchmarks")
    n = 1 if num_samples is None else num_samples
    if n < 1:
        raise ValueError(f"--num-samples must be at least 1, got {n}")
    options: dict = {"num_samples": n}
    if ks is not None:
        values = []
        for item in (k.strip() for k in ks.split(",")):
            try:
                values.append(int(item))
            except ValueError:
                raise ValueError(f"--ks must be comma-separated integers such as 1,10; got {item!r}") from None
        for k in values:
            if k < 1:
                raise ValueError(f"--ks {k}: k must be at least 1")
            if k > n:  # the unbiased estimator needs at least k samples per problem
                raise ValueError(f"--ks {k} exceeds --num-samples {n}: pass@{k} needs at least {k} samples per "
                                 "problem")
        options["ks"] = values
    return options


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluate.harness import generation_cap, run_benchmarks
    from .models.loading import load_model, load_tokenizer, resolve_device

    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    options: dict = {"allow_code_execution": args.allow_code_execution,
                     **_humaneval_sampling(args.num_samples, args.ks, names)}
    if args.judge:
        options["judge"] = args.judge
    if args.judge_base_url:
        options["judge_base_url"] = args.judge_base_url
    if args.num_fewshot is not None:
        options["num_fewshot"] = args.num_fewshot
    if args.chat_template:
        options["chat_template"] = True
    if args.max_new_tokens is not None:  # one cap for every generative benchmark (and the MT-Bench judge)
        options.update(generation_cap(args.max_new_tokens))
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, trust_remote_code=args.trust_remote_code).to(resolve_device(args.device))
    output = Path(args.output)
    samples = output.with_name(output.stem + ".samples.jsonl")
    console = Console(stderr=True)

    def progress(name: str, done: int, total: int) -> None:
        if not args.quiet:
            console.print(escape(f"[{name}] {done}/{total}"), highlight=False)  # "[name]" is text, not markup

    result = run_benchmarks(model, tokenizer, names, data_dir=args.data_dir, limit=args.limit, seed=args.seed,
                            batch_size=args.batch_size, options=options, samples_path=samples,
                            model_name=args.model, progress=progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    for name, metrics in result["results"].items():
        for metric, m in metrics.items():
            ci = (f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m["ci_low"] is not None else " (no interval)")
            print(f"{name:<16} {metric:<24} {m['value']:.4f}  n={m['n']}{ci}")
        if not metrics:
            why = "; ".join(n for n in result["notes"].get(name, []) if "not measured" in n) or "see the notes"
            print(f"{name:<16} no metric: {why}")
    for name, reason in result["skipped"].items():
        print(f"{name:<16} skipped: {reason}")
    print(output, flush=True)
    if not any(result["results"].values()):
        # Every benchmark was skipped or produced no metric: a run that measured nothing has not succeeded.
        skipped = list(result["skipped"])
        empty = [name for name, metrics in result["results"].items() if not metrics]
        why = "; ".join(([f"skipped: {', '.join(skipped)}"] if skipped else [])
                        + ([f"no metric from: {', '.join(empty)}"] if empty else []))
        print(f"posttrain: nothing was measured ({why}); the reasons are printed above and recorded in {output}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    import json

    from .compress.api import check_supported, compress, parse_method

    method = parse_method(args.method)  # an unknown method is refused before any data or model is read
    try:
        check_supported(args.method, args.model)  # e.g. a reward model takes int8_rtn only
    except NotImplementedError as exc:  # says what is supported
        print(f"posttrain: {exc}", file=sys.stderr)
        return 2
    if method.family == "gguf":
        from .compress.gguf_export import LLAMA_CPP_TYPES, find_llama_quantizer

        if method.variant.upper() in LLAMA_CPP_TYPES:
            try:
                find_llama_quantizer()
            except RuntimeError as exc:  # no llama.cpp quantizer (see find_llama_quantizer): say what to install
                print(f"posttrain: {exc}", file=sys.stderr)
                return 2
    if args.calibration:
        from .data import prepare

        rows = list(prepare(args.calibration, drop_empty=True).rows)
    elif args.model == "embedded" or _is_embedded_build(args.model):
        from .tasks import arithmetic

        train, test = arithmetic.make_splits(seed=0)
        rows = arithmetic.sft_rows(train[:256]) + arithmetic.sft_rows(test[:8])  # the last 8: held out (test split)
    else:
        raise ValueError("--calibration FILE is needed (prompts with completions, pairs or demonstrations)")
    if len(rows) < 16:
        raise ValueError(f"need at least 16 calibration rows (8 are held out to measure the artifact), got {len(rows)}")
    options: dict = {}
    if args.student:
        options["student"] = args.student
    if args.student_config:
        options["student_config"] = args.student_config
    if args.group_size:
        options["group_size"] = args.group_size
    if args.steps:
        options["train"] = {"steps": args.steps}
    try:
        result = compress(args.model, args.method, args.out, rows[:-8], heldout=rows[-8:], options=options)
    except NotImplementedError as exc:  # a model this method does not handle (e.g. an architecture GGUF lacks)
        print(f"posttrain: {exc}", file=sys.stderr)
        return 2
    for note in result["notes"]:
        print(f"posttrain: note: {note}", file=sys.stderr)
    print(json.dumps({k: result[k] for k in ("method", "artifact", "size_bytes", "base_size_bytes", "perplexity",
                                             "base_perplexity", "top1_agreement", "tokens_per_s",
                                             "tokens_per_s_repeats", "seconds")}
                     | ({"reward": result["reward"]} if result["reward"] else {})))
    print(Path(args.out) / "compression.json", flush=True)
    return 0


def _is_embedded_build(model: str) -> bool:
    """True for a directory holding a build of the embedded model (its `embedded.json`): the same model as the name
    `embedded`, so the same default calibration (its own task)."""
    from .models.embedded import read_manifest

    return read_manifest(model) is not None


def _cmd_embedded(args: argparse.Namespace) -> int:
    from .models.embedded import embedded_model_dir

    def progress(message: str) -> None:  # to stderr, so stdout stays the one path line scripts read
        print(f"posttrain: embedded: {message}", file=sys.stderr, flush=True)

    path = embedded_model_dir(force=getattr(args, "force", False), log=progress)  # --force: build's option only
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="Agent-orchestrated post-training of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("demo", "run the whole pipeline on the embedded default"),
                            ("run", "run the pipeline described by a YAML config")):
        p = sub.add_parser(name, help=help_text,
                           description=f"{help_text}. Any config key can be overridden: --train.lr 1e-4")
        if name == "run":
            p.add_argument("config", help="path to a YAML run config")
        p.add_argument("--quiet", action="store_true", help="no live view and no report on stdout")
        p.add_argument("--plain", action="store_true", help="one line per event instead of the live view")
    for name, help_text in (("show", "print a past run's timeline"), ("watch", "follow a run's live view")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run", help="run id (under --runs-dir) or run directory")
        p.add_argument("--runs-dir", default="runs")
        if name == "watch":
            p.add_argument("--quiet", action="store_true")
            p.add_argument("--plain", action="store_true")
            p.add_argument("--timeout", type=float, default=None, help="stop watching after this many seconds")
    p = sub.add_parser("eval", help="score a model on standard benchmarks (lm-eval / FastChat methodology)")
    p.add_argument("--model", required=True, help="'embedded', a local HF directory or a hub id")
    p.add_argument("--benchmarks", required=True,
                   help="comma-separated: mmlu,arc_easy,arc_challenge,gsm8k,truthfulqa_mc1,truthfulqa_mc2,humaneval,"
                        "mt_bench")
    p.add_argument("--data-dir", default=None, help="a folder laid out like ../shared/datasets (default: the HF hub)")
    p.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many items per benchmark")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", default="eval_results.json", help="JSON results; samples go next to it")
    p.add_argument("--num-fewshot", type=int, default=None, help="override the benchmark's standard shot count")
    p.add_argument("--chat-template", action="store_true", help="render prompts through the model's chat template")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="HumanEval: run model-written code (sandboxed child processes); off by default")
    p.add_argument("--num-samples", type=int, default=None,
                   help="HumanEval: samples per problem (default 1: greedy; n > 1: sampled, temperature 0.2, top_p "
                        "0.95)")
    p.add_argument("--ks", default=None,
                   help="HumanEval: comma-separated k for pass@k, e.g. 1,10, each at most --num-samples (default "
                        "1,10,100, those <= n)")
    p.add_argument("--judge", default=None, help="MT-Bench judge: self | local:PATH | openai:MODEL")
    p.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint for --judge openai:MODEL "
                                                          "(key from $OPENAI_API_KEY)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap generation length for gsm8k, humaneval and mt_bench (default: each benchmark's standard)")
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("compress", help="quantize, prune or distill a model; the artifact is reloaded and measured")
    p.add_argument("--model", required=True, help="'embedded' or a local HF directory")
    p.add_argument("--method", required=True, help="int8_rtn | gptq | awq | gguf:f16|q8_0|q4_0|q4_k_m|... | "
                   "prune:magnitude:0.5 | prune:wanda:0.5 | prune:sparsegpt:2:4 | prune:width:0.25 | prune:depth:1 | "
                   "distill:logit|feature|progressive")
    p.add_argument("--calibration", default=None, help="data file for calibration / distillation (default for the "
                                                       "embedded model: its own task)")
    p.add_argument("--out", required=True, help="output directory (artifact/ and compression.json)")
    p.add_argument("--student", default=None, help="distillation: an initial student checkpoint")
    p.add_argument("--student-config", default=None, help="distillation: a config (dir or json) for a fresh student")
    p.add_argument("--group-size", type=int, default=None, help="GPTQ/AWQ group size (default 128)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default 50)")
    p = sub.add_parser("runs", help="list runs")
    p.add_argument("--runs-dir", default="runs")
    p = sub.add_parser("embedded", help="the embedded default model")
    # Subcommands, not a choice argument: `posttrain embedded build --help` then names itself in its usage line.
    actions = p.add_subparsers(dest="action", metavar="{build,path}", required=True)
    b = actions.add_parser("build", help="build the embedded model (once; then cached)",
                           description="build the embedded model (once; then cached) and print its directory")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    actions.add_parser("path", help="print the embedded model's directory (building it first if needed)",
                       description="print the embedded model's directory (building it first if needed)")
    return parser


def _quiet_libraries() -> None:
    """Our own views report progress; the libraries' progress bars and advisories would drown them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("demo", "run"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        if args.command in ("demo", "run"):
            return _cmd_pipeline(args, extra)
        if args.command == "show":
            return _cmd_show(args)
        if args.command == "watch":
            return _cmd_watch(args)
        if args.command == "runs":
            return _cmd_runs(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "compress":
            return _cmd_compress(args)
        return _cmd_embedded(args)
    # QuantExtraMissing names the install command; ModelSourceError names the model path or id and what was expected
    except (FileNotFoundError, ValueError, QuantExtraMissing, ModelSourceError) as exc:
        print(f"posttrain: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        where = f" ({getattr(args, 'run', '')}/events.sqlite)" if getattr(args, "run", None) else ""
        print(f"posttrain: cannot read the event log{where}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `posttrain show RUN | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
