"""HumanEval: the opt-in, the pass@k estimator, scoring through the sandbox, real data on tiny models."""

from __future__ import annotations

import gzip
import json
from math import comb

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from posttrain.evaluate import sandbox
from posttrain.evaluate.benchmarks import EvalContext, get_benchmark, humaneval
from posttrain.evaluate.harness import BenchmarkUnavailable, run_benchmarks


def test_pass_at_k_matches_the_closed_form() -> None:
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert humaneval.pass_at_k(200, 0, 100) == 0.0
    assert humaneval.pass_at_k(200, 101, 100) == 1.0
    assert humaneval.pass_at_k(200, 3, 1) == pytest.approx(3 / 200)
    assert humaneval.pass_at_k(200, 10, 100) == pytest.approx(1 - comb(190, 100) / comb(200, 100), rel=1e-9)
    for bad in ((3, 1, 4), (3, 4, 1), (3, 1, 0)):
        with pytest.raises(ValueError):
            humaneval.pass_at_k(*bad)


def test_refuses_without_the_explicit_opt_in(tiny_tokenizer, datasets_dir) -> None:
    for options in ({}, {"allow_code_execution": False}, {"allow_code_execution": "yes"}):
        # model=None: refusing must come before any generation (or data loading) is attempted
        with pytest.raises(humaneval.CodeExecutionNotAllowed, match="--allow-code-execution"):
            humaneval.run_humaneval(EvalContext(model=None, tokenizer=tiny_tokenizer, data_dir=datasets_dir,
                                                options=options))
    assert issubclass(humaneval.CodeExecutionNotAllowed, BenchmarkUnavailable)
    out = run_benchmarks(None, tiny_tokenizer, ["humaneval"], data_dir=datasets_dir)
    assert "humaneval" in out["skipped"] and "humaneval" not in out["results"]


def _problems(datasets_dir) -> list[dict]:
    with gzip.open(datasets_dir / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_scoring_with_known_completions(monkeypatch, tiny_tokenizer, datasets_dir) -> None:
    """Canonical solutions pass and wrong ones fail through the whole benchmark; pass@k from the records."""
    by_prompt = {p["prompt"]: p for p in _problems(datasets_dir)}
    calls: list[dict] = []

    def fake_generate(model, tokenizer, contexts, **kwargs):
        calls.append(kwargs)
        out = []
        for i, ctx_text in enumerate(contexts):
            right, wrong = by_prompt[ctx_text]["canonical_solution"], "    raise NotImplementedError\n"
            # problem i gets i + 1 correct samples out of 3 (the last problem gets 3 of 3)
            out.append([right if j <= i else wrong for j in range(kwargs["num_samples"])])
        return out

    monkeypatch.setattr(humaneval, "generate_until", fake_generate)
    ctx = EvalContext(model=None, tokenizer=tiny_tokenizer, data_dir=datasets_dir, limit=3, seed=7,
                      options={"allow_code_execution": True, "num_samples": 3, "ks": [1, 2, 5], "timeout_s": 5})
    result = humaneval.run_humaneval(ctx)
    kwargs = calls[0]
    assert kwargs["until"] == list(humaneval.CODEX_STOPS) + ["</s>"]
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.2 and kwargs["top_p"] == 0.95
    assert kwargs["max_new_tokens"] == 512

    assert set(result.metrics) == {"pass@1", "pass@2"}  # k = 5 > n = 3 is not reported
    assert [s["passed"] for s in result.samples] == [True, False, False, True, True, False, True, True, True]
    assert result.metrics["pass@1"].value == pytest.approx((1 / 3 + 2 / 3 + 1) / 3)
    assert result.metrics["pass@1"].value == pytest.approx(sum(s["passed"] for s in result.samples) / 9)
    expected_2 = [1 - comb(3 - c, 2) / comb(3, 2) for c in (1, 2, 3)]
    assert result.metrics["pass@2"].value == pytest.approx(sum(expected_2) / 3)
    assert result.metrics["pass@2"].n == 3
    failed = [s for s in result.samples if not s["passed"]]
    assert all(s["status"] == "failed" and "NotImplementedError" in s["reason"] for s in failed)
    assert result.settings["sandbox"]["network_isolated"] is sandbox.NETWORK_ISOLATED
    assert all(s["network_isolated"] is sandbox.NETWORK_ISOLATED for s in result.samples)


def _check_real(result, n_problems: int, n_samples: int) -> None:
    assert result.benchmark == "humaneval"
    assert len(result.samples) == n_problems * n_samples
    assert result.metrics["pass@1"].n == n_problems
    assert result.metrics["pass@1"].value == pytest.approx(sum(s["passed"] for s in result.samples)
                                                           / len(result.samples))
    for s in result.samples:
        assert s["status"] in ("passed", "failed", "timed out") and s["reason"]
        assert s["correct"] is s["passed"] is (s["status"] == "passed")
        assert not any(stop in s["completion"] for stop in result.settings["until"])


def test_real_data_on_tiny_llama(make_llama, tiny_tokenizer, datasets_dir) -> None:
    ctx = EvalContext(model=make_llama(), tokenizer=tiny_tokenizer, data_dir=datasets_dir, limit=3, batch_size=3,
                      options={"allow_code_execution": True, "max_gen_toks": 8})
    result = get_benchmark("humaneval")(ctx)
    _check_real(result, 3, 1)
    assert result.settings["decoding"] == "greedy" and result.settings["ks"] == [1]
    assert result.settings["n_problems"] == 3 and result.settings["max_gen_toks"] == 8


def test_real_data_on_gpt2_with_another_tokenizer(datasets_dir) -> None:
    corpus = [p["prompt"] + p["canonical_solution"] for p in _problems(datasets_dir)]
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
    ctx = EvalContext(model, tok, data_dir=datasets_dir, limit=2, batch_size=2,
                      options={"allow_code_execution": True, "max_gen_toks": 8, "num_samples": 2})
    result = get_benchmark("humaneval")(ctx)
    _check_real(result, 2, 2)
    assert set(result.metrics) == {"pass@1"} and result.settings["until"][-1] == "<|endoftext|>"
