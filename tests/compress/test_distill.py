"""Distillation through the shared engine: a peaky tiny teacher (a few SFT steps on the arithmetic task) taught to
smaller students by logit, feature and progressive KD, chains, prune-then-distill, and the shared-vocabulary check."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.align.engine import TrainOptions
from posttrain.align.sft import train_sft
from posttrain.compress.distill import (DistillSettings, VocabMismatchError, check_shared_vocab, distill,
                                        distill_chain, kd_metrics, prune_then_distill)
from posttrain.models.tokenizer_builder import build_tokenizer
from posttrain.tasks import arithmetic

from tiny_models import CORPUS, make_tiny_llama  # tests/ is on sys.path (the rootdir conftest's folder)


@pytest.fixture(scope="module")
def data():
    train, test = arithmetic.make_splits(seed=0, n_train=128, n_test=16)
    return arithmetic.sft_rows(train), arithmetic.sft_rows(test)


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer, data):
    model = make_tiny_llama(tiny_tokenizer, seed=0, hidden=64, layers=2)
    result = train_sft(model, tiny_tokenizer, data[0], _options(60))
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]  # the teacher has learned something
    return model.eval()


def _options(steps=50, **kw):
    return TrainOptions(steps=steps, batch_size=8, lr=3e-3, schedule="constant", **kw)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a, b, prefix):
    return all(torch.equal(a[n], b[n]) for n in a if n.startswith(prefix))


def _unchanged(model, snapshot, prefix=""):
    return all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters() if n.startswith(prefix))


def test_logit_kd_halves_heldout_kl_and_raises_top1_agreement(tiny_tokenizer, teacher, data):
    student = make_tiny_llama(tiny_tokenizer, seed=1, hidden=32, layers=1)
    frozen = _snapshot(teacher)
    before = kd_metrics(teacher, student, tiny_tokenizer, data[1], _options())
    result = distill(teacher, student, tiny_tokenizer, data[0], _options(50))
    after = kd_metrics(teacher, student, tiny_tokenizer, data[1], _options())
    assert result.steps == 50 and result.rows == len(data[0])
    assert after["kl"] < 0.5 * before["kl"]
    assert after["top1_agreement"] > before["top1_agreement"] + 0.3
    assert _unchanged(teacher, frozen)  # the teacher is never trained


@pytest.mark.parametrize("loss,beta", [("reverse_kl", 0.5), ("gjsd", 0.5)])
def test_other_divergences_train(tiny_tokenizer, teacher, data, loss, beta):
    student = make_tiny_llama(tiny_tokenizer, seed=1, hidden=32, layers=1)
    result = distill(teacher, student, tiny_tokenizer, data[0], _options(30),
                     DistillSettings(loss=loss, beta=beta, temperature=2.0, alpha=0.1))
    first, last = result.history[0], result.history[-1]
    # reverse KL is mode-seeking and falls more slowly from a near-uniform student (measured 0.54x at τ=2)
    assert last["divergence"] < 0.7 * first["divergence"] and last["ce"] < first["ce"]


def test_micro_batch_split_does_not_change_the_loss(tiny_tokenizer, teacher, data):
    losses = []
    for batch, accum in ((8, 1), (4, 2)):
        student = make_tiny_llama(tiny_tokenizer, seed=1, hidden=32, layers=1)
        options = TrainOptions(steps=1, batch_size=batch, grad_accum=accum, lr=3e-3)
        losses.append(distill(teacher, student, tiny_tokenizer, data[0], options).history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_feature_kd_with_a_projection_reduces_hidden_mse(tiny_tokenizer, teacher, data, tmp_path):
    student = make_tiny_llama(tiny_tokenizer, seed=1, hidden=32, layers=2)  # width 32 -> teacher width 64
    options = _options(40, checkpoint_every=40, output_dir=str(tmp_path))
    result = distill(teacher, student, tiny_tokenizer, data[0], options,
                     DistillSettings(kind="feature", logit_weight=0.0))
    hidden = [h["hidden"] for h in result.history]
    assert sum(hidden[-5:]) / 5 < 0.5 * sum(hidden[:5]) / 5
    # the checkpoint holds the student as a plain HF model, and the projections beside it
    saved = tmp_path / "step-40"
    assert (saved / "distill_projector.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    ids = torch.tensor([[1, 10, 20, 30]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)


def test_progressive_anneals_temperature_and_freezes_blocks_bottom_up(tiny_tokenizer, teacher, data):
    student = make_tiny_llama(tiny_tokenizer, seed=1, hidden=32, layers=2)
    snapshots = {}
    settings = DistillSettings(kind="progressive", temperature=4.0, final_temperature=1.0)
    result = distill(teacher, student, tiny_tokenizer, data[0], _options(10), settings,
                     on_step=lambda step, _m: snapshots.__setitem__(step, _snapshot(student)))
    temperatures = [h["temperature"] for h in result.history]
    assert temperatures[0] == 4.0 and temperatures[-1] == 1.0 and temperatures == sorted(temperatures, reverse=True)
    # two blocks, ten steps: stage 0 (steps 1-5) trains both blocks, stage 1 (steps 6-10) holds block 0
    assert not _same(snapshots[1], snapshots[5], "model.layers.0.")
    assert _same(snapshots[5], snapshots[10], "model.layers.0.")
    assert not _same(snapshots[5], snapshots[10], "model.layers.1.")
    assert all(p.requires_grad for p in student.parameters())  # the schedule is undone afterwards


def test_teacher_assistant_chain(tiny_tokenizer, teacher, data):
    assistant = make_tiny_llama(tiny_tokenizer, seed=2, hidden=48, layers=2)
    student = make_tiny_llama(tiny_tokenizer, seed=3, hidden=32, layers=1)
    links = []
    results = distill_chain(teacher, [assistant, student], tiny_tokenizer, data[0], _options(20),
                            on_step=lambda _s, m: links.append(m["link"]))
    assert len(results) == 2 and links == [0] * 20 + [1] * 20
    for result in results:
        assert result.history[-1]["divergence"] < 0.5 * result.history[0]["divergence"]


def test_prune_then_distill(tiny_tokenizer, teacher, data):
    frozen = _snapshot(teacher)
    student, result, stats = prune_then_distill(teacher, tiny_tokenizer, data[0], _options(30),
                                                ffn_fraction=0.5, head_fraction=0.5, n_layers=1)
    assert stats["depth"]["removed"] and stats["width"]["intermediate_size"] == (128, 64)
    assert student.config.num_hidden_layers == 1 and student.config.num_attention_heads == 2
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert result.history[-1]["divergence"] < 0.5 * result.history[0]["divergence"]
    assert _unchanged(teacher, frozen)


def test_plain_texts_are_distilled_on_every_token(tiny_tokenizer, teacher):
    student = make_tiny_llama(tiny_tokenizer, seed=1, hidden=32, layers=1)
    texts = CORPUS[:16]
    result = distill(teacher, student, tiny_tokenizer, texts, _options(2, max_length=64))
    assert result.rows == 16
    lengths = sorted(len(tiny_tokenizer(t)["input_ids"]) - 1 for t in texts)
    assert result.history[0]["tokens"] >= 8 * lengths[0]  # every next-token position of the texts is supervised


def test_a_tokenizer_mismatch_is_refused(tiny_tokenizer, teacher, data):
    student = make_tiny_llama(tiny_tokenizer, seed=1, hidden=32, layers=1)
    other = build_tokenizer([f"the quick brown fox jumps over the lazy dog {i}" for i in range(50)], vocab_size=300)
    with pytest.raises(VocabMismatchError, match="tokenizers differ"):
        distill(teacher, student, tiny_tokenizer, data[0], _options(1), teacher_tokenizer=other)
    small = copy.deepcopy(student)
    small.resize_token_embeddings(len(tiny_tokenizer) - 10)
    with pytest.raises(VocabMismatchError, match="student's LM head has"):
        distill(teacher, small, tiny_tokenizer, data[0], _options(1))
    # heads padded to different sizes for the same tokenizer are compared over the tokenizer's ids
    padded = copy.deepcopy(student)
    padded.resize_token_embeddings(len(tiny_tokenizer) + 6)
    assert check_shared_vocab(teacher, padded, tiny_tokenizer, tiny_tokenizer) == len(tiny_tokenizer)
    assert check_shared_vocab(teacher, student, tiny_tokenizer) == teacher.config.vocab_size


def test_kd_metrics_refuses_to_report_when_no_token_is_scored(tiny_tokenizer, teacher, data):
    """Every held-out completion emptied by truncation: there is nothing to measure, so no 0 is reported."""
    student = make_tiny_llama(tiny_tokenizer, seed=1, hidden=32, layers=1)
    with pytest.raises(ValueError, match="no supervised tokens"):
        kd_metrics(teacher, student, tiny_tokenizer, data[1], _options(max_length=8))
