"""The shared engine: accumulation normalised over the window, clipping (and the pre-clip norm it logs), schedule,
checkpoints that reload, and seeds (same seed: bitwise the same run; another seed: another run)."""

import copy

import pytest
import torch

from posttrain.align.engine import Engine, TrainOptions, applied_gradient
from posttrain.align.logprobs import completion_mask, token_logprobs
from posttrain.align.losses import nll_sum
from posttrain.align.engine import LossOutput
from posttrain.data.collate import collate_completions


def _rows():
    # Different completion lengths so a per-micro-batch mean would differ from the token mean of the window.
    return [([1, 10, 11], [12, 2]), ([1, 13], [14, 15, 16, 17, 2]), ([1, 18, 19, 20], [21, 2]), ([1, 22], [23, 24, 25, 2])]


def _capture_grads(engine):
    seen = {}

    def before_step(optimizer, args, kwargs):
        seen.update({n: applied_gradient(optimizer, p) for n, p in engine.model.named_parameters()
                     if p.grad is not None})

    engine.optimizer.register_step_pre_hook(before_step)
    return seen


def _loss_fn(model, pad):
    def loss_fn(micro):
        batch = collate_completions(micro, pad)
        total, count = nll_sum(token_logprobs(model, batch), completion_mask(batch))
        return LossOutput(total, float(count))
    return loss_fn


def test_ga1_and_ga2_give_the_same_loss_and_gradients(tiny_model, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    rows = _rows()
    a, b = tiny_model, copy.deepcopy(tiny_model)
    ea, eb = Engine(a, TrainOptions(steps=1, max_grad_norm=None)), Engine(b, TrainOptions(steps=1, max_grad_norm=None))
    ga, gb = _capture_grads(ea), _capture_grads(eb)
    ma = ea.step([rows], _loss_fn(a, pad))
    mb = eb.step([rows[:1], rows[1:3], rows[3:]], _loss_fn(b, pad))
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert ma["units"] == mb["units"] == sum(len(c) for _, c in rows)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-5)


def test_window_without_units_is_a_finite_zero_update(tiny_model):
    engine = Engine(tiny_model, TrainOptions(steps=1))
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}

    def empty(_):
        zero = sum(p.sum() for p in tiny_model.parameters()) * 0.0  # graph-connected zero
        return LossOutput(zero, 0.0)

    metrics = engine.step([None], empty)
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0
    for n, p in tiny_model.named_parameters():
        assert torch.equal(before[n], p.detach())


@pytest.mark.parametrize("schedule,expected", [("constant", [1.0, 1.0, 1.0, 1.0]),
                                               ("linear", [1.0, 0.75, 0.5, 0.25]),
                                               ("cosine", [1.0, 0.8535533905932737, 0.5, 0.14644660940672627])])
def test_learning_rate_schedules(tiny_model, schedule, expected):
    engine = Engine(tiny_model, TrainOptions(steps=4, lr=1.0, schedule=schedule))
    lrs = []
    for _ in range(4):
        lrs.append(engine.scheduler.get_last_lr()[0])
        engine.optimizer.step()
        engine.scheduler.step()
    assert lrs == pytest.approx(expected)


def test_warmup_is_linear(tiny_model):
    engine = Engine(tiny_model, TrainOptions(steps=10, lr=1.0, warmup_steps=4, schedule="constant"))
    lrs = []
    for _ in range(5):
        lrs.append(engine.scheduler.get_last_lr()[0])
        engine.optimizer.step()
        engine.scheduler.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_checkpoint_reloads_with_from_pretrained_and_resumes_state(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pad = tiny_tokenizer.pad_token_id
    engine = Engine(tiny_model, TrainOptions(steps=3, lr=1e-3))
    engine.step([_rows()], _loss_fn(tiny_model, pad))
    engine.save_checkpoint(tmp_path / "ckpt", tiny_tokenizer)
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for (n, p), (_, q) in zip(tiny_model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p, q), n
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert tok.chat_template == tiny_tokenizer.chat_template
    fresh = Engine(reloaded, TrainOptions(steps=3, lr=1e-3))
    fresh.load_state(tmp_path / "ckpt")
    assert fresh.step_count == 1
    assert fresh.scheduler.get_last_lr() == engine.scheduler.get_last_lr()


def test_periodic_checkpoints_are_written_and_reload(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    pad = tiny_tokenizer.pad_token_id
    engine = Engine(tiny_model, TrainOptions(steps=4, lr=1e-3, checkpoint_every=2, output_dir=str(tmp_path)),
                    tokenizer=tiny_tokenizer)
    for _ in range(4):
        engine.step([_rows()], _loss_fn(tiny_model, pad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-4"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "step-4")
    for (n, p), (_, q) in zip(tiny_model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_every_without_output_dir_is_refused(tiny_model):
    with pytest.raises(ValueError, match="output_dir"):
        Engine(tiny_model, TrainOptions(checkpoint_every=2))


def _global_norm(grads):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads.values()])))


def test_clipping_scales_the_global_norm_to_max_grad_norm_and_logs_the_pre_clip_norm(tiny_model, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id

    def one_step(max_grad_norm):
        model = copy.deepcopy(tiny_model)
        engine = Engine(model, TrainOptions(steps=1, max_grad_norm=max_grad_norm))
        grads = _capture_grads(engine)  # what the optimizer receives: after the window normalisation and clipping
        metrics = engine.step([_rows()], _loss_fn(model, pad))
        return metrics, grads

    raw_metrics, raw = one_step(None)
    raw_norm = _global_norm(raw)
    assert raw_metrics["grad_norm"] == pytest.approx(raw_norm, rel=1e-6)

    # Pre-clip norm above the limit: one common factor brings the global norm down to max_grad_norm (torch divides
    # by norm + 1e-6, so "exactly" is up to that epsilon: a relative 1e-6 / norm).
    limit = raw_norm / 4
    clipped_metrics, clipped = one_step(limit)
    assert _global_norm(clipped) == pytest.approx(limit, rel=1e-5)
    for name in raw:
        torch.testing.assert_close(clipped[name], raw[name] * (limit / raw_norm), atol=1e-9, rtol=1e-5)
    # The logged grad_norm is the norm *before* clipping, the same number as the unclipped run's.
    assert clipped_metrics["grad_norm"] == raw_metrics["grad_norm"]
    assert clipped_metrics["grad_norm"] == pytest.approx(4 * limit, rel=1e-6)

    # Pre-clip norm below the limit: the gradients reach the optimizer untouched, bit for bit.
    loose_metrics, loose = one_step(raw_norm * 4)
    assert loose.keys() == raw.keys()
    assert all(torch.equal(loose[name], raw[name]) for name in raw)
    assert loose_metrics["grad_norm"] == raw_metrics["grad_norm"]


@pytest.mark.parametrize("in_kernel", [True, False], ids=["fused-grad-scale", "foreach-multiply"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5], ids=["unclipped", "clipped"])
def test_step_equals_normalise_clip_then_adamw_done_by_hand(tiny_model, tiny_tokenizer, in_kernel, max_grad_norm):
    """The engine applies normalisation and clipping as one factor (in the fused kernel, or one foreach multiply);
    the update must be the textbook one: grads / units, clip_grad_norm_, AdamW."""
    pad = tiny_tokenizer.pad_token_id
    rows = _rows()
    model, by_hand = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    options = TrainOptions(steps=1, lr=1e-3, max_grad_norm=max_grad_norm, schedule="constant")
    engine = Engine(model, options)
    assert engine._scales_in_kernel  # fp32 on CPU: the fused kernel takes the factor
    engine._scales_in_kernel = in_kernel
    metrics = engine.step([rows[:2], rows[2:]], _loss_fn(model, pad))

    params = [p for p in by_hand.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    units = 0.0
    for micro in (rows[:2], rows[2:]):
        out = _loss_fn(by_hand, pad)(micro)
        out.loss_sum.backward()
        units += out.units
    for p in params:
        p.grad /= units
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf")))
    optimizer.step()

    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-6)
    if max_grad_norm is not None:
        assert norm > max_grad_norm  # the clipped case does clip
    for (name, a), (_, b) in zip(model.named_parameters(), by_hand.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6, msg=name)
    assert getattr(engine.optimizer, "grad_scale", None) is None  # never left set for a later step


def test_non_finite_gradient_norm_is_refused_without_an_update(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, TrainOptions(steps=1))
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}

    def inf_grads(micro):
        loss = _loss_fn(tiny_model, tiny_tokenizer.pad_token_id)(micro)
        first = next(p for p in tiny_model.parameters() if p.requires_grad)
        first.register_hook(lambda g: torch.full_like(g, float("inf")))
        return loss
    with pytest.raises(FloatingPointError, match="gradient norm is not finite"):
        engine.step([_rows()], inf_grads)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())
    assert all(p.grad is None for p in tiny_model.parameters())


# -- seeds --------------------------------------------------------------------------------------------------------
TIMINGS = {"step_s"}  # wall-clock measurements: the only metrics allowed to differ between identical runs


def _run(trainer, make_llama, seed):
    model = make_llama()  # the same initial weights every time: only the trainer's seed varies
    history = trainer(model, seed).history
    return {n: p.detach().clone() for n, p in model.named_parameters()}, \
        [{k: v for k, v in m.items() if k not in TIMINGS} for m in history]


def _sft(tokenizer, rows):
    from posttrain.align.sft import train_sft

    return lambda model, seed: train_sft(model, tokenizer, rows, TrainOptions(steps=3, batch_size=4, lr=1e-3,
                                                                              seed=seed))


def _grpo(tokenizer, rows):
    from posttrain.align.grpo import GRPOSettings, train_grpo

    settings = GRPOSettings(num_generations=4, prompts_per_step=2, max_new_tokens=8)
    lengths = lambda texts, answers: [float(len(t)) for t in texts]  # noqa: E731  (varies within a group)
    return lambda model, seed: train_grpo(model, tokenizer, rows, TrainOptions(steps=2, lr=1e-3, seed=seed),
                                          settings, lengths)


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_same_seed_is_bitwise_identical_and_another_seed_differs(method, tiny_tokenizer, make_llama):
    from posttrain.tasks import arithmetic

    train, _ = arithmetic.make_splits(seed=0, n_train=32, n_test=4)
    trainer = (_sft(tiny_tokenizer, arithmetic.sft_rows(train)) if method == "sft"
               else _grpo(tiny_tokenizer, arithmetic.verifiable_rows(train)))
    params_a, history_a = _run(trainer, make_llama, seed=1)
    params_b, history_b = _run(trainer, make_llama, seed=1)
    params_c, history_c = _run(trainer, make_llama, seed=2)
    assert history_a == history_b  # every metric, bit for bit
    assert all(torch.equal(params_a[n], params_b[n]) for n in params_a)
    # Another seed draws other batches (SFT) or other samples (GRPO): other metrics and other weights.
    assert history_c != history_a
    assert any(not torch.equal(params_a[n], params_c[n]) for n in params_a)
    if method == "grpo":
        assert [m["completion_length"] for m in history_c] != [m["completion_length"] for m in history_a] or \
            [m["reward"] for m in history_c] != [m["reward"] for m in history_a]
