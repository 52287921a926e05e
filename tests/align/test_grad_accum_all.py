"""GA=1 vs GA=k for every offline objective: the same loss and the same gradient on every parameter.

The engine divides the window's summed loss by the window's unit count (pairs, examples), so splitting the same
rows into more micro-batches must not change the step (ALGORITHMS.md pitfall 3). Gradients are captured just before
the optimizer step (after the window normalisation; clipping is off), on every trainable parameter.

KTO is the one objective whose loss depends on the micro-batch beyond its rows: its reference point z₀ is estimated
per micro-batch, on pairs (x_i, y_(i−1) mod n) of that micro-batch (pitfall 11), so by design a window of two
micro-batches of 2 uses other KL pairs and other z₀ values than one micro-batch of 4. What the design guarantees:
- at step 0 (policy == reference) z₀ = 0 for every split, so GA=1 and GA=k agree there (the parametrized test);
- with a policy that differs from its reference, the window's gradient is the example-weighted mean of its
  micro-batches' gradients, each computed with its own z₀, exactly as if each micro-batch were trained alone
  (`test_kto_window_is_the_mean_of_its_micro_batches_each_with_its_own_z0`); and it differs from the single
  micro-batch of 4, whose z₀ is another estimate.
"""

import contextlib
import copy

import pytest
import torch

from posttrain.align import engine as engine_module
from posttrain.align import kto as kto_module
from posttrain.align.engine import TrainOptions
from posttrain.align.kto import KTOSettings, distinct_micro_batches, encode_unpaired, train_kto, unpair_preferences
from posttrain.align.preference import PreferenceSettings, train_preference
from posttrain.align.reference import FrozenReference
from posttrain.align.reward_model import train_reward_model
from posttrain.align.sft import train_sft
from posttrain.tasks import arithmetic

METHODS = ["dpo", "ipo", "simpo", "orpo", "kto", "rm"]


@pytest.fixture(scope="module")
def items():
    train, _ = arithmetic.make_splits(seed=0, n_train=32, n_test=4)
    return train


@contextlib.contextmanager
def captured_gradients():
    """Yields a list that receives, for each optimizer step of each Engine built inside the block, {name: grad}
    as the optimizer is about to use it."""
    steps: list[dict[str, torch.Tensor]] = []
    original = engine_module.Engine.__init__

    def init(self, model, *args, **kwargs):
        original(self, model, *args, **kwargs)

        def before_step(optimizer, args, kwargs):
            steps.append({n: engine_module.applied_gradient(optimizer, p) for n, p in model.named_parameters()
                          if p.grad is not None})

        self.optimizer.register_step_pre_hook(before_step)

    engine_module.Engine.__init__ = init
    try:
        yield steps
    finally:
        engine_module.Engine.__init__ = original


def _one_step(method, model, tokenizer, items, batch_size, grad_accum):
    options = TrainOptions(steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, max_grad_norm=None)
    pairs = arithmetic.preference_rows(items[:8], seed=0)
    with captured_gradients() as grads:
        if method == "kto":
            result = train_kto(model, tokenizer, unpair_preferences(pairs, seed=0), options, KTOSettings())
        elif method == "rm":
            result = train_reward_model(model, tokenizer, pairs, options)
        else:
            result = train_preference(model, tokenizer, pairs, options, PreferenceSettings(method=method))
    assert len(grads) == 1
    return result.history[0], grads[0]


def _assert_same_gradients(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_ga1_and_gak_give_the_same_loss_and_per_parameter_gradients(method, tiny_tokenizer, make_llama, items):
    # KTO refuses micro-batches of 1 (no mismatched pair exists), so it stops at 2 x 2.
    splits = [(4, 1), (2, 2)] if method == "kto" else [(4, 1), (2, 2), (1, 4)]
    runs = [_one_step(method, make_llama(), tiny_tokenizer, items, b, k) for b, k in splits]
    (m0, g0), others = runs[0], runs[1:]
    trainable = {n for n, p in make_llama().named_parameters() if p.requires_grad}
    if method != "rm":  # the reward model adds a score head and has no lm_head of its own
        assert set(g0) == trainable
    for metrics, grads in others:
        assert metrics["loss"] == pytest.approx(m0["loss"], abs=1e-6)
        _assert_same_gradients(g0, grads)
    if method == "kto":
        # Step 0: policy == reference, so every split's z₀ is 0 (up to float rounding) and the splits agree.
        assert all(m["kl"] == pytest.approx(0.0, abs=1e-6) for m, _ in runs)


# A micro-batch trained alone may hold a single label; the trainer warns about it, which is expected here.
@pytest.mark.filterwarnings("ignore:KTO data holds a single label")
def test_kto_window_is_the_mean_of_its_micro_batches_each_with_its_own_z0(tiny_tokenizer, make_llama, items,
                                                                           monkeypatch):
    rows = unpair_preferences(arithmetic.preference_rows(items[:8], seed=0), seed=0)
    # A policy moved away from its reference (SFT on the same texts), so z₀ > 0 and depends on the KL pairs.
    base = make_llama()
    moved = copy.deepcopy(base)
    train_sft(moved, tiny_tokenizer, rows, TrainOptions(steps=8, batch_size=8, lr=3e-3, schedule="constant"))
    monkeypatch.setattr(kto_module, "make_reference", lambda policy, mode: FrozenReference(base))

    def step(train_rows, batch_size, grad_accum):
        options = TrainOptions(steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, max_grad_norm=None)
        with captured_gradients() as grads:
            result = train_kto(copy.deepcopy(moved), tiny_tokenizer, train_rows, options, KTOSettings())
        return result.history[0], grads[0]

    # The window the trainer draws: the same seeded order cut into two micro-batches of 2 (or one of 4).
    examples, _ = encode_unpaired(tiny_tokenizer, rows, TrainOptions())
    draw = distinct_micro_batches(examples, 2, seed=0)
    micro = [[rows[e.index] for e in next(draw)] for _ in range(2)]
    whole, whole_grads = step(rows, 4, 1)
    window, window_grads = step(rows, 2, 2)
    alone = [step(m, 2, 1) for m in micro]  # a micro-batch of 2 pairs x_0 with y_1 and x_1 with y_0 in any order

    assert all(m["kl"] > 0.01 for m, _ in alone), "the policy must differ from its reference for z₀ to matter"
    # The window's z₀ metric is the mean of its micro-batches' z₀, its loss and gradient their mean (2 rows each).
    assert window["kl"] == pytest.approx((alone[0][0]["kl"] + alone[1][0]["kl"]) / 2, abs=1e-6)
    assert window["loss"] == pytest.approx((alone[0][0]["loss"] + alone[1][0]["loss"]) / 2, abs=1e-6)
    _assert_same_gradients(window_grads, {n: (alone[0][1][n] + alone[1][1][n]) / 2 for n in window_grads})
    # One micro-batch of 4 estimates z₀ on other pairs: a different z₀, so (by design) a different step.
    assert whole["kl"] != pytest.approx(window["kl"], abs=1e-4)
    assert whole["loss"] != pytest.approx(window["loss"], abs=1e-4)
    assert any(not torch.allclose(whole_grads[n], window_grads[n], atol=1e-6, rtol=1e-4) for n in whole_grads)
