"""The real preference and feedback files in ../shared/datasets load, validate and train for a few steps on the
embedded model, tokenized with its own tokenizer, for each offline technique (SFT, reward model with its score
head, DPO, IPO, SimPO, ORPO, KTO), and every trainable parameter changes; LoRA runs through the whole pipeline and
saves adapter + merge."""

import math

import pytest
import torch

from posttrain.align.engine import TrainOptions
from posttrain.align.kto import KTOSettings, train_kto
from posttrain.align.preference import PreferenceSettings, train_preference
from posttrain.align.reward_model import load_reward_model, train_reward_model
from posttrain.align.sft import train_sft
from posttrain.data import prepare
from posttrain.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.slow

FILES = [("ultrafeedback/train_clean.jsonl", "preference", "dpo"),
         ("pairwise_demo/dpo_en_demo.json", "preference", "orpo"),
         ("hh_rlhf/helpful-base/test.jsonl.gz", "preference", "ipo"),
         ("kto/kto_en_demo.json", "unpaired", "kto"),
         ("pairwise_demo/dpo_en_demo.json", "preference", "simpo"),
         ("hh_rlhf/helpful-base/test.jsonl.gz", "preference", "rm"),
         # SFT on the chosen responses (the usual step before preference tuning): no SFT-only file is shipped.
         ("hh_rlhf/helpful-base/test.jsonl.gz", "preference", "sft")]


@pytest.mark.parametrize("path,kind,method", FILES)
def test_real_file_trains_on_the_embedded_model(path, kind, method, datasets_dir):
    tokenizer = load_tokenizer("embedded")
    data = prepare(str(datasets_dir / path), tokenizer=tokenizer, drop_empty=True)
    assert data.kind == kind and len(data.rows) > 100
    model = load_model("embedded")
    if method == "rm":  # the embedded backbone under a fresh score head, which must train too
        model = load_reward_model(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    options = TrainOptions(steps=2, batch_size=4, lr=1e-4, max_length=256, max_prompt_length=128)
    rows = data.rows[:32]
    if method == "kto":
        result = train_kto(model, tokenizer, rows, options, KTOSettings())
    elif method == "sft":
        result = train_sft(model, tokenizer, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows],
                           options)
    elif method == "rm":
        result = train_reward_model(model, tokenizer, rows, options)
        assert result.model is model and "score.weight" in before
    else:
        result = train_preference(model, tokenizer, rows, options, PreferenceSettings(method=method))
    assert result.steps == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    assert all(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())


def test_lora_through_the_pipeline_saves_adapter_and_merged_model(tmp_path, capsys):
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from posttrain.cli import main

    code = main(["demo", "--quiet", "--method", "dpo", "--train.steps", "2", "--lora", "{r: 4, alpha: 8}",
                 "--runs_dir", str(tmp_path), "--evaluate.limit", "16"])
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert code == 0 and report["status"] == "succeeded", report.get("error")
    ckpt = run_dir / "checkpoints" / "dpo"
    assert (ckpt / "adapter" / "adapter_config.json").exists()
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(ckpt / "merged")
    assert report["accuracy"]["aligned"]["n"] == 16
