"""Each trainer runs on a tiny model, changes every trainable parameter, and reports honest counts."""

import math

import pytest
import torch

from posttrain.align.preference import train_dpo
from posttrain.align.engine import TrainOptions
from posttrain.align.grpo import GRPOSettings, train_grpo
from posttrain.align.sft import train_sft
from posttrain.tasks import arithmetic



@pytest.fixture(scope="module")
def items():
    train, _ = arithmetic.make_splits(seed=0, n_train=64, n_test=8)
    return train


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _all_changed(model, before):
    return [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(before[n], p.detach())]


def test_sft_trains_every_parameter(tiny_tokenizer, items, make_llama):
    model = make_llama()
    before = _snapshot(model)
    result = train_sft(model, tiny_tokenizer, arithmetic.sft_rows(items), TrainOptions(steps=3, batch_size=4, lr=1e-3))
    assert result.steps == 3 and _all_changed(model, before) == []
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_dpo_first_step_is_ln2_and_every_parameter_changes(tiny_tokenizer, items, make_llama):
    model = make_llama()
    before = _snapshot(model)
    rows = arithmetic.preference_rows(items, seed=0)
    result = train_dpo(model, tiny_tokenizer, rows, TrainOptions(steps=3, batch_size=4, lr=1e-3), beta=0.1)
    first = result.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert _all_changed(model, before) == []


def test_dpo_logs_the_policy_reference_log_ratio_under_its_own_name(tiny_tokenizer, items, make_llama):
    # Regression: DPO logged the mean policy-minus-reference log-ratio of the dataset's completions as `kl`; it is
    # no KL estimate (the completions are not the policy's samples) and goes negative. It is the mean over both
    # sides, so with DPO's rewards β·(log π − log π_ref) it equals (rewards/chosen + rewards/rejected) / 2β.
    beta = 0.1
    rows = arithmetic.preference_rows(items, seed=0)
    result = train_dpo(make_llama(), tiny_tokenizer, rows, TrainOptions(steps=3, batch_size=4, lr=1e-2), beta=beta)
    assert all("kl" not in m for m in result.history)
    assert result.history[0]["policy_ref_logratio"] == 0.0
    for m in result.history[1:]:
        assert m["policy_ref_logratio"] != 0.0  # the policy moved
        assert m["policy_ref_logratio"] == pytest.approx((m["rewards/chosen"] + m["rewards/rejected"]) / (2 * beta),
                                                         rel=1e-4, abs=1e-6)


def test_dpo_precomputed_reference_matches_frozen_copy(tiny_tokenizer, items, make_llama):
    rows = arithmetic.preference_rows(items[:16], seed=0)
    runs = []
    for mode in ("copy", "precompute"):
        model = make_llama()
        runs.append(train_dpo(model, tiny_tokenizer, rows, TrainOptions(steps=3, batch_size=4, lr=1e-3),
                              reference=mode).history)
    for a, b in zip(*runs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_dpo_drops_identical_and_emptied_pairs_and_counts_them(tiny_tokenizer, items, make_llama):
    rows = arithmetic.preference_rows(items[:4], seed=0)
    same = dict(rows[0], rejected=rows[0]["chosen"])
    model = make_llama()
    result = train_dpo(model, tiny_tokenizer, rows + [same], TrainOptions(steps=1, batch_size=2, lr=1e-3))
    assert result.dropped == {"identical_after_truncation": 1} and result.rows == 4


def test_grpo_trains_every_parameter_with_a_varying_reward(tiny_tokenizer, items, make_llama):
    model = make_llama()
    before = _snapshot(model)
    rows = arithmetic.verifiable_rows(items)
    # A reward that varies inside groups (length of the sampled text), so advantages are non-zero.
    lengths = lambda texts, answers: [float(len(t)) for t in texts]  # noqa: E731
    settings = GRPOSettings(num_generations=4, prompts_per_step=2, max_new_tokens=8)
    result = train_grpo(model, tiny_tokenizer, rows, TrainOptions(steps=2, lr=1e-3), settings, lengths)
    assert result.steps == 2 and _all_changed(model, before) == []
    assert set(result.history[0]) >= {"loss", "reward", "reward_std", "frac_zero_std_groups", "completion_length"}


def test_grpo_all_equal_rewards_give_zero_gradient(tiny_tokenizer, items, make_llama):
    model = make_llama()
    before = _snapshot(model)
    settings = GRPOSettings(num_generations=4, prompts_per_step=2, max_new_tokens=6)
    result = train_grpo(model, tiny_tokenizer, arithmetic.verifiable_rows(items), TrainOptions(steps=1, lr=1e-2),
                        settings, lambda texts, answers: [1.0] * len(texts))
    m = result.history[0]
    assert m["grad_norm"] == 0.0 and m["frac_zero_std_groups"] == 1.0 and not math.isnan(m["loss"])
    assert set(_all_changed(model, before)) == set(before)  # AdamW with a zero gradient and no decay moves nothing


def test_grpo_beta_reports_zero_kl_at_the_first_step(tiny_tokenizer, items, make_llama):
    model = make_llama()
    settings = GRPOSettings(num_generations=4, prompts_per_step=2, max_new_tokens=6, beta=0.04)
    lengths = lambda texts, answers: [float(len(t)) for t in texts]  # noqa: E731
    result = train_grpo(model, tiny_tokenizer, arithmetic.verifiable_rows(items), TrainOptions(steps=1, lr=1e-3),
                        settings, lengths)
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-7)


def test_sft_assistant_turns_supervises_every_assistant_turn(tiny_tokenizer, make_llama):
    from posttrain.align.sft import encode_sft_rows

    row = {"prompt": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "#### 2"},
                      {"role": "user", "content": "2 + 2?"}],
           "completion": [{"role": "assistant", "content": "#### 4"}]}
    opts = TrainOptions(steps=1)
    (ids_c, mask_c), = encode_sft_rows(tiny_tokenizer, [row], opts)[0]
    (ids_a, mask_a), = encode_sft_rows(tiny_tokenizer, [row], opts, loss_on="assistant_turns")[0]
    assert ids_c == ids_a
    eos = tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode([t for t, m in zip(ids_c, mask_c) if m]) == f"#### 4{eos}"
    assert tiny_tokenizer.decode([t for t, m in zip(ids_a, mask_a) if m]) == f"#### 2{eos}#### 4{eos}"
    result = train_sft(make_llama(), tiny_tokenizer, [row] * 4, TrainOptions(steps=2, batch_size=2, lr=1e-3),
                       loss_on="assistant_turns")
    assert result.history[0]["units"] == 2 * sum(mask_a)


@pytest.mark.parametrize("method,first_loss", [("ipo", 25.0), ("simpo", None), ("orpo", None)])
def test_length_normalised_methods_train_every_parameter(method, first_loss, tiny_tokenizer, items, make_llama):
    from posttrain.align.preference import PreferenceSettings, train_preference

    model = make_llama()
    before = _snapshot(model)
    rows = arithmetic.preference_rows(items, seed=0)
    result = train_preference(model, tiny_tokenizer, rows, TrainOptions(steps=3, batch_size=4, lr=1e-3),
                              PreferenceSettings(method=method))
    assert _all_changed(model, before) == []
    assert all(math.isfinite(h["loss"]) for h in result.history)
    if first_loss is not None:
        assert result.history[0]["loss"] == pytest.approx(first_loss, abs=1e-5)
        assert result.history[0]["policy_ref_logratio"] == 0.0


def test_common_prefix_moves_into_the_prompt_for_length_normalised_losses(tiny_tokenizer, items):
    from posttrain.align.preference import encode_pairs

    rows = arithmetic.preference_rows(items[:4], seed=0)
    plain, _ = encode_pairs(tiny_tokenizer, rows, TrainOptions())
    moved, _ = encode_pairs(tiny_tokenizer, rows, TrainOptions(), move_common_prefix=True)
    for a, b in zip(plain, moved):
        assert b.chosen.input_ids == a.chosen.input_ids and b.rejected.input_ids == a.rejected.input_ids
        assert b.chosen.prompt_ids == b.rejected.prompt_ids
        assert b.chosen.completion_ids[0] != b.rejected.completion_ids[0]
        assert len(b.chosen.completion_ids) >= 1 and len(b.rejected.completion_ids) >= 1


@pytest.mark.parametrize("method", ["dpo", "simpo", "orpo"])
def test_preference_ga1_and_ga2_give_the_same_loss_and_gradient_norm(method, tiny_tokenizer, items, make_llama):
    from posttrain.align.preference import PreferenceSettings, train_preference

    rows = arithmetic.preference_rows(items[:16], seed=0)
    runs = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        result = train_preference(make_llama(), tiny_tokenizer, rows,
                                  TrainOptions(steps=1, batch_size=batch, grad_accum=accum, lr=1e-3),
                                  PreferenceSettings(method=method))
        runs.append(result.history[0])
    for other in runs[1:]:
        assert other["loss"] == pytest.approx(runs[0]["loss"], abs=1e-5)
        assert other["grad_norm"] == pytest.approx(runs[0]["grad_norm"], rel=1e-4)
