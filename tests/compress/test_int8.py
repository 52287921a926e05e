"""Int8 RTN artifacts: causal LMs and reward models (sequence classification) are written, reloaded as the class
that was quantized and measured the way that applies to them; unsupported method / model pairs are refused naming
what is supported; the files get the mode the umask gives (safetensors alone writes 0600)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_llama  # tests/ is on sys.path (the rootdir conftest's folder)
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from posttrain.align.engine import save_pretrained
from posttrain.align.reward_model import load_reward_model, reward_model_from_causal_lm, sequence_scores
from posttrain.cli import main
from posttrain.compress.api import compress, measurement_targets
from posttrain.compress.int8 import Int8Linear, is_int8_artifact, load_int8, quantize_model_to_dir, quantize_tensor
from posttrain.compress.measure import NOT_FOR_REWARD_MODELS, PairTargets, compare_reward_models, pair_targets
from posttrain.evaluate.pairwise import evaluate_pairwise
from posttrain.models.loading import UninitialisedWeightsError, load_model, weights_size_bytes


def pairs(n: int) -> list[dict]:
    """Normalised preference rows: the right sum chosen, a wrong one rejected."""
    out = []
    for a in range(n):
        b = (7 * a) % 11
        question = [{"role": "user", "content": f"Sam has {a} apples and buys {b} more. How many apples?"}]
        out.append({"prompt": question,
                    "chosen": [{"role": "assistant", "content": f"Sam has {a} + {b} = {a + b}.\n#### {a + b}"}],
                    "rejected": [{"role": "assistant", "content": f"Sam has {a} + {b} = {a + b + 1}.\n#### "
                                                                  f"{a + b + 1}"}]})
    return out


@pytest.fixture(scope="module")
def rm_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny reward model checkpoint (LlamaForSequenceClassification, one label), as train_reward_model saves it."""
    torch.manual_seed(1)
    rm = reward_model_from_causal_lm(make_tiny_llama(tiny_tokenizer, hidden=64))
    return save_pretrained(rm, tiny_tokenizer, tmp_path_factory.mktemp("rm") / "rm")


def dequantized_copy(model: torch.nn.Module, skip: set[str]) -> torch.nn.Module:
    """`model` with every linear weight but `skip` replaced by q * s, computed here from quantize_tensor."""
    import copy

    ref = copy.deepcopy(model)
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in skip:
            q, s = quantize_tensor(module.weight)
            module.weight.data = q.float() * s[:, None]
    return ref


def test_a_reward_model_reloads_as_a_reward_model_with_its_float_score_head(rm_dir, tiny_tokenizer, tmp_path):
    rm = load_reward_model(str(rm_dir)).eval()
    out = quantize_model_to_dir(rm, tiny_tokenizer, tmp_path / "int8")
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["float_modules"] == ["score"] and "score" not in meta["linears"]
    assert len(meta["linears"]) == 14  # 2 layers x (q, k, v, o, gate, up, down): the backbone's linears
    assert is_int8_artifact(out)
    back = load_int8(out)
    assert type(back) is LlamaForSequenceClassification and back.config.num_labels == 1
    assert type(back.score) is torch.nn.Linear and torch.equal(back.score.weight, rm.score.weight)
    assert all(isinstance(back.get_submodule(name), Int8Linear) for name in meta["linears"])
    # The reloaded model computes with exactly the quantized weights: it scores as the dequantized reference does.
    targets = pair_targets(tiny_tokenizer, pairs(8))
    from posttrain.align.preference import collate_pairs

    batch = collate_pairs(targets.pairs, targets.pad)
    with torch.no_grad():
        got = sequence_scores(back, batch)
        want = sequence_scores(dequantized_copy(rm, {"score"}), batch)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_the_quantized_class_is_the_one_reloaded(rm_dir, tiny_tokenizer, tmp_path):
    """A causal LM loaded from a reward model's checkpoint keeps the checkpoint's architectures in its config; the
    artifact must name the class that was quantized, or the reload asks for a score head it never had. (load_model
    refuses that checkpoint: its lm_head would be random; the causal LM is built from the checkpoint's config.)"""
    from transformers import AutoConfig

    with pytest.raises(UninitialisedWeightsError, match=r"lacks 1 weight\(s\) of LlamaForCausalLM, .*: lm_head.weight"):
        load_model(str(rm_dir))
    lm = LlamaForCausalLM(AutoConfig.from_pretrained(rm_dir)).eval()
    assert lm.config.architectures == ["LlamaForSequenceClassification"]
    out = quantize_model_to_dir(lm, tiny_tokenizer, tmp_path / "int8")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert type(load_int8(out)) is LlamaForCausalLM
    assert lm.config.architectures == ["LlamaForSequenceClassification"]  # the model's own config is untouched


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifact_files_get_the_mode_the_umask_gives(tiny_tokenizer, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = quantize_model_to_dir(make_tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "int8")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert modes == {name: 0o666 & ~umask for name in modes}


def test_compressing_a_reward_model_measures_its_scores_on_held_out_pairs(rm_dir, tiny_tokenizer, tmp_path):
    rows = pairs(24)
    report = compress(str(rm_dir), "int8_rtn", tmp_path / "out", rows[:16], heldout=rows[16:])
    assert report == json.loads((tmp_path / "out" / "compression.json").read_text())
    artifact = Path(report["artifact"])
    assert report["size_bytes"] == weights_size_bytes(artifact) < report["base_size_bytes"] == weights_size_bytes(
        rm_dir)
    # What does not apply to a reward model is null, and the notes say why; never a number.
    assert {k: report[k] for k in ("perplexity", "base_perplexity", "top1_agreement", "tokens_per_s", "positions",
                                   "max_new_tokens")} == dict.fromkeys(("perplexity", "base_perplexity",
                                                                        "top1_agreement", "tokens_per_s",
                                                                        "positions", "max_new_tokens"))
    assert report["notes"] == [NOT_FOR_REWARD_MODELS]
    assert (report["scored_on"], report["scored_rows"]) == ("preference_pairs", {"pair": 8})
    # The reward numbers are those of the artifact on disk, re-measured here ...
    base, back = load_reward_model(str(rm_dir)).eval(), load_int8(artifact)
    assert report["reward"] == compare_reward_models(base, back, pair_targets(tiny_tokenizer, rows[16:]))
    # ... and agree with the evaluator's own pairwise accuracy of each model on those rows.
    w = report["reward"]
    assert w["pairs"] == 8
    assert w["base_pairwise_accuracy"] == evaluate_pairwise(base, tiny_tokenizer, rows[16:], reward_model=True).value
    assert w["pairwise_accuracy"] == evaluate_pairwise(back, tiny_tokenizer, rows[16:], reward_model=True).value
    assert 0 < w["mean_abs_score_diff"] <= w["max_abs_score_diff"]


def test_reward_model_measurement_targets_are_its_pairs(rm_dir):
    targets = measurement_targets(str(rm_dir), pairs(4))
    assert isinstance(targets, PairTargets) and targets.scored_rows == {"pair": 4}


def test_a_reward_model_is_measured_on_pairs_only(tiny_tokenizer):
    demo = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    with pytest.raises(ValueError, match=r"^held-out row 3: measuring a reward model needs preference pairs "
                                         r"\('prompt', 'chosen', 'rejected'\), got \['completion', 'prompt'\]$"):
        pair_targets(tiny_tokenizer, [*pairs(2), demo])


@pytest.mark.parametrize("method", ["gguf:q8_0", "gptq", "prune:magnitude:0.5", "distill:logit"])
def test_other_methods_refuse_a_reward_model_before_writing_anything(rm_dir, tmp_path, method):
    with pytest.raises(NotImplementedError) as info:
        compress(str(rm_dir), method, tmp_path / "out", pairs(16))
    assert str(info.value) == (f"{method} cannot compress the reward model {rm_dir} (a sequence-classification "
                               "checkpoint); supported for reward models: int8_rtn")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_unsupported_method_for_a_reward_model_in_one_line(rm_dir, tmp_path, capsys):
    code = main(["compress", "--model", str(rm_dir), "--method", "gguf:q8_0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"posttrain: gguf:q8_0 cannot compress the reward model {rm_dir} (a sequence-classification "
                   "checkpoint); supported for reward models: int8_rtn"]
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_architecture_gguf_does_not_export_in_one_line(tiny_tokenizer, tmp_path, capsys):
    """A NotImplementedError from the method (here: GGUF export of GPT-2) is one line and status 2, not a
    traceback."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2,
                                      n_positions=128))
    src = save_pretrained(gpt2, tiny_tokenizer, tmp_path / "gpt2")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in pairs(16)))
    code = main(["compress", "--model", str(src), "--method", "gguf:q8_0", "--calibration", str(calib), "--out",
                 str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("posttrain:")]
    assert code == 2
    assert err == ["posttrain: architecture ['GPT2LMHeadModel'] is not exported (supported: LlamaForCausalLM, "
                   "MistralForCausalLM, Qwen2ForCausalLM)"]


def test_cli_compresses_a_reward_model_with_int8(rm_dir, tmp_path, capsys):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in pairs(24)))
    code = main(["compress", "--model", str(rm_dir), "--method", "int8_rtn", "--calibration", str(calib), "--out",
                 str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out.strip().splitlines()
    report = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert json.loads(out[-2]) == {**{k: report[k] for k in ("method", "artifact", "size_bytes", "base_size_bytes",
                                                            "perplexity", "base_perplexity", "top1_agreement",
                                                            "tokens_per_s", "tokens_per_s_repeats", "seconds")},
                                  "reward": report["reward"]}
    assert f"posttrain: note: {NOT_FOR_REWARD_MODELS}" in captured.err.splitlines()
