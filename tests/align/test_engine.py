"""The shared engine: accumulation normalised over the window, schedule, checkpoints that reload."""

import copy

import pytest
import torch

from posttrain.align.engine import Engine, TrainOptions
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
        seen.update({n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None})

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
