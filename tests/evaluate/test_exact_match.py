import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import posttrain.evaluate.exact_match as em
from posttrain.evaluate.exact_match import evaluate_exact_match
from posttrain.models.tokenizer_builder import build_tokenizer
from posttrain.rollout.generate import Generation
from posttrain.tasks.arithmetic import make_splits, verifiable_rows


@pytest.fixture(scope="module")
def setup():
    train, test = make_splits(seed=0, n_train=200, n_test=30)
    tok = build_tokenizer((it["question"] + "\n" + it["answer"] for it in train), vocab_size=300)
    return tok, verifiable_rows(test)


def _scripted_generate(outputs_by_question, calls):
    # Stands in for the real generator: answers each prompt with a fixed text, recording batch sizes.
    def fake(model, tokenizer, prompt_ids, *, max_new_tokens):
        calls.append([len(p) for p in prompt_ids])
        gens = []
        for i, p in enumerate(prompt_ids):
            text = tokenizer.decode(p, skip_special_tokens=True)
            question = next(q for q in outputs_by_question if q in text)
            gens.append(Generation(i, list(p), [], outputs_by_question[question], True))
        return gens
    return fake


def test_scores_orders_and_writes_samples(setup, tmp_path, monkeypatch):
    tok, rows = setup
    outputs = {}
    for i, row in enumerate(rows):
        q, a = row["prompt"][0]["content"], row["answer"]
        outputs[q] = [f"so\n#### {a}", f"#### {int(a) + 1}", "no answer", f"#### {a}.0"][i % 4]
    calls = []
    monkeypatch.setattr(em, "generate", _scripted_generate(outputs, calls))
    seen = []
    path = tmp_path / "out" / "samples.jsonl"
    result = evaluate_exact_match(None, tok, rows, batch_size=8, samples_path=path,
                                  progress=lambda d, t: seen.append((d, t)))
    expected_correct = sum(1 for i in range(len(rows)) if i % 4 in (0, 3))
    assert (result.n, result.correct) == (len(rows), expected_correct)
    assert result.value == expected_correct / len(rows)
    assert result.samples_path == path
    assert seen == [(8, 30), (16, 30), (24, 30), (30, 30)]
    # batches go longest first
    flat = [n for batch in calls for n in batch]
    assert flat == sorted(flat, reverse=True)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(len(rows)))
    for i, (rec, row) in enumerate(zip(lines, rows)):
        assert rec["target"] == row["answer"]
        assert row["prompt"][0]["content"] in rec["prompt"] and rec["prompt"].startswith("<s><|user|>")
        assert rec["correct"] is (i % 4 in (0, 3))
        assert rec["extracted"] == [row["answer"], str(int(row["answer"]) + 1), None, row["answer"] + ".0"][i % 4]
    assert result.records == lines
    lo, hi = result.ci95
    assert lo < result.value < hi


def test_runs_with_a_real_tiny_model(setup, tmp_path):
    tok, rows = setup
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256,
                                         initializer_range=0.3)).eval()  # peaked: no near-ties
    a = evaluate_exact_match(model, tok, rows[:10], batch_size=4, max_new_tokens=6, samples_path=tmp_path / "s.jsonl")
    b = evaluate_exact_match(model, tok, rows[:10], batch_size=3, max_new_tokens=6)
    assert a.n == 10 and 0 <= a.correct <= 10 and b.samples_path is None
    # greedy and order-preserving: the batching does not change any output
    assert [r["output"] for r in a.records] == [r["output"] for r in b.records]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 10


def test_empty_rows_raise(setup):
    tok, _ = setup
    with pytest.raises(ValueError):
        evaluate_exact_match(None, tok, [])
