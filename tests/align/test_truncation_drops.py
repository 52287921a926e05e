"""Rows that truncation empties, and pairs that only truncation makes identical, are dropped and counted by every
offline trainer (ALGORITHMS.md pitfalls 13, 14): they never reach a loss, and the rest train to finite losses.

The rows are built so that, at MAX_LENGTH tokens, exactly one prompt leaves no room for a completion and exactly one
pair's chosen and rejected differ only after the cut; the test measures both facts with the tokenizer first."""

import math

import pytest

from posttrain.align.engine import TrainOptions
from posttrain.align.kto import train_kto
from posttrain.align.preference import PreferenceSettings, encode_pairs, train_preference
from posttrain.align.reward_model import load_reward_model, train_reward_model
from posttrain.align.sft import train_sft
from posttrain.data.tokenize import encode_completion, encode_prompt

MAX_LENGTH = 24


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


SHORT = _user("Sam has 3 apples.")
LONG = _user("Sam has 3 apples and buys 4 more. How many apples? " * 3)
KEPT = [{"prompt": SHORT, "chosen": _assistant(f"#### {i}"), "rejected": _assistant(f"#### {i + 5}")}
        for i in range(4)]
EMPTIED = {"prompt": LONG, "chosen": _assistant("#### 19"), "rejected": _assistant("#### 20")}
# The same worked solution with a different final answer: identical up to the last few tokens.
SAME_PREFIX = {"prompt": SHORT, "chosen": _assistant("Sam has 3 + 4 = 7.\n#### 7"),
               "rejected": _assistant("Sam has 3 + 4 = 7.\n#### 8")}
ROWS = KEPT + [EMPTIED, SAME_PREFIX]
OPTIONS = TrainOptions(steps=2, batch_size=2, lr=1e-3, max_length=MAX_LENGTH)


def _completion_ids(tokenizer, prompt, completion):
    return encode_completion(tokenizer, prompt, completion).completion_ids


def test_the_rows_are_what_the_other_tests_assume(tiny_tokenizer):
    short, long = len(encode_prompt(tiny_tokenizer, SHORT)), len(encode_prompt(tiny_tokenizer, LONG))
    assert long >= MAX_LENGTH > short  # the long prompt leaves no completion token, the short one does
    for row in KEPT:
        chosen, rejected = (_completion_ids(tiny_tokenizer, SHORT, row[k]) for k in ("chosen", "rejected"))
        assert short + max(len(chosen), len(rejected)) <= MAX_LENGTH and chosen != rejected
    chosen, rejected = (_completion_ids(tiny_tokenizer, SHORT, SAME_PREFIX[k]) for k in ("chosen", "rejected"))
    common = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
    assert chosen != rejected and short + common >= MAX_LENGTH  # they differ only past the cut
    # Without the tight budget nothing is dropped: it is the truncation that empties and equalises.
    pairs, dropped = encode_pairs(tiny_tokenizer, ROWS, TrainOptions(steps=1))
    assert dropped == {} and len(pairs) == len(ROWS)


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_preference_trainers_drop_and_count_both(method, tiny_tokenizer, make_llama):
    result = train_preference(make_llama(), tiny_tokenizer, ROWS, OPTIONS, PreferenceSettings(method=method))
    assert result.dropped == {"empty_after_truncation": 1, "identical_after_truncation": 1}
    assert result.rows == len(KEPT) and all(math.isfinite(h["loss"]) for h in result.history)


def test_reward_model_drops_and_counts_both(tiny_tokenizer, make_llama):
    result = train_reward_model(load_reward_model(make_llama()), tiny_tokenizer, ROWS, OPTIONS)
    assert result.dropped == {"empty_after_truncation": 1, "identical_after_truncation": 1}
    assert result.rows == len(KEPT) and all(math.isfinite(h["loss"]) for h in result.history)


def test_sft_drops_and_counts_the_emptied_row_and_keeps_the_truncated_one(tiny_tokenizer, make_llama):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS]
    result = train_sft(make_llama(), tiny_tokenizer, rows, OPTIONS)
    # A completion cut short but not emptied is still a demonstration; only the empty one is dropped.
    assert result.dropped == {"empty_after_truncation": 1} and result.rows == len(ROWS) - 1
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_kto_drops_and_counts_the_emptied_rows(tiny_tokenizer, make_llama):
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in ROWS for side in ("chosen", "rejected")]
    result = train_kto(make_llama(), tiny_tokenizer, rows, OPTIONS)
    assert result.dropped == {"empty_after_truncation": 2} and result.rows == len(rows) - 2  # both sides of EMPTIED
    assert all(math.isfinite(h["loss"]) for h in result.history)
