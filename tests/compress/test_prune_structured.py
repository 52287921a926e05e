"""Structured pruning: units built to be exactly zero (and a layer built as the identity) are the ones removed, the
logits do not move, and the sliced model is an ordinary HF model that reloads from its own config."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.compress.structured import Importance, compute_importance, prune_depth, prune_width

HIDDEN, HEADS, KV, HEAD_DIM, FFN, LAYERS = 64, 8, 4, 8, 128, 3


def gqa_model(tokenizer, cls=LlamaForCausalLM, config_cls=LlamaConfig, seed=0, **kw):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id, **kw)
    return cls(config).eval()


def calib(model, seed=0, batch=3, length=20):
    return [torch.randint(6, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def expected_params(config) -> int:
    d, v, hd = config.hidden_size, config.vocab_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    bias = (heads + 2 * kv) * hd if getattr(config, "attention_bias", False) or config.model_type == "qwen2" else 0
    per_layer = 2 * d + d * heads * hd + 2 * d * kv * hd + heads * hd * d + bias + 3 * d * config.intermediate_size
    return 2 * v * d + d + config.num_hidden_layers * per_layer


@torch.no_grad()
def test_zeroed_neurons_and_kv_groups_are_removed_and_logits_do_not_move(tiny_tokenizer):
    model = gqa_model(tiny_tokenizer)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate_proj.weight[i::4] = 0  # silu(0) = 0: these 32 neurons output exactly zero
        for group in (i % KV, (i + 1) % KV):  # zero values: every query head of the group outputs exactly zero
            layer.self_attn.v_proj.weight[group * HEAD_DIM:(group + 1) * HEAD_DIM] = 0
    ids = calib(model)[0]
    imp = compute_importance(model, [ids])
    assert (imp.neurons[0, 0::4] == 0).all() and (imp.neurons[0, 1::4] > 0).all()
    assert (imp.heads[0, :4] == 0).all() and (imp.heads[0, 4:] > 0).all()
    before = logits(model, ids)
    stats = prune_width(model, [ids], ffn_fraction=0.25, head_fraction=0.5)
    assert stats["intermediate_size"] == (FFN, 96) and stats["num_attention_heads"] == (HEADS, 4)
    assert stats["num_key_value_heads"] == (KV, 2)
    assert model.config.intermediate_size == 96 and model.config.head_dim == HEAD_DIM
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.out_features == 4 * HEAD_DIM and layer.self_attn.k_proj.out_features == 2 * HEAD_DIM
    assert layer.mlp.down_proj.in_features == 96
    assert (logits(model, ids) - before).abs().max() <= 1e-6


@torch.no_grad()
def test_equal_query_heads_per_group_keeps_every_kv_head(tiny_tokenizer):
    model = gqa_model(tiny_tokenizer)
    ids = calib(model)[0]
    imp = compute_importance(model, [ids])
    heads = imp.heads.clone()
    for i, layer in enumerate(model.model.layers):
        for group in range(KV):  # one query head per group contributes nothing (its o_proj columns are zero)
            head = group * 2 + (i + group) % 2
            layer.self_attn.o_proj.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
            heads[i, head] = 0.0  # so the importance says so (a query head's output itself is rarely exactly zero)
    before = logits(model, ids)
    prune_width(model, None, head_fraction=0.5, head_mode="per_group",
                importance=Importance(heads, imp.neurons, imp.layers, imp.sequences))
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, KV)
    assert model.model.layers[0].self_attn.num_key_value_groups == 1
    assert (logits(model, ids) - before).abs().max() <= 1e-6


@torch.no_grad()
def test_identity_layer_is_removed_by_depth_pruning(tiny_tokenizer):
    model = gqa_model(tiny_tokenizer)
    model.model.layers[1].self_attn.o_proj.weight.zero_()
    model.model.layers[1].mlp.down_proj.weight.zero_()  # both residual branches add zero: the block is the identity
    ids = calib(model)[0]
    before = logits(model, ids)
    generated = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    stats = prune_depth(model, [ids], 1)
    assert stats["removed"] == [1] and stats["block_influence"][1] <= 1e-6 < min(stats["block_influence"][::2])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert (logits(model, ids) - before).abs().max() <= 1e-6
    # the KV cache is indexed by the renumbered layers
    assert torch.equal(model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False,
                                      pad_token_id=tiny_tokenizer.pad_token_id), generated)


@pytest.mark.parametrize("cls,config_cls", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_pruned_model_reloads_from_its_config_with_the_expected_size(tiny_tokenizer, tmp_path, cls, config_cls):
    model = gqa_model(tiny_tokenizer, cls, config_cls)
    data = calib(model)
    prune_depth(model, data, 1)
    prune_width(model, data, ffn_fraction=0.5, head_fraction=0.5)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == expected_params(model.config)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is cls and sum(p.numel() for p in reloaded.parameters()) == n_params
    assert (reloaded.config.num_hidden_layers, reloaded.config.intermediate_size) == (LAYERS - 1, FFN // 2)
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (HEADS // 2, KV // 2)
    if getattr(reloaded.config, "layer_types", None) is not None:
        assert len(reloaded.config.layer_types) == LAYERS - 1
    assert torch.equal(logits(reloaded, data[0]), logits(model, data[0]))


def test_sizes_the_config_class_rejects_are_refused_before_slicing(tiny_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS)
    model = LlamaForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="rejects the pruned sizes"):  # 6 heads do not divide hidden 64
        prune_width(model, calib(model), ffn_fraction=0.5, head_fraction=0.25)
    assert sum(p.numel() for p in model.parameters()) == n_params and model.config.intermediate_size == FFN
    with pytest.raises(ValueError, match="leave none"):
        prune_width(model, calib(model), ffn_fraction=0.999)
    with pytest.raises(ValueError, match="can remove"):
        prune_depth(model, calib(model), 2)


@torch.no_grad()
def test_importance_ignores_padding(tiny_tokenizer):
    model = gqa_model(tiny_tokenizer)
    a, b = calib(model, batch=1, length=12)[0][0], calib(model, seed=1, batch=1, length=7)[0][0]
    ids = torch.full((2, 12), tiny_tokenizer.pad_token_id)
    ids[0], ids[1, :7] = a, b
    mask = torch.zeros_like(ids)
    mask[0], mask[1, :7] = 1, 1
    padded = compute_importance(model, [{"input_ids": ids, "attention_mask": mask}])
    separate = compute_importance(model, [a.tolist(), b.tolist()])
    for field in ("heads", "neurons", "layers"):
        torch.testing.assert_close(getattr(padded, field), getattr(separate, field), rtol=1e-5, atol=1e-6)
    assert padded.sequences == separate.sequences == 2
