"""GSM8K the lm-eval way: exact prompts, few-shot draws, stop strings, both metrics, real data on tiny models."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from posttrain.evaluate.benchmarks import EvalContext, get_benchmark, gsm8k
from posttrain.evaluate.harness import BenchmarkUnavailable


def _write_data(root: Path, train: list[dict], test: list[dict]) -> Path:
    (root / "gsm8k").mkdir(parents=True)
    for name, rows in (("train", train), ("test", test)):
        (root / "gsm8k" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


TRAIN = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
         for i in range(8)]
TEST = [{"question": "Janet has 3 eggs and buys 15. How many?", "answer": "3 + 15 = 18\n#### 18"},
        {"question": "A costs $1,000. What is 2 A?", "answer": "2 * 1000 = 2000\n#### 2,000"},
        {"question": "What is 5 - 8?", "answer": "5 - 8 = -3\n#### -3"}]


def _fake_generate(outputs: list[str], calls: list[dict]):
    def fake(model, tokenizer, contexts, **kwargs):
        calls.append({"contexts": list(contexts), **kwargs})
        return [[outputs[i]] for i in range(len(contexts))]
    return fake


def test_prompt_fewshot_format_stops_and_metrics(tmp_path, monkeypatch, tiny_tokenizer) -> None:
    data = _write_data(tmp_path, TRAIN, TEST)
    calls: list[dict] = []
    outputs = [" 3 + 15 = 18.\n#### 18", " It costs $2,000.", " I do not know"]
    monkeypatch.setattr(gsm8k, "generate_until", _fake_generate(outputs, calls))
    ctx = EvalContext(model=None, tokenizer=tiny_tokenizer, data_dir=data, max_length=1024,
                      options={"num_fewshot": 2})
    result = gsm8k.run_gsm8k(ctx)

    draws = [random.Random(1234).sample(range(len(TRAIN)), 2) for _ in range(1)]  # the first test row's draw
    first = "".join(f"Question: {TRAIN[j]['question']}\nAnswer: {TRAIN[j]['answer']}\n\n" for j in draws[0])
    expected = first + f"Question: {TEST[0]['question']}\nAnswer:"
    assert calls[0]["contexts"][0] == expected
    assert result.samples[0]["prompt"] == expected and result.samples[0]["fewshot_indices"] == draws[0]
    assert calls[0]["until"] == ["Question:", "</s>", "<|im_end|>"]  # the tiny tokenizer's EOS is "</s>"
    assert calls[0]["max_new_tokens"] == 256 and calls[0]["max_length"] == 1024
    assert calls[0]["add_special_tokens"] is True

    s = result.samples
    assert [x["extracted_strict"] for x in s] == ["18", "[invalid]", "[invalid]"]
    assert [x["extracted_flexible"] for x in s] == ["18", "$2,000.", "[invalid]"]
    assert [x["correct_strict"] for x in s] == [True, False, False]
    assert [x["correct_flexible"] for x in s] == [True, True, False]
    assert result.metrics["exact_match_strict"].value == pytest.approx(1 / 3)
    assert result.metrics["exact_match_flexible"].value == pytest.approx(2 / 3)
    assert result.metrics["exact_match_strict"].n == 3
    assert result.settings["num_fewshot"] == 2 and result.settings["chat_template"] is False


def test_draws_do_not_depend_on_limit() -> None:
    full = gsm8k.fewshot_draws(7473, 1319, 5, 1234)
    rng = random.Random(1234)
    assert full == [rng.sample(range(7473), 5) for _ in range(1319)]
    assert gsm8k.fewshot_draws(10, 3, 0, 1234) == [[], [], []]
    with pytest.raises(ValueError):
        gsm8k.fewshot_draws(3, 1, 5, 1234)


def test_options_and_chat_template(tmp_path, monkeypatch, tiny_tokenizer) -> None:
    data = _write_data(tmp_path, TRAIN, TEST)
    calls: list[dict] = []
    monkeypatch.setattr(gsm8k, "generate_until", _fake_generate(["", "", ""], calls))
    ctx = EvalContext(model=None, tokenizer=tiny_tokenizer, data_dir=data, max_length=512, limit=2,
                      options={"num_fewshot": 0, "max_gen_toks": 99, "chat_template": True,
                               "gsm8k": {"max_gen_toks": 17}})
    result = gsm8k.run_gsm8k(ctx)
    assert calls[0]["max_new_tokens"] == 17 and calls[0]["add_special_tokens"] is False
    prompt = calls[0]["contexts"][0]
    text = f"Question: {TEST[0]['question']}\nAnswer:"
    assert prompt == tiny_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                        add_generation_prompt=True)
    assert prompt.startswith("<s><|user|>\nQuestion: ") and prompt.endswith("<|assistant|>\n")
    assert result.settings["chat_template"] is True and result.metrics["exact_match_strict"].n == 2


def test_missing_data_and_offline_hub(tmp_path, monkeypatch, tiny_tokenizer) -> None:
    with pytest.raises(BenchmarkUnavailable, match="gsm8k"):
        gsm8k.run_gsm8k(EvalContext(model=None, tokenizer=tiny_tokenizer, data_dir=tmp_path))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    started = time.monotonic()
    with pytest.raises(BenchmarkUnavailable, match="openai/gsm8k"):
        gsm8k.run_gsm8k(EvalContext(model=None, tokenizer=tiny_tokenizer, data_dir=None))
    assert time.monotonic() - started < 30


def _check_real(result, n: int) -> None:
    assert result.benchmark == "gsm8k" and len(result.samples) == n
    for name, key in (("exact_match_strict", "correct_strict"), ("exact_match_flexible", "correct_flexible")):
        metric = result.metrics[name]
        assert metric.n == n
        assert metric.value == pytest.approx(sum(s[key] for s in result.samples) / n)
        assert 0.0 <= metric.ci_low <= metric.value <= metric.ci_high <= 1.0
    for s in result.samples:
        assert s["prompt_sha256"] == hashlib.sha256(s["prompt"].encode()).hexdigest() or s["prompt"].startswith("…")
        assert s["correct_strict"] == gsm8k.gsm8k_match(gsm8k.gsm8k_strict(s["output"]), s["target"])
        assert s["correct_flexible"] == gsm8k.gsm8k_match(gsm8k.gsm8k_flexible(s["output"]), s["target"])
        assert not any(stop in s["output"] for stop in result.settings["until"])
        assert len(s["fewshot_indices"]) == 5


def test_real_data_on_tiny_llama(make_llama, tiny_tokenizer, datasets_dir) -> None:
    ctx = EvalContext(model=make_llama(), tokenizer=tiny_tokenizer, data_dir=datasets_dir, limit=3, batch_size=2,
                      options={"max_gen_toks": 8})
    result = get_benchmark("gsm8k")(ctx)
    _check_real(result, 3)
    # 5-shot prompts are far longer than 256 positions: the budget holds because the context is left-truncated
    assert result.settings["max_length"] == 256 and result.settings["left_truncated_to"] == 248
    assert result.settings["n_available"] == 1319


@pytest.fixture(scope="module")
def gpt2_with_own_tokenizer(datasets_dir):
    """GPT-2 (learned positions) with a byte-level BPE trained here: one <|endoftext|>, no BOS, no pad."""
    lines = (datasets_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:300]
    corpus = [json.loads(x)["question"] + "\n" + json.loads(x)["answer"] for x in lines]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    eos = tok.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=eos, eos_token_id=eos)).eval()
    return model, tok


def test_real_data_on_gpt2_with_another_tokenizer(gpt2_with_own_tokenizer, datasets_dir) -> None:
    model, tok = gpt2_with_own_tokenizer
    assert tok.pad_token_id is None and tok.bos_token is None
    result = get_benchmark("gsm8k")(EvalContext(model, tok, data_dir=datasets_dir, limit=2, batch_size=2,
                                                options={"max_gen_toks": 8}))
    _check_real(result, 2)
    assert result.settings["until"][-1] == "<|endoftext|>" and result.settings["max_length"] == 128
