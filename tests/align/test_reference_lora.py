"""LoRA policies: every reference mode equals the policy at step 0 (pitfall 17), only the adapter trains (with every
technique: SFT, DPO, IPO, SimPO, ORPO, KTO, GRPO here, the reward model in test_reward_model.py), the reference never
leaves the policy switched, and saved adapters / merged models reproduce the adapted model."""

import math

import pytest
import torch

from posttrain.align.engine import TrainOptions
from posttrain.align.grpo import GRPOSettings, train_grpo
from posttrain.align.preference import PreferenceSettings, collate_pairs, encode_pairs, train_preference
from posttrain.align.reference import (REF_ADAPTER, AdapterCopyReference, adapter_is_trained, make_reference,
                                       resolve_reference_mode)
from posttrain.models.lora import LoraOptions, apply_lora, load_adapter, save_lora
from posttrain.tasks import arithmetic

OPTS = LoraOptions(r=4, alpha=8)


@pytest.fixture(scope="module")
def items():
    train, _ = arithmetic.make_splits(seed=0, n_train=16, n_test=4)
    return train


@pytest.fixture(scope="module")
def rows(items):
    return arithmetic.preference_rows(items[:8], seed=0)


def _trained_adapter(model, seed=1):
    """Give every LoRA B a non-zero value, as an SFT adapter would have."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _lora(make_llama, trained=False):
    model = apply_lora(make_llama(), OPTS)
    return _trained_adapter(model) if trained else model


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode,trained", [("copy", True), ("precompute", True), ("adapter_disabled", False),
                                          ("adapter_copy", True), ("auto", True), ("auto", False),
                                          ("copy", False), ("precompute", False)])
def test_dpo_step_zero_is_exact_in_every_reference_mode(tiny_tokenizer, make_llama, rows, mode, trained):
    model = _lora(make_llama, trained)
    result = train_preference(model, tiny_tokenizer, rows, TrainOptions(steps=1, batch_size=4, lr=1e-3),
                              PreferenceSettings(method="dpo", reference=mode))
    first = result.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert first["policy_ref_logratio"] == 0.0


def test_auto_resolves_by_adapter_state(make_llama):
    assert resolve_reference_mode(make_llama()) == "copy"
    fresh = _lora(make_llama)
    assert not adapter_is_trained(fresh) and resolve_reference_mode(fresh) == "adapter_disabled"
    trained = _lora(make_llama, trained=True)
    assert adapter_is_trained(trained) and resolve_reference_mode(trained) == "adapter_copy"


def test_adapter_modes_refuse_what_would_break_step_zero(make_llama):
    with pytest.raises(ValueError, match="peft LoRA"):
        make_reference(make_llama(), "adapter_disabled")
    with pytest.raises(ValueError, match="pitfall 17"):  # the base model is not the policy any more
        make_reference(_lora(make_llama, trained=True), "adapter_disabled")


@pytest.mark.parametrize("mode", ["adapter_disabled", "adapter_copy"])
def test_lora_dpo_changes_every_lora_param_and_nothing_else(tiny_tokenizer, make_llama, rows, mode):
    model = _lora(make_llama)
    trainable = _trainable(model)
    before = _snapshot(model)
    train_preference(model, tiny_tokenizer, rows, TrainOptions(steps=3, batch_size=4, lr=1e-2),
                     PreferenceSettings(method="dpo", reference=mode))
    assert _trainable(model) == trainable  # the reference added nothing trainable
    assert trainable and all(".default." in n for n in trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(before[name], p.detach()), f"{name} did not change"
        elif name in before:
            assert torch.equal(before[name], p.detach()), f"frozen {name} changed"
    if mode == "adapter_copy":  # the frozen copy still holds the initial adapter
        ref = {n: p for n, p in model.named_parameters() if f".{REF_ADAPTER}." in n}
        assert ref and all(torch.equal(p, before[n.replace(f".{REF_ADAPTER}.", ".default.")]) for n, p in ref.items())
        assert model.active_adapters == ["default"]


def test_grpo_with_beta_and_adapter_disabled(tiny_tokenizer, make_llama, items):
    model = _lora(make_llama)
    before = _snapshot(model)
    lengths = lambda texts, answers: [float(len(t)) for t in texts]  # noqa: E731
    settings = GRPOSettings(num_generations=4, prompts_per_step=2, max_new_tokens=6, beta=0.04,
                            reference="adapter_disabled")
    result = train_grpo(model, tiny_tokenizer, arithmetic.verifiable_rows(items), TrainOptions(steps=2, lr=1e-2),
                        settings, lengths)
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert result.history[1]["kl"] > 0  # the reference stayed at the base while the adapter moved
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)


def test_reference_forward_restores_the_policy_even_when_it_raises(tiny_tokenizer, make_llama, rows):
    model = _lora(make_llama, trained=True)
    model.train()
    reference = make_reference(model, "adapter_copy")
    trainable, modes = _trainable(model), [m.training for m in model.modules()]
    pairs, _ = encode_pairs(tiny_tokenizer, rows[:2], TrainOptions(steps=1))
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    good = reference.sequence_logprobs(batch)
    batch.input_ids[0, 0] = 10**6  # out of the vocabulary: the embedding lookup raises mid-forward
    with pytest.raises((IndexError, RuntimeError)):
        reference.sequence_logprobs(batch)
    assert model.active_adapters == ["default"] and _trainable(model) == trainable
    assert [m.training for m in model.modules()] == modes
    disabled = _lora(make_llama)
    with pytest.raises((IndexError, RuntimeError)):
        make_reference(disabled, "adapter_disabled").token_logprobs(batch)
    assert disabled.get_model_status().enabled is True
    assert torch.isfinite(good).all()


def test_adapter_copy_replaces_a_stale_ref_and_release_removes_it(make_llama):
    model = _lora(make_llama, trained=True)
    AdapterCopyReference(model)
    _trained_adapter(model, seed=7)  # the policy moves on
    second = AdapterCopyReference(model)
    pairs = {n: p for n, p in model.named_parameters() if ".ref." in n}
    assert all(torch.equal(p, model.get_parameter(n.replace(".ref.", ".default."))) for n, p in pairs.items())
    second.release()
    assert REF_ADAPTER not in model.peft_config and _trainable(model) == {
        n for n, _ in model.named_parameters() if "lora_" in n}


def test_save_lora_merged_and_adapter_reproduce_the_adapted_model(tiny_tokenizer, make_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _lora(make_llama, trained=True)
    make_reference(model, "adapter_copy")  # a second adapter must not leak into what is saved
    model.eval()
    ids = torch.tensor([tiny_tokenizer.encode("Sam has 3 apples and buys 4 more.")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    adapter_dir, merged_dir = save_lora(model, tiny_tokenizer, tmp_path)
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    assert (adapter_dir / "tokenizer_config.json").is_file() and not (adapter_dir / REF_ADAPTER).exists()
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        assert torch.equal(model(input_ids=ids).logits, expected)  # the live model kept its adapter
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)

    reloaded = load_adapter(make_llama(), adapter_dir)  # same seed: the same base weights
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    assert _trainable(reloaded) and all("lora_" in n for n in _trainable(reloaded))
    assert _trainable(load_adapter(make_llama(), adapter_dir, trainable=False)) == set()


def _train_with_lora(method, model, tokenizer, rows, options):
    """One LoRA policy trained by `method` (dpo, grpo and rm have their own tests above and in test_reward_model)."""
    from posttrain.align.kto import KTOSettings, train_kto, unpair_preferences
    from posttrain.align.sft import train_sft

    if method == "sft":
        return train_sft(model, tokenizer, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows], options)
    if method == "kto":  # "auto" with a fresh adapter: the base with the adapter disabled is the reference
        return train_kto(model, tokenizer, unpair_preferences(rows, seed=0), options, KTOSettings(reference="auto"))
    return train_preference(model, tokenizer, rows, options, PreferenceSettings(method=method, reference="auto"))


@pytest.mark.parametrize("method", ["sft", "ipo", "simpo", "orpo", "kto"])
def test_lora_trains_only_the_adapter_and_saves_what_it_trained(method, tiny_tokenizer, make_llama, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _lora(make_llama)
    trainable = _trainable(model)
    before = _snapshot(model)
    result = _train_with_lora(method, model, tiny_tokenizer, rows, TrainOptions(steps=3, batch_size=4, lr=1e-2))
    assert result.steps == 3 and all(math.isfinite(h["loss"]) for h in result.history)
    assert _trainable(model) == trainable and trainable and all(".default." in n for n in trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(before[name], p.detach()), f"adapter weight {name} did not change"
        else:
            assert torch.equal(before[name], p.detach()), f"frozen base weight {name} changed"

    model.eval()
    ids = torch.tensor([tiny_tokenizer.encode("Sam has 3 apples and buys 4 more.")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    adapter_dir, merged_dir = save_lora(model, tiny_tokenizer, tmp_path)
    reloaded = load_adapter(make_llama(), adapter_dir)  # the same seed: the same base weights
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)  # W + BA, summed once
