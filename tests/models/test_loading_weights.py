"""The loaders never hand back weights transformers initialised at random: a posttrain int8 artifact loads through
`compress.int8.load_int8` (transformers alone drops its `*.qweight` / `*.scale` tensors and re-initialises every
linear, silently), and a checkpoint lacking a weight is refused naming the path and the weight. Tied weights and the
fresh score head of a reward model built from a causal LM are not missing weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_llama  # tests/ is on sys.path (the rootdir conftest's folder)

from posttrain.align.engine import save_pretrained
from posttrain.align.reward_model import load_reward_model, reward_model_from_causal_lm
from posttrain.cli import main
from posttrain.compress.int8 import Int8Linear, load_int8, quantize_model_to_dir
from posttrain.models.loading import ModelSourceError, UninitialisedWeightsError, load_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
MISSING = "model.layers.0.self_attn.k_proj.weight"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def drop_weight(directory: Path, name: str) -> None:
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors[name]
    save_file(tensors, str(weights), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def int8_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    return quantize_model_to_dir(make_tiny_llama(tiny_tokenizer, seed=3), tiny_tokenizer,
                                 tmp_path_factory.mktemp("int8") / "artifact")


@pytest.fixture(scope="module")
def int8_rm_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(4)
    rm = reward_model_from_causal_lm(make_tiny_llama(tiny_tokenizer, seed=4))
    return quantize_model_to_dir(rm, tiny_tokenizer, tmp_path_factory.mktemp("int8rm") / "artifact")


def test_load_model_of_an_int8_artifact_computes_with_its_int8_weights(int8_dir):
    model = load_model(str(int8_dir))
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == len(json.loads((int8_dir / "quantization.json").read_text())["linears"]) > 0
    assert not model.training
    assert torch.equal(logits(model), logits(load_int8(int8_dir)))


def test_load_model_of_an_int8_artifact_casts_only_the_float_tensors(int8_dir):
    model = load_model(str(int8_dir), dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {m.qweight.dtype for m in model.modules() if isinstance(m, Int8Linear)} == {torch.int8}
    reference = load_int8(int8_dir).to(dtype=torch.bfloat16)
    assert torch.equal(logits(model), logits(reference))


def test_posttrain_eval_scores_the_int8_artifact_not_a_random_model(int8_dir, tmp_path, monkeypatch, capsys):
    """`posttrain eval --model <int8 artifact>` hands the benchmarks the model load_int8 rebuilds."""
    from posttrain.evaluate import harness

    seen = []

    def run_benchmarks(model, tokenizer, names, **kw):
        seen.append(model)
        return {"results": {"arc_easy": {}}, "skipped": {}, "notes": {}}

    monkeypatch.setattr(harness, "run_benchmarks", run_benchmarks)
    main(["eval", "--model", str(int8_dir), "--benchmarks", "arc_easy", "--device", "cpu",
          "--output", str(tmp_path / "eval.json"), "--quiet"])
    (model,) = seen
    assert torch.equal(logits(model), logits(load_int8(int8_dir)))


def test_an_int8_artifact_without_its_marker_is_refused_not_randomised(int8_dir, tmp_path):
    """Without quantization.json transformers would load it as a plain checkpoint: every linear missing."""
    import shutil

    copy = shutil.copytree(int8_dir, tmp_path / "artifact")
    (copy / "quantization.json").unlink()
    with pytest.raises(UninitialisedWeightsError) as info:
        load_model(str(copy))
    message = str(info.value)
    n = len(json.loads((int8_dir / "quantization.json").read_text())["linears"])  # every linear's weight
    assert message.startswith(f"{copy}: the checkpoint lacks {n} weight(s) of LlamaForCausalLM, which loading would "
                              "initialise at random: lm_head.weight, model.layers.0.mlp.down_proj.weight, ")
    assert f"({n} in all); it has instead lm_head.qweight, lm_head.scale, model.layers.0.mlp.down_proj.qweight, ..." \
        in message


def test_a_checkpoint_missing_a_weight_is_refused_naming_path_and_weight(tiny_tokenizer, tmp_path):
    directory = save_pretrained(make_tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "ckpt")
    drop_weight(directory, MISSING)
    with pytest.raises(UninitialisedWeightsError) as info:
        load_model(str(directory))
    assert str(info.value) == (f"{directory}: the checkpoint lacks 1 weight(s) of LlamaForCausalLM, which loading "
                               f"would initialise at random: {MISSING} (expected a complete checkpoint of this "
                               "architecture, as save_pretrained writes)")
    assert isinstance(info.value, ModelSourceError)  # the CLI's one-line exit 2; an agent does not retry it


def test_posttrain_eval_of_an_incomplete_checkpoint_exits_2_naming_it(tiny_tokenizer, tmp_path, capsys):
    directory = save_pretrained(make_tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "ckpt")
    drop_weight(directory, MISSING)
    code = main(["eval", "--model", str(directory), "--benchmarks", "arc_easy", "--output",
                 str(tmp_path / "eval.json"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"posttrain: {directory}: the checkpoint lacks 1 weight(s) of LlamaForCausalLM")
    assert not (tmp_path / "eval.json").exists()


def test_tied_weights_are_not_missing(tiny_tokenizer, tmp_path):
    model = make_tiny_llama(tiny_tokenizer)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    directory = save_pretrained(model, tiny_tokenizer, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(directory / "model.safetensors"))
    loaded = load_model(str(directory))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_load_model_refuses_an_int8_reward_model(int8_rm_dir):
    with pytest.raises(ModelSourceError, match=r"an int8-quantized reward model .*load_reward_model$"):
        load_model(str(int8_rm_dir))


def test_load_reward_model_of_an_int8_reward_artifact_scores_with_its_int8_weights(int8_rm_dir, tiny_tokenizer):
    model = load_reward_model(str(int8_rm_dir))
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    reference = load_int8(int8_rm_dir)
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        want = reference(input_ids=IDS).logits
    assert torch.equal(got, want)


def test_load_reward_model_refuses_an_int8_causal_lm(int8_dir):
    with pytest.raises(ModelSourceError, match=r"an int8-quantized causal LM artifact, not a reward model"):
        load_reward_model(str(int8_dir))


def test_a_reward_checkpoint_missing_its_score_head_is_refused(tiny_tokenizer, tmp_path):
    rm = reward_model_from_causal_lm(make_tiny_llama(tiny_tokenizer))
    directory = save_pretrained(rm, tiny_tokenizer, tmp_path / "rm")
    drop_weight(directory, "score.weight")
    with pytest.raises(UninitialisedWeightsError, match=r"lacks 1 weight\(s\) of LlamaForSequenceClassification, "
                                                        r"which loading would initialise at random: score.weight "):
        load_reward_model(str(directory))


def test_a_reward_model_from_a_causal_lm_checkpoint_gets_its_fresh_head(tiny_tokenizer, tmp_path):
    """Training a reward model from a causal LM legitimately creates the head; a missing backbone weight does not."""
    directory = save_pretrained(make_tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "lm")
    rm = load_reward_model(str(directory))
    assert rm.score.out_features == 1
    drop_weight(directory, MISSING)
    with pytest.raises(UninitialisedWeightsError) as info:
        load_reward_model(str(directory))
    assert str(info.value) == (f"{directory}: the checkpoint lacks 1 weight(s) of LlamaForSequenceClassification, "
                               f"which loading would initialise at random: {MISSING} (expected a complete checkpoint "
                               "of this architecture, as save_pretrained writes)")  # lm_head: dropped, as documented


def test_the_evaluator_agent_loads_int8_artifacts_through_the_loaders(int8_dir, int8_rm_dir, tmp_path):
    from posttrain.agents.evaluator import EvaluatorAgent
    from posttrain.config import RunConfig

    agent = EvaluatorAgent(RunConfig(), tmp_path)
    model, _ = agent._load(str(int8_dir))
    assert torch.equal(logits(model), logits(load_int8(int8_dir)))
    reward, _ = agent._load(str(int8_rm_dir))
    with torch.no_grad():
        assert torch.equal(reward(input_ids=IDS).logits, load_int8(int8_rm_dir)(input_ids=IDS).logits)
