"""Every compression method the demo's config can ask for, run by the agent pipeline on the embedded model.

Each case drives `posttrain demo` cheaply (one GRPO step, a few evaluation rows, a few distillation steps) with one
`compress.method`, then checks that the compress stage succeeded, that the artifact reloads from disk, and that the
report's compression entry holds the numbers this test re-measures from that artifact (same held-out rows, same
aligned checkpoint). The llm-compressor methods (marked `quant`) run only where it is installed (.venv-quant).
Also here: distillation on each data kind the pipeline trains on, the rows it is given (`as_distillation_rows`),
`compress.options` validation, and a failing method ending the stage with its reason instead of a crash or retries.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from pathlib import Path

import pytest

from posttrain.agents._io import read_jsonl
from posttrain.cli import main
from posttrain.compress.api import PROGRESSIVE_DEFAULTS, compress, heldout_targets, parse_options
from posttrain.compress.measure import artifact_size, compare_on_texts
from posttrain.models.loading import load_model, load_tokenizer

INSTALL_QUANT = "pip install 'posttrain[quant]'"
CHEAP = ["--quiet", "--train.steps", "1", "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2",
         "--grpo.max_new_tokens", "16", "--evaluate.limit", "8", "--evaluate.max_new_tokens", "16"]


def run_demo(tmp_path: Path, capsys, *args: str) -> tuple[int, Path, dict]:
    code = main(["demo", *CHEAP, "--runs_dir", str(tmp_path), *args])
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    return code, run_dir, json.loads((run_dir / "report.json").read_text())


def events(run_dir: Path, type_: str) -> list[dict]:
    con = sqlite3.connect(run_dir / "events.sqlite")
    rows = con.execute("SELECT data FROM events WHERE type = ? ORDER BY seq", (type_,)).fetchall()
    return [json.loads(r[0]) for r in rows]


def reload(artifact: Path):
    from transformers import AutoModelForCausalLM

    if artifact.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(artifact.parent, gguf_file=artifact.name).eval()
    return AutoModelForCausalLM.from_pretrained(artifact).eval()


def check_compressed_run(code: int, run_dir: Path, report: dict, method: str) -> tuple[dict, object]:
    """The stage succeeded; the artifact reloads; the report's numbers are the artifact's, re-measured here."""
    assert code == 0 and report["status"] == "succeeded", report.get("error")
    assert {s["name"]: s["status"] for s in report["stages"]}["compress"] == "succeeded"
    c = report["compression"]
    assert c["method"] == method and c["rejected"] == [] and c["reload_ok"] is True
    artifact = Path(c["path"])
    assert artifact.exists() and c["size_bytes"] == artifact_size(artifact) > 0
    for key in ("perplexity", "base_perplexity", "top1_agreement", "tokens_per_s", "load_seconds"):
        assert isinstance(c[key], float) and math.isfinite(c[key]), key
    aligned_dir = str(run_dir / "checkpoints" / "grpo" / "final")
    aligned, model = load_model(aligned_dir), reload(artifact)
    # The compressor measures on the first 16 held-out rows (agents/compressor.py): verifiable rows, so on the aligned
    # model's greedy completions (compress.heldout_max_new_tokens, 64 by default).
    heldout = read_jsonl(run_dir / "artifacts" / "data" / "eval.jsonl", limit=16)
    targets = heldout_targets(load_tokenizer(aligned_dir), heldout, model=aligned, max_new_tokens=64)
    assert (c["scored_on"], c["scored_rows"], c["max_new_tokens"]) == (
        "aligned_greedy_completions", {"aligned_greedy_completion": 16}, 64)
    ppl, base_ppl, agreement, _ = compare_on_texts(aligned, model, targets)
    assert c["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert c["base_perplexity"] == pytest.approx(base_ppl, rel=1e-6)
    assert c["top1_agreement"] == pytest.approx(agreement, abs=1e-12)
    assert report["accuracy"]["compressed"]["n"] == 8  # the evaluator measured the compressed model too
    (event,) = events(run_dir, "compress.result.v1")
    assert event["details"] == c["details"]
    return c, model


def linear_sparsity(model) -> float:
    from posttrain.compress.prune import DEFAULT_SKIP, sparsity_report

    return sparsity_report(model, DEFAULT_SKIP).overall


def llmcompressor_importable() -> bool:
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------- every method

def check_sparse(c, model, run_dir):
    assert c["details"]["implementation"] == ("llm-compressor" if llmcompressor_importable() else "posttrain")
    assert c["details"]["sparsity"] == linear_sparsity(model) == 0.5  # every row of every pruned layer: half zeros


def check_width(c, model, run_dir):
    assert model.config.intermediate_size == 384  # 512 FFN neurons, a quarter removed
    assert c["details"]["width"]["intermediate_size"] == [512, 384]


def check_depth(c, model, run_dir):
    assert model.config.num_hidden_layers == 1 and c["details"]["depth"]["kept"] in ([0], [1])


def check_distill(c, model, run_dir):
    d = c["details"]
    # Verifiable rows hold only the final answer, so the student learns on the teacher's own completions.
    assert d["steps"] == 2 and d["data"] == {"teacher": 16} and d["student_layers"] == 1
    assert model.config.num_hidden_layers == 1


def check_progressive(c, model, run_dir):
    d = c["details"]
    assert d["steps"] == 3 and d["data"] == {"teacher": 24}
    assert d["temperature"] == {"first": 4.0, "last": 1.0}  # compress.options.distill reached the schedule
    assert d["final"]["temperature"] == 1.0


def check_gguf(c, model, run_dir):
    artifact = Path(c["path"])
    assert artifact.name == "model-q8_0.gguf" and artifact.with_name("model-q8_0.Modelfile").is_file()


TWO_STEPS = ["--compress.options", "{train: {steps: 2}}"]


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,check", [
    ("prune:magnitude:0.5", [], check_sparse),
    ("prune:wanda:0.5", [], check_sparse),
    ("prune:width:0.25", [], check_width),
    ("prune:depth:1", [], check_depth),
    ("distill:logit", TWO_STEPS, check_distill),
    ("distill:feature", TWO_STEPS, check_distill),
    ("distill:progressive", ["--compress.options",
                             "{train: {steps: 3}, distill: {temperature: 4.0, final_temperature: 1.0}}"],
     check_progressive),
    ("gguf:q8_0", [], check_gguf),
])
def test_the_pipeline_runs_each_compression_method(method, extra, check, tmp_path, capsys):
    code, run_dir, report = run_demo(tmp_path, capsys, "--compress.method", method, *extra)
    c, model = check_compressed_run(code, run_dir, report, method)
    check(c, model, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("train_method,source", [("dpo", "chosen"), ("sft", "completion")])
def test_distillation_takes_every_training_data_kind(train_method, source, tmp_path, capsys):
    code = main(["demo", *CHEAP, "--runs_dir", str(tmp_path), "--method", train_method,
                 "--compress.method", "distill:logit", *TWO_STEPS])
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert code == 0 and report["status"] == "succeeded", report.get("error")
    c = report["compression"]
    assert c["method"] == "distill:logit" and Path(c["path"]).is_dir()
    assert c["details"]["data"] == {source: 16} and c["details"]["steps"] == 2
    # The demo's held-out rows stay verifiable whatever trains (only the training rows become pairs/demonstrations),
    # so the artifact is measured on the aligned model's greedy completions.
    assert (c["scored_on"], c["scored_rows"]) == ("aligned_greedy_completions", {"aligned_greedy_completion": 16})


@pytest.mark.quant
@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq", "prune:sparsegpt:2:4", "prune:wanda:0.5"])
def test_the_pipeline_runs_the_llm_compressor_methods(method, tmp_path, capsys):
    pytest.importorskip("llmcompressor", reason="needs the quant extra (llmcompressor), see Makefile")
    code, run_dir, report = run_demo(tmp_path, capsys, "--compress.method", method)
    c, model = check_compressed_run(code, run_dir, report, method)
    artifact = Path(c["path"])
    if method in ("gptq", "awq"):
        qc = json.loads((artifact / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors"
        assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 128  # hidden 128, intermediate 512
        assert c["details"] == {"group_size": 128, "bits": 4} and c["size_bytes"] < c["base_size_bytes"]
    else:
        assert c["details"]["implementation"] == "llm-compressor"
        assert c["details"]["sparsity"] == linear_sparsity(model) == 0.5
    if method == "prune:sparsegpt:2:4":
        from posttrain.compress.prune import check_nm, prunable_linears

        assert all(check_nm(linear.weight, 2, 4) for _, linear in prunable_linears(model))


# ------------------------------------------------------------------------------------------------- failures

@pytest.mark.slow
def test_sparsegpt_without_llm_compressor_fails_the_stage_naming_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # `import llmcompressor` raises ImportError
    code, run_dir, report = run_demo(tmp_path, capsys, "--compress.method", "prune:sparsegpt:2:4")
    assert code == 1 and report["status"] == "failed"
    err = report["error"]
    assert err["agent"] == "compressor"
    assert err["reason"].startswith("stage 'compress' failed after 1 attempt(s): TaskError: prune:sparsegpt:2:4 "
                                    f"failed: llm-compressor is not installed: {INSTALL_QUANT}")
    assert report["compression"] is None


@pytest.mark.slow
def test_an_unexpected_exception_fails_the_stage_once_with_its_reason(tmp_path, capsys, monkeypatch):
    import posttrain.agents.compressor as compressor

    calls = []

    def broken(*args, **kwargs):
        calls.append(args[1])
        raise KeyError("completion")

    monkeypatch.setattr(compressor, "compress", broken)
    code, run_dir, report = run_demo(tmp_path, capsys, "--compress.method", "gguf:q4_0",
                                     "--compress.fallback", "[gguf:q8_0]")
    assert code == 1 and report["status"] == "failed"
    assert report["error"]["agent"] == "compressor"
    assert report["error"]["reason"] == ("stage 'compress' failed after 1 attempt(s): TaskError: gguf:q4_0 failed: "
                                         "KeyError: 'completion'")
    assert calls == ["gguf:q4_0"]  # not retried, and an error is no reason to try the fallback
    notes = [n["text"] for n in events(run_dir, "run.note.v1") if n["level"] == "error"]
    assert len(notes) == 1 and notes[0].startswith("compressor: gguf:q4_0 raised:\nTraceback")
    assert "KeyError: 'completion'" in notes[0]


# ------------------------------------------------------------------------------------------- distillation rows

def test_distillation_rows_of_every_kind(tiny_tokenizer, tiny_model):
    from posttrain.compress.distill import as_distillation_rows
    from posttrain.data.tokenize import encode_prompt
    from posttrain.rollout.generate import generate

    user = [{"role": "user", "content": "Sam has 3 apples and buys 4 more. How many apples?"}]
    said = [{"role": "assistant", "content": "Sam has 3 + 4 = 7.\n#### 7"}]
    other = [{"role": "assistant", "content": "Sam has 3 + 4 = 8.\n#### 8"}]
    rows = [{"prompt": user, "completion": said},
            {"prompt": user, "completion": other, "label": False},
            {"prompt": user, "chosen": said, "rejected": other},
            {"prompt": user, "answer": "7"},
            "Sam has 3 apples."]
    out, sources, dropped = as_distillation_rows(tiny_model, tiny_tokenizer, rows, max_new_tokens=12)
    (teacher,) = generate(tiny_model, tiny_tokenizer, [encode_prompt(tiny_tokenizer, user)], max_new_tokens=12)
    assert teacher.text.strip()  # the random tiny model says something; that is what the student learns on
    assert out == [{"prompt": user, "completion": said}, {"prompt": user, "completion": other},
                   {"prompt": user, "completion": said},
                   {"prompt": user, "completion": [{"role": "assistant", "content": teacher.text}]},
                   "Sam has 3 apples."]
    assert sources == {"completion": 2, "chosen": 1, "teacher": 1, "text": 1} and dropped == {}


def test_a_row_with_nothing_to_distil_on_is_refused_naming_it(tiny_tokenizer, tiny_model):
    from posttrain.compress.distill import as_distillation_rows, encode_rows

    with pytest.raises(ValueError, match=r"^distillation row 2: expected a text or a normalised row .* got "
                                         r"\['answer'\]$"):
        as_distillation_rows(tiny_model, tiny_tokenizer, ["a text", {"answer": "7"}])
    from posttrain.align.engine import TrainOptions

    with pytest.raises(ValueError, match=r"^distillation row 1 has no completion \(got \['answer', 'prompt'\]\)"):
        encode_rows(tiny_tokenizer, [{"prompt": [], "answer": "7"}], TrainOptions())


# ---------------------------------------------------------------------------------------------- options

def test_compress_options_reach_the_distillation_settings():
    options = parse_options({"train": {"steps": 7, "lr": 0.01}, "distill": {"loss": "reverse_kl", "alpha": 0.5}})
    train = options.train_options()
    assert (train.steps, train.lr, train.batch_size) == (7, 0.01, 8)
    settings = options.distill_settings("logit")
    assert (settings.kind, settings.loss, settings.alpha, settings.final_temperature) == ("logit", "reverse_kl", 0.5,
                                                                                          None)
    # distill:progressive anneals by default; a schedule the config sets replaces the default whole.
    assert PROGRESSIVE_DEFAULTS["temperature"] > PROGRESSIVE_DEFAULTS["final_temperature"]
    progressive = parse_options({}).distill_settings("progressive")
    assert (progressive.temperature, progressive.final_temperature) == (PROGRESSIVE_DEFAULTS["temperature"],
                                                                        PROGRESSIVE_DEFAULTS["final_temperature"])
    own = parse_options({"distill": {"temperature": 3.0}}).distill_settings("progressive")
    assert (own.temperature, own.final_temperature) == (3.0, None)  # None: the trainer anneals to 1.0


@pytest.mark.parametrize("options,message", [
    ({"steps": 3}, "compress.options: unknown key 'steps' (a distillation loop setting: compress.options.train."
                   "steps); expected one of distill, group_size, head_fraction, student, student_config, train"),
    ({"temperature": 2}, "compress.options: unknown key 'temperature' (a distillation setting: "
                         "compress.options.distill.temperature); expected one of distill, group_size, "
                         "head_fraction, student, student_config, train"),
    ({"bogus": 1}, "compress.options: unknown key 'bogus'; expected one of distill, group_size, head_fraction, "
                   "student, student_config, train"),
    ({"distill": {"kind": "logit"}}, "compress.options.distill: 'kind' is set by the method "
                                     "(distill:logit|feature|progressive); expected one of "),
    ({"distill": {"tau": 2}}, "compress.options.distill: 'tau' is not a setting; expected one of alpha, beta, "),
    ({"train": {"stepz": 2}}, "compress.options.train: 'stepz' is not a setting; expected one of adam_betas, "),
    ({"train": {"steps": 0}}, "compress.options.train: steps: Input should be greater than or equal to 1"),
    ({"distill": {"temperature": -1}}, "compress.options.distill: temperature: Input should be greater than 0"),
    ({"group_size": "big"}, "compress.options: group_size: Input should be a valid integer"),
])
def test_bad_compress_options_are_refused_naming_the_key(options, message):
    with pytest.raises(ValueError) as info:
        parse_options(options)
    assert str(info.value).startswith(message)


def test_a_bad_compress_option_stops_the_run_before_it_starts(tmp_path, capsys):
    code = main(["demo", "--quiet", "--runs_dir", str(tmp_path), "--compress.options", "{steps: 3}"])
    err = capsys.readouterr().err
    assert code == 2 and "compress.options: unknown key 'steps'" in err
    assert not any(tmp_path.iterdir())


def test_compress_refuses_bad_options_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="compress.options: unknown key 'stepz'"):
        compress("embedded", "distill:logit", tmp_path / "out", [], options={"stepz": 2})
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- reward models

@pytest.mark.slow
def test_the_pipeline_compresses_a_reward_model_and_measures_it_on_pairs(tmp_path, capsys):
    """`posttrain demo --method rm` (int8_rtn by default): the artifact reloads as a reward model, the compressor's
    measurement is its scores on the held-out pairs (re-measured here), perplexity / top-1 / tokens/s are null with
    a note, a top-1 gate that cannot apply says so, and the evaluator measures the compressed reward model."""
    from posttrain.align.reward_model import load_reward_model
    from posttrain.compress.int8 import load_int8
    from posttrain.compress.measure import NOT_FOR_REWARD_MODELS, compare_reward_models, pair_targets

    code, run_dir, report = run_demo(tmp_path, capsys, "--method", "rm", "--compress.min_top1_agreement", "0.9")
    assert code == 0 and report["status"] == "succeeded", report.get("error")
    c = report["compression"]
    assert c["method"] == "int8_rtn" and c["rejected"] == [] and c["reload_ok"] is True
    assert {k: c[k] for k in ("perplexity", "base_perplexity", "top1_agreement", "tokens_per_s", "positions")} == \
        dict.fromkeys(("perplexity", "base_perplexity", "top1_agreement", "tokens_per_s", "positions"))
    assert (c["scored_on"], c["scored_rows"]) == ("preference_pairs", {"pair": 16})
    aligned_dir = run_dir / "checkpoints" / "rm" / "final"
    heldout = read_jsonl(run_dir / "artifacts" / "data" / "eval.jsonl", limit=16)  # the compressor's 16 rows
    targets = pair_targets(load_tokenizer(str(aligned_dir)), heldout)
    assert c["reward"] == compare_reward_models(load_reward_model(str(aligned_dir)).eval(), load_int8(c["path"]),
                                                targets)
    (event,) = events(run_dir, "compress.result.v1")
    assert event["reward"] == c["reward"] and event["accepted"] is True
    notes = [n["text"] for n in report["notes"] if n["source"] == "compressor"]
    assert notes == [f"int8_rtn: {NOT_FOR_REWARD_MODELS}",
                     "int8_rtn: compress.min_top1_agreement not applied: the artifact has no such measure; "
                     "evaluate.gate still checks the compressed model"]
    for model in ("aligned", "compressed"):
        assert report["accuracy"][model]["metric"] == "reward_accuracy" and report["accuracy"][model]["n"] == 8
    md = (run_dir / "report.md").read_text()
    w = c["reward"]
    assert (f"Against the aligned reward model on 16 held-out pairs: preference agreement "
            f"{w['preference_agreement']:.4f}, pairwise accuracy {w['pairwise_accuracy']:.4f} vs "
            f"{w['base_pairwise_accuracy']:.4f}") in md


@pytest.mark.slow
def test_a_failed_compress_still_measures_the_aligned_model(tmp_path, capsys):
    """GGUF cannot hold a reward model's score head: the compress stage fails naming what is supported, the
    aligned model is evaluated anyway (alone), and the run fails with the compress stage's reason."""
    code, run_dir, report = run_demo(tmp_path, capsys, "--method", "rm", "--compress.method", "gguf:q8_0")
    assert code == 1 and report["status"] == "failed"
    aligned_dir = run_dir / "checkpoints" / "rm" / "final"
    err = report["error"]
    assert err["agent"] == "compressor" and err["task"].startswith("compress-")
    assert err["reason"] == ("stage 'compress' failed after 1 attempt(s): TaskError: gguf:q8_0 failed: gguf:q8_0 "
                             f"cannot compress the reward model {aligned_dir} (a sequence-classification "
                             "checkpoint); supported for reward models: int8_rtn")
    assert [(s["name"], s["status"]) for s in report["stages"]] == [
        ("data", "succeeded"), ("select", "succeeded"), ("evaluate_base", "succeeded"), ("train", "succeeded"),
        ("compress", "failed"), ("evaluate", "succeeded")]
    (assigned,) = [e for e in events(run_dir, "task.assigned.v1") if e["stage"] == "evaluate"]
    assert assigned["params"]["models"] == {"aligned": str(aligned_dir)}
    aligned = report["accuracy"]["aligned"]
    assert aligned["metric"] == "reward_accuracy" and aligned["n"] == 8
    assert report["accuracy"]["compressed"] is None and report["compression"] is None
    (finished,) = events(run_dir, "run.finished.v1")
    assert finished["error"] == err


class _StandIn:
    """A stage agent with no model: returns the paths a stage would, or fails the stage `fails` names."""

    subscriptions = ()
    OUTPUTS = {"data": {"kind": "verifiable", "profile": {}, "model": "stand-in", "train_path": "t.jsonl",
                        "eval_path": "e.jsonl", "eval_kind": "verifiable"},
               "selector": {"method": "grpo"}, "trainer": {"checkpoint": "ckpt"}, "compressor": {"path": "c"},
               "evaluator": {"results": {}, "gate_failures": []}}

    def __init__(self, name, fails=None):
        self.name, self.fails, self.assigned = name, fails, []

    def handle(self, env, ctx):
        from posttrain.agents.runtime import TaskError

        if env.type == "task.assigned.v1":
            self.assigned.append(env.data["params"])
            if env.data["stage"] == self.fails:
                raise TaskError(f"{self.name} says no")
            return self.OUTPUTS[self.name]


@pytest.mark.parametrize("evaluate_fails", [False, True])
def test_after_a_failed_compress_the_run_fails_with_its_reason(tmp_path, evaluate_fails):
    from posttrain.agents.coordinator import Coordinator
    from posttrain.config import RunConfig
    from posttrain.run import execute

    config = RunConfig(runs_dir=str(tmp_path), run_timeout_s=30)
    cast = {name: _StandIn(name) for name in _StandIn.OUTPUTS}
    cast["compressor"] = _StandIn("compressor", fails="compress")
    cast["evaluator"] = _StandIn("evaluator", fails="evaluate" if evaluate_fails else None)
    outcome = execute(config, view="quiet", agents={"coordinator": Coordinator(config), **cast})
    assert outcome.status == "failed"
    assert cast["evaluator"].assigned[-1]["models"] == {"aligned": "ckpt"}  # evaluate_base, then aligned alone
    first = "stage 'compress' failed after 1 attempt(s): TaskError: compressor says no"
    err = outcome.report["error"]
    assert err["agent"] == "compressor" and err["task"].startswith("compress-")
    assert err["reason"] == (first + ("; then evaluator failed too: stage 'evaluate' failed after 1 attempt(s): "
                                      "TaskError: evaluator says no" if evaluate_fails else ""))
    assert [(s["name"], s["status"]) for s in outcome.report["stages"]][-2:] == [
        ("compress", "failed"), ("evaluate", "failed" if evaluate_fails else "succeeded")]


def test_a_failed_compress_without_an_evaluate_stage_fails_at_once(tmp_path):
    from posttrain.agents.coordinator import Coordinator
    from posttrain.config import RunConfig
    from posttrain.run import execute

    config = RunConfig(runs_dir=str(tmp_path), run_timeout_s=30, evaluate={"enabled": False})
    cast = {name: _StandIn(name) for name in _StandIn.OUTPUTS}
    cast["compressor"] = _StandIn("compressor", fails="compress")
    outcome = execute(config, view="quiet", agents={"coordinator": Coordinator(config), **cast})
    assert outcome.status == "failed" and cast["evaluator"].assigned == []
    assert outcome.report["error"]["reason"] == "stage 'compress' failed after 1 attempt(s): TaskError: compressor " \
                                                "says no"


def test_gates_whose_measure_does_not_apply_are_not_checked():
    from posttrain.agents.compressor import gate_verdict, gates_not_applied

    reward_model = {"top1_agreement": None, "positions": None, "perplexity": None, "base_perplexity": None}
    assert gate_verdict(reward_model, 0.99, 1.01) is None
    assert gates_not_applied(reward_model, 0.99, 1.01) == ["compress.min_top1_agreement",
                                                           "compress.max_perplexity_ratio"]
    assert gates_not_applied(reward_model, None, None) == []
    lm = {"top1_agreement": 0.9, "positions": 10, "perplexity": 3.0, "base_perplexity": 2.0}
    assert gates_not_applied(lm, 0.99, 1.01) == []
    assert gate_verdict(lm, None, 1.2) == "held-out perplexity 3 is 1.500x the aligned model's 2 (allowed 1.2x)"
