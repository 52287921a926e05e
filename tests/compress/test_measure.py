"""Measurement of an artifact against its base: identical models agree fully; int8 is measured, not assumed."""

import pytest
import torch

from posttrain.compress.int8 import load_int8, quantize_model_to_dir
from posttrain.compress.measure import compare_on_texts, measure_artifact
from posttrain.align.engine import save_pretrained


def test_identical_model_has_full_agreement_and_equal_perplexity(make_llama):
    model = make_llama()
    texts = [[1, 10, 11, 12, 13, 14], [1, 20, 21]]
    ppl, base_ppl, agree, positions = compare_on_texts(model, model, texts)
    assert ppl == pytest.approx(base_ppl) and agree == 1.0 and positions == 7


def test_int8_artifact_measurement(make_llama, tiny_tokenizer, tmp_path):
    model = make_llama()
    base_dir = save_pretrained(model, tiny_tokenizer, tmp_path / "base")
    art = quantize_model_to_dir(model, tiny_tokenizer, tmp_path / "int8")
    texts = [tiny_tokenizer("Sam has 3 apples and buys 4 more.")["input_ids"]]
    m = measure_artifact(model, base_dir, art, lambda: load_int8(art), texts, texts[0][:5], "transformers (int8)")
    assert 0 < m.size_bytes < m.base_size_bytes and m.tokens_per_s > 0 and m.load_seconds > 0
    assert m.positions == len(texts[0]) - 1 and 0.0 <= m.top1_agreement <= 1.0
    with torch.no_grad():  # the perplexity is the one the reloaded artifact really has
        logits = load_int8(art)(input_ids=torch.tensor(texts)).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(texts[0][1:]))
    assert m.perplexity == pytest.approx(float(torch.exp(nll)), rel=1e-5)
