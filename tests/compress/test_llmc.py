"""posttrain.compress.llmc against llm-compressor itself (the `quant` extra; `make test` runs these in .venv-quant).

The model is a tiny Llama (hidden 128, tied embeddings like the embedded model) fine-tuned a few SFT steps on the
arithmetic task, so its logits are peaky and quantization error shows in them. Calibration and held-out texts are
disjoint draws of the same task. Errors are logit MSE against the float model, averaged over real tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("llmcompressor", reason="needs the quant extra (llmcompressor), see Makefile")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from posttrain.align.engine import TrainOptions  # noqa: E402
from posttrain.align.sft import train_sft  # noqa: E402
from posttrain.compress import llmc  # noqa: E402
from posttrain.models.tokenizer_builder import build_tokenizer  # noqa: E402
from posttrain.tasks.arithmetic import make_splits, sft_rows  # noqa: E402

pytestmark = pytest.mark.quant

N_CALIB, SEQ = 32, 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    train, test = make_splits(seed=0, n_train=400, n_test=2 * N_CALIB)
    tokenizer = build_tokenizer((it["question"] + "\n" + it["answer"] for it in train), vocab_size=400)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    result = train_sft(model, tokenizer, sft_rows(train),
                       TrainOptions(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, max_length=SEQ))
    assert result.final["loss"] < 0.5 * result.history[0]["loss"]
    model.eval()
    root = tmp_path_factory.mktemp("llmc")
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    outliers = root / "outliers"
    outlier_model = inject_outlier_channels(LlamaForCausalLM.from_pretrained(base).eval())
    outlier_model.save_pretrained(outliers)
    tokenizer.save_pretrained(outliers)
    calib, held_out = sft_rows(test[:N_CALIB]), sft_rows(test[N_CALIB:])
    return SimpleNamespace(root=root, base=base, outliers=outliers, tokenizer=tokenizer, calib=calib,
                           held_out=held_out, reference=model)


def inject_outlier_channels(model, channels: int = 8, factor: float = 20.0):
    """Scale `channels` RMSNorm channels per norm by `factor` and divide the matching input columns of the linears
    reading that norm by the same factor: the function is unchanged, but those channels now carry large activations
    over small weights (what AWQ and Wanda are built for)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                                  (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])]:
                idx = torch.randperm(norm.weight.numel(), generator=gen)[:channels]
                norm.weight[idx] *= factor
                for linear in readers:
                    linear.weight[:, idx] /= factor
    return model


def batch_of(tokenizer, rows) -> dict[str, torch.Tensor]:
    seqs = [llmc.calibration_ids(tokenizer, row, SEQ) for row in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: real positions never attend to pads
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits.float()


def logit_mse(model, reference, batch) -> float:
    diff = (logits_of(model, batch) - logits_of(reference, batch)) ** 2
    return diff.mean(-1)[batch["attention_mask"].bool()].mean().item()


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_outlier_injection_keeps_the_function(tiny):
    batch = batch_of(tiny.tokenizer, tiny.held_out)
    torch.testing.assert_close(logits_of(load(tiny.outliers), batch), logits_of(tiny.reference, batch),
                               rtol=1e-4, atol=1e-4)


def test_gptq_beats_rtn_and_writes_pack_quantized(tiny):
    kw = dict(group_size=32, num_samples=N_CALIB, max_seq_length=SEQ)
    rtn = llmc.quantize_rtn(tiny.base, tiny.root / "rtn", **kw)
    gptq = llmc.quantize_gptq(tiny.base, tiny.root / "gptq", tiny.calib, **kw)
    assert gptq == tiny.root / "gptq"
    batch = batch_of(tiny.tokenizer, tiny.held_out)
    mse_rtn, mse_gptq = logit_mse(load(rtn), tiny.reference, batch), logit_mse(load(gptq), tiny.reference, batch)
    assert mse_gptq < mse_rtn, (mse_gptq, mse_rtn)

    qc = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and "lm_head" in qc["ignore"]
    (group,) = qc["config_groups"].values()
    assert group["weights"]["group_size"] == 32 and group["weights"]["num_bits"] == 4
    assert group["weights"]["strategy"] == "group" and group["weights"]["symmetric"] is True
    assert (gptq / "tokenizer.json").exists() and (gptq / "recipe.yaml").exists()
    assert load(gptq).config.tie_word_embeddings

    tensors = load_file(str(gptq / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert not any(k.startswith("lm_head.") and k != "lm_head.weight" for k in tensors)
    # dequantize=True: float weights to check against the stored scales (a plain load keeps them packed)
    reloaded = AutoModelForCausalLM.from_pretrained(gptq, quantization_config=CompressedTensorsConfig(dequantize=True))
    linears = [n for n, m in reloaded.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(linears) == 14
    for name in linears:
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        weight = reloaded.get_submodule(name).weight.detach().float()
        assert packed.dtype == torch.int32 and packed.shape == (weight.shape[0], weight.shape[1] // 8)
        assert scale.shape == (weight.shape[0], weight.shape[1] // 32)
        # symmetric int4: every weight is an integer level in [-8, 7] times its group's scale
        levels = weight / scale.float().repeat_interleave(32, dim=1)
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
        assert levels.round().min() >= -8 and levels.round().max() <= 7
    torch.testing.assert_close(reloaded.lm_head.weight, tiny.reference.lm_head.weight)


# GPTQ at the default group size 128 on the base model; AWQ on the outlier model (what it is built for) at group 32,
# under the CPU pin-memory guard (apply_recipe's default) when no accelerator exists.
@pytest.mark.parametrize("method,source,group_size", [("gptq", "base", 128), ("awq", "outliers", 32)])
def test_reloaded_checkpoint_reproduces_the_in_memory_model(tiny, method, source, group_size):
    model, tokenizer = llmc._load(getattr(tiny, source))
    recipe = (llmc.gptq_recipe if method == "gptq" else llmc.awq_recipe)(group_size=group_size)
    llmc.apply_recipe(model, tokenizer, recipe, tiny.calib, num_samples=N_CALIB, max_seq_length=SEQ)
    batch = batch_of(tiny.tokenizer, tiny.held_out)
    in_memory = logits_of(model, batch)
    out = llmc.save_compressed(model, tokenizer, tiny.root / f"{method}{group_size}_in_memory", quantized=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == group_size
    reloaded = logits_of(load(out), batch)
    torch.testing.assert_close(reloaded, in_memory, rtol=0, atol=1e-5)
    assert not torch.allclose(in_memory, logits_of(tiny.reference, batch), atol=1e-3)  # it is quantized


def test_group_size_must_divide_every_layer(tiny):
    with pytest.raises(ValueError, match=r"not divisible by group_size(.|\n)*model\.layers\.0\.mlp\.down_proj"):
        llmc.quantize_rtn(tiny.base, tiny.root / "bad", group_size=96)


def test_awq_fails_on_cpu_without_the_guard_and_works_with_it(tiny):
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.__dict__["pin_memory"]
    if torch.accelerator.is_available():
        with llmc.cpu_pin_memory_guard() as patched:
            assert not patched and IntermediatesCache.__dict__["pin_memory"] is original
        pytest.skip("an accelerator is present: pin_memory works and the guard changes nothing")
    model, tokenizer = llmc._load(tiny.outliers)
    with pytest.raises(RuntimeError, match="accelerator"):
        llmc.apply_recipe(model, tokenizer, llmc.awq_recipe(group_size=32), tiny.calib, num_samples=N_CALIB,
                          max_seq_length=SEQ, cpu_guard=False)
    with llmc.cpu_pin_memory_guard() as patched:
        assert patched and IntermediatesCache.__dict__["pin_memory"] is not original
    assert IntermediatesCache.__dict__["pin_memory"] is original  # restored
    with pytest.raises(ZeroDivisionError), llmc.cpu_pin_memory_guard():
        1 / 0
    assert IntermediatesCache.__dict__["pin_memory"] is original  # restored on error too

    out = llmc.quantize_awq(tiny.outliers, tiny.root / "awq_guarded", tiny.calib, group_size=32,
                            num_samples=N_CALIB, max_seq_length=SEQ)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert IntermediatesCache.__dict__["pin_memory"] is original


def test_awq_beats_rtn_on_activation_outliers(tiny):
    kw = dict(group_size=32, num_samples=N_CALIB, max_seq_length=SEQ)
    rtn = llmc.quantize_rtn(tiny.outliers, tiny.root / "rtn_outliers", **kw)
    awq = llmc.quantize_awq(tiny.outliers, tiny.root / "awq", tiny.calib, **kw)
    batch = batch_of(tiny.tokenizer, tiny.held_out)
    mse_rtn, mse_awq = logit_mse(load(rtn), tiny.reference, batch), logit_mse(load(awq), tiny.reference, batch)
    assert mse_awq < mse_rtn, (mse_awq, mse_rtn)


def magnitude_prune(model, pattern: str | None):
    """Baseline: zero the smallest |W| in each row (unstructured, half the row) or in each group of 4 (2:4)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name == "lm_head":
                continue
            w = module.weight
            if pattern == "2:4":
                groups = w.abs().reshape(w.shape[0], -1, 4)
                drop = groups.topk(2, dim=-1, largest=False).indices
                keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(w.shape)
            else:
                drop = w.abs().argsort(dim=1)[:, : w.shape[1] // 2]
                keep = torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)
            w.mul_(keep)
    return model


def pruned_linears(model):
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n != "lm_head"}


# Wanda runs on the outlier model: its edge over magnitude is activation awareness, and on this tiny model without
# outlier channels it does not beat per-row magnitude (its mask is the same on both models, see the test below).
@pytest.mark.parametrize("method,pattern,model", [("sparsegpt", "2:4", "base"), ("sparsegpt", None, "base"),
                                                   ("wanda", None, "outliers"), ("wanda", "2:4", "outliers")])
def test_pruning_beats_magnitude_at_equal_sparsity(tiny, method, pattern, model):
    src = getattr(tiny, model)
    prune = llmc.prune_sparsegpt if method == "sparsegpt" else llmc.prune_wanda
    out = prune(src, tiny.root / f"{method}_{model}_{pattern and 'nm'}", tiny.calib, sparsity=0.5, pattern=pattern,
                num_samples=N_CALIB, max_seq_length=SEQ)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # plain dense checkpoint
    pruned, baseline = load(out), magnitude_prune(load(src), pattern)
    for name, w in pruned_linears(pruned).items():
        zeros = (w == 0).sum().item()
        if pattern == "2:4":
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
            assert zeros == w.numel() // 2, name
        elif method == "wanda":
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name  # exactly half of every row
        else:  # SparseGPT's per-block threshold keeps about one extra zero per 128-column block
            assert w.numel() // 2 <= zeros <= w.numel() // 2 + w.shape[1] // 128 + 1, (name, zeros)
    for name, w in pruned_linears(baseline).items():
        assert (w == 0).sum().item() == w.numel() // 2, name
    source = load(src)
    torch.testing.assert_close(pruned.lm_head.weight, source.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(pruned.model.embed_tokens.weight, source.model.embed_tokens.weight, rtol=0, atol=0)

    batch = batch_of(tiny.tokenizer, tiny.calib)
    err, err_magnitude = logit_mse(pruned, tiny.reference, batch), logit_mse(baseline, tiny.reference, batch)
    assert err < err_magnitude, (err, err_magnitude)


def test_other_n_of_m_patterns_keep_n(tiny):
    out = llmc.prune_wanda(tiny.base, tiny.root / "wanda14", tiny.calib, sparsity=0.75, pattern="1:4",
                           num_samples=N_CALIB, max_seq_length=SEQ)
    for name, w in pruned_linears(load(out)).items():
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 1).all(), name
        assert (w == 0).sum().item() == 3 * w.numel() // 4, name


def test_wanda_mask_ignores_a_function_preserving_channel_rescale(tiny):
    """|W_ij|·‖X_j‖ is unchanged when channel j's activations grow ×20 and its weights shrink ÷20, so Wanda prunes
    the same weights on both models; magnitude pruning does not. (A near-tie may round differently, hence the
    tolerance.)"""
    kw = dict(num_samples=N_CALIB, max_seq_length=SEQ)
    plain = pruned_linears(load(llmc.prune_wanda(tiny.base, tiny.root / "wanda_inv_base", tiny.calib, **kw)))
    scaled = pruned_linears(load(llmc.prune_wanda(tiny.outliers, tiny.root / "wanda_inv_out", tiny.calib, **kw)))
    total = sum(w.numel() for w in plain.values())
    differ = sum(((plain[n] == 0) != (scaled[n] == 0)).sum().item() for n in plain)
    assert differ <= 1e-4 * total, differ
    m_plain = pruned_linears(magnitude_prune(load(tiny.base), None))
    m_scaled = pruned_linears(magnitude_prune(load(tiny.outliers), None))
    assert sum(((m_plain[n] == 0) != (m_scaled[n] == 0)).sum().item() for n in plain) > 0.01 * total
