"""Reward model: the score is read at the last real token (pad == eos, left or right padding), every parameter
trains, margins and centering reach the loss, and a saved model reloads with the same scores."""

import copy
import math

import pytest
import torch

from posttrain.align.engine import TrainOptions, save_pretrained
from posttrain.align.losses import bradley_terry_loss
from posttrain.align.preference import collate_pairs, encode_pairs
from posttrain.align.reward_model import (RewardSettings, last_real_token_index, load_reward_model,
                                          reward_model_from_causal_lm, score_sequences, sequence_scores,
                                          train_reward_model)
from posttrain.data.collate import collate_completions
from posttrain.data.tokenize import encode_completion
from posttrain.tasks import arithmetic


@pytest.fixture(scope="module")
def pad_is_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


@pytest.fixture(scope="module")
def pairs():
    train, _ = arithmetic.make_splits(seed=0, n_train=32, n_test=4)
    return arithmetic.preference_rows(train[:8], seed=0)


def test_last_real_token_index_reads_the_attention_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_real_token_index(mask).tolist() == [2, 4, 4, 0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_score_is_read_at_the_last_real_token_when_pad_is_eos(pad_is_eos, make_llama, pairs, side):
    model = reward_model_from_causal_lm(make_llama())
    rows = []
    for p in pairs[:3]:
        enc = encode_completion(pad_is_eos, p["prompt"], p["chosen"])
        assert enc.completion_ids[-1] == pad_is_eos.eos_token_id  # the real sequence ends with the pad id
        rows.append((enc.prompt_ids, enc.completion_ids))
    lengths = [len(a) + len(b) for a, b in rows]
    assert len(set(lengths)) > 1  # some rows are padded
    batch = collate_completions(rows, pad_is_eos.pad_token_id, padding_side=side)
    width = max(lengths)
    expected_index = [n - 1 for n in lengths] if side == "right" else [width - 1] * len(rows)
    assert last_real_token_index(batch.attention_mask).tolist() == expected_index
    with torch.no_grad():
        scores = sequence_scores(model, batch)
        alone = [sequence_scores(model, collate_completions([r], pad_is_eos.pad_token_id)).item() for r in rows]
        # The same value straight from the head applied at every position, gathered at the last real token.
        every = model.score(model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         position_ids=batch.position_ids).last_hidden_state).squeeze(-1)
        model.config.pad_token_id = pad_is_eos.pad_token_id
        pooled_by_pad_id = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids).logits.squeeze(-1)
    assert scores.tolist() == pytest.approx(alone, abs=1e-5)
    assert scores.tolist() == pytest.approx([every[i, j].item() for i, j in enumerate(expected_index)], abs=1e-6)
    # The trap this avoids: pooling by `input_ids != pad_token_id` skips the real final EOS.
    assert not torch.allclose(pooled_by_pad_id, scores, atol=1e-4)


def test_reward_model_trains_every_parameter_with_pad_equal_eos(pad_is_eos, make_llama, pairs):
    model = reward_model_from_causal_lm(make_llama())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_reward_model(model, pad_is_eos, pairs, TrainOptions(steps=3, batch_size=4, lr=1e-3))
    assert result.model is model and result.steps == 3 and result.rows == len(pairs)
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())] == []
    for m in result.history:
        assert math.isfinite(m["loss"]) and 0.0 <= m["accuracy"] <= 1.0
        assert {"margin", "rewards/chosen", "rewards/rejected", "rewards/mean", "rewards/std"} <= set(m)
        assert "rewards/mean_sq" not in m and m["rewards/std"] >= 0.0


@pytest.mark.parametrize("center", [None, 0.01])
def test_first_step_loss_and_metrics_equal_bradley_terry_on_the_initial_scores(tiny_tokenizer, make_llama, pairs,
                                                                                center):
    rows = [dict(r, margin=0.25 * i) for i, r in enumerate(pairs)]  # a different margin for every pair
    torch.manual_seed(0)
    model = reward_model_from_causal_lm(make_llama())
    options = TrainOptions(steps=1, batch_size=len(rows), lr=1e-3)  # one step sees every pair (in shuffled order)
    encoded, _ = encode_pairs(tiny_tokenizer, rows, options)
    with torch.no_grad():
        s = sequence_scores(model, collate_pairs(encoded, tiny_tokenizer.pad_token_id))
    n = len(rows)
    c, r = s[:n], s[n:]
    expected = bradley_terry_loss(c, r, torch.tensor([row["margin"] for row in rows]), center).mean().item()
    result = train_reward_model(model, tiny_tokenizer, rows, options, RewardSettings("margin", center))
    first = result.history[0]
    assert first["loss"] == pytest.approx(expected, abs=1e-5)
    assert first["accuracy"] == pytest.approx((c > r).float().mean().item())
    assert first["margin"] == pytest.approx((c - r).mean().item(), abs=1e-6)
    assert first["rewards/mean"] == pytest.approx(s.mean().item(), abs=1e-6)
    assert first["rewards/std"] == pytest.approx(s.std(unbiased=False).item(), abs=1e-5)


def test_a_missing_margin_is_refused(tiny_tokenizer, make_llama, pairs):
    with pytest.raises(ValueError, match="row 1, field 'margin'"):
        train_reward_model(make_llama(), tiny_tokenizer, pairs, TrainOptions(steps=1, batch_size=2),
                           RewardSettings(margin_field="margin"))


def test_causal_checkpoint_becomes_a_reward_model_that_saves_and_reloads(tmp_path, tiny_tokenizer, make_llama, pairs):
    causal = make_llama()
    save_pretrained(causal, tiny_tokenizer, tmp_path / "lm")
    model = load_reward_model(tmp_path / "lm")
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    for name, p in causal.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[name], p)
    result = train_reward_model(model, tiny_tokenizer, pairs, TrainOptions(steps=1, batch_size=2, lr=1e-3))
    save_pretrained(result.model, tiny_tokenizer, tmp_path / "rm")
    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs[:5]]
    reloaded = load_reward_model(tmp_path / "rm")
    assert score_sequences(reloaded, tiny_tokenizer, rows, batch_size=2).tolist() == pytest.approx(
        score_sequences(result.model, tiny_tokenizer, rows).tolist(), abs=1e-5)
    assert reloaded.config.pad_token_id == tiny_tokenizer.pad_token_id


def test_a_missing_reward_model_directory_is_named_in_one_clear_error(tmp_path):
    from posttrain.models.loading import ModelSourceError

    with pytest.raises(ModelSourceError, match="no such directory") as err:
        load_reward_model(tmp_path / "not-there")
    assert str(tmp_path / "not-there") in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelSourceError, match="not a directory"):
        load_reward_model(tmp_path / "file")


def test_shared_prompt_pair_scores_equal_scoring_each_sequence(tiny_tokenizer, make_llama):
    from posttrain.align.preference import collate_pairs, encode_pairs
    from posttrain.align.reward_model import load_reward_model, pair_scores, sequence_scores
    from posttrain.align.engine import TrainOptions
    from posttrain.tasks import arithmetic

    model = load_reward_model(make_llama()).train()
    train, _ = arithmetic.make_splits(seed=0, n_train=8, n_test=2)
    pairs, _ = encode_pairs(tiny_tokenizer, arithmetic.preference_rows(train, seed=0), TrainOptions())
    pad = tiny_tokenizer.pad_token_id
    from posttrain.align.logprobs import last_layer_plan
    from posttrain.align.reward_model import _backbone

    # The last layer computes only each completion's last position on this backbone (the path under test).
    assert last_layer_plan(_backbone(model)) is not None
    shared = pair_scores(model, pairs, pad)
    plain = sequence_scores(model, collate_pairs(pairs, pad))
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(shared.sum(), params), torch.autograd.grad(plain.sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lora_reward_model_trains_adapters_and_head_and_merges(tiny_tokenizer, make_llama, tmp_path):
    from posttrain.align.reward_model import load_reward_model, score_sequences
    from posttrain.models.lora import LoraOptions, apply_lora, save_lora
    from posttrain.tasks import arithmetic

    model = apply_lora(load_reward_model(make_llama()), LoraOptions(r=4, alpha=8))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train, _ = arithmetic.make_splits(seed=0, n_train=16, n_test=2)
    rows = arithmetic.preference_rows(train, seed=0)
    result = train_reward_model(model, tiny_tokenizer, rows, TrainOptions(steps=2, batch_size=4, lr=1e-2))
    assert all(not torch.equal(trainable[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    _, merged = save_lora(result.model, tiny_tokenizer, tmp_path)
    reloaded = load_reward_model(str(merged))
    singles = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows[:4]]
    torch.testing.assert_close(score_sequences(reloaded, tiny_tokenizer, singles),
                               score_sequences(result.model, tiny_tokenizer, singles), atol=1e-5, rtol=1e-5)
