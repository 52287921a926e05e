"""KTO trainer: every parameter trains, step 0 is loss 0.5 / kl 0 in both reference modes, KL pairs never self-pair,
batch size 1 is refused, single-label batches stay finite, and it runs on the real KTO demo file."""

import math
import warnings

import pytest
import torch

from posttrain.align.batching import cycle_batches
from posttrain.align.engine import TrainOptions
from posttrain.align.kto import (KTOSettings, collate_kl_pairs, distinct_micro_batches, encode_unpaired,
                                 example_and_kl_logprobs, kl_partners, policy_logprobs, train_kto, unpair_preferences)
from posttrain.tasks import arithmetic


@pytest.fixture(scope="module")
def rows():
    train, _ = arithmetic.make_splits(seed=0, n_train=32, n_test=4)
    return unpair_preferences(arithmetic.preference_rows(train[:8], seed=0), seed=0)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _unchanged(model, before):
    return [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(before[n], p.detach())]


@pytest.mark.parametrize("reference", ["copy", "precompute"])
def test_kto_step0_is_one_half_with_zero_kl_and_every_parameter_changes(tiny_tokenizer, make_llama, rows, reference):
    model = make_llama()
    before = _snapshot(model)
    result = train_kto(model, tiny_tokenizer, rows, TrainOptions(steps=2, batch_size=4, lr=1e-3),
                       KTOSettings(reference=reference))
    first = result.history[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["count/desirable"] + first["count/undesirable"] == 4
    assert result.steps == 2 and result.rows == len(rows) and _unchanged(model, before) == []
    assert all(math.isfinite(m["loss"]) for m in result.history)


def test_kto_reference_modes_train_alike(tiny_tokenizer, make_llama, rows):
    runs = []
    for mode in ("copy", "precompute"):
        options = TrainOptions(steps=2, batch_size=3, grad_accum=2, lr=1e-3)
        runs.append(train_kto(make_llama(), tiny_tokenizer, rows, options, KTOSettings(reference=mode)).history)
    for a, b in zip(*runs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)


@pytest.mark.parametrize("n", range(2, 8))
def test_kl_pairs_never_pair_an_example_with_its_own_completion(tiny_tokenizer, rows, n):
    partners = kl_partners(n)
    assert sorted(partners) == list(range(n)) and all(partners[i] != i for i in range(n))
    examples, _ = encode_unpaired(tiny_tokenizer, rows[:n], TrainOptions())
    assert len({tuple(e.encoded.completion_ids) for e in examples}) == n  # distinct completions: the check is real
    kl = collate_kl_pairs(examples, pad=tiny_tokenizer.pad_token_id, max_length=512)
    for i, e in enumerate(examples):
        ids = kl.input_ids[i][kl.completion_mask[i].bool()].tolist()
        assert ids == examples[partners[i]].encoded.completion_ids != e.encoded.completion_ids
        assert kl.input_ids[i][:len(e.encoded.prompt_ids)].tolist() == e.encoded.prompt_ids


def test_policy_kl_rows_run_without_a_graph_and_match_the_joint_pass(tiny_tokenizer, make_llama, rows):
    """The policy's KL rows are scored without gradients (z₀ is detached, so a graph over them would only cost a
    zero-gradient backward); values and the examples' gradients equal the joint shared-prompt pass's."""
    model = make_llama()
    examples, _ = encode_unpaired(tiny_tokenizer, rows[:6], TrainOptions())
    pad = tiny_tokenizer.pad_token_id
    logps, kl = policy_logprobs(model, examples, pad, 512)
    assert logps.requires_grad and not kl.requires_grad
    joint, joint_kl = example_and_kl_logprobs(model, examples, pad, 512)
    torch.testing.assert_close(logps, joint, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, joint_kl.detach(), atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(logps.sum(), params), torch.autograd.grad(joint.sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_rows,batch_size", [(3, 2), (5, 4), (7, 3), (9, 7)])
def test_micro_batches_never_repeat_a_row_across_an_epoch_boundary(tiny_tokenizer, rows, n_rows, batch_size):
    plain = cycle_batches(list(range(n_rows)), batch_size, seed=0)
    assert any(len(set(next(plain))) < batch_size for _ in range(20))  # the shared batching does repeat rows here
    examples, _ = encode_unpaired(tiny_tokenizer, rows[:n_rows], TrainOptions())
    feed = distinct_micro_batches(examples, batch_size, seed=0)
    seen = []
    for _ in range(20):
        batch = next(feed)
        assert len(batch) == batch_size and len({e.index for e in batch}) == batch_size
        seen.extend(e.index for e in batch)
    assert set(seen) == set(range(n_rows))


def test_batch_size_one_is_refused(tiny_tokenizer, make_llama, rows):
    with pytest.raises(ValueError, match="batch_size >= 2"):
        train_kto(make_llama(), tiny_tokenizer, rows, TrainOptions(steps=1, batch_size=1))
    with pytest.raises(ValueError, match="at least 2 examples"):
        kl_partners(1)


def test_single_label_batches_are_finite_and_still_train(tiny_tokenizer, make_llama, rows):
    desirable = [r for r in rows if r["label"]]
    model = make_llama()
    with pytest.warns(UserWarning, match="single label"):
        result = train_kto(model, tiny_tokenizer, desirable, TrainOptions(steps=1, batch_size=4, lr=1e-3))
    first = result.history[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["grad_norm"] > 0
    assert "rewards/rejected" not in first and "rewards/margins" not in first
    assert first["count/desirable"] == 4 and first["count/undesirable"] == 0
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kl"]) for m in result.history)


def test_unpair_preferences_gives_one_row_per_side_shuffled(rows):
    train, _ = arithmetic.make_splits(seed=0, n_train=32, n_test=4)
    pairs = arithmetic.preference_rows(train[:12], seed=0)
    unpaired = unpair_preferences(pairs, seed=0)
    assert len(unpaired) == 2 * len(pairs) and sum(r["label"] for r in unpaired) == len(pairs)
    for p in pairs:
        assert {"prompt": p["prompt"], "completion": p["chosen"], "label": True} in unpaired
        assert {"prompt": p["prompt"], "completion": p["rejected"], "label": False} in unpaired
    labels = [r["label"] for r in unpaired]
    assert labels[: len(pairs)] != [True] * len(pairs)  # not a chosen block followed by a rejected block
    assert unpaired == unpair_preferences(pairs, seed=0) != unpair_preferences(pairs, seed=1)


def test_kto_trains_on_the_real_kto_demo_file(datasets_dir, tiny_tokenizer, make_llama):
    from posttrain.data import prepare

    data = prepare(str(datasets_dir / "kto" / "kto_en_demo.json"))
    assert data.kind == "unpaired"
    model = make_llama()
    before = _snapshot(model)
    options = TrainOptions(steps=2, batch_size=4, lr=1e-3, max_length=48, max_prompt_length=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the demo file is balanced: no imbalance warning
        result = train_kto(model, tiny_tokenizer, data.rows, options)
    assert result.history[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert result.rows == len(data.rows) == 300 and _unchanged(model, before) == []
    assert all(math.isfinite(m["loss"]) for m in result.history)
