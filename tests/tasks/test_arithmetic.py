import re

from posttrain.rewards.verifiable import extract_final_answer
import random

import pytest

from posttrain.tasks.arithmetic import (TEMPLATES, alt_format_answer, make_item, make_splits, preference_rows,
                                        sft_rows, verifiable_rows)


def _check_arithmetic(answer: str) -> None:
    # every "a op b = c" in the working is true, and the last c is the #### value
    steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", answer)
    assert steps
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, answer
    assert steps[-1][3] == extract_final_answer(answer)


def test_splits_are_deterministic_and_disjoint():
    train, test = make_splits(seed=3, n_train=500, n_test=100)
    train2, test2 = make_splits(seed=3, n_train=500, n_test=100)
    assert (train, test) == (train2, test2)
    assert len(train) == 500 and len(test) == 100
    qs_train = {it["question"] for it in train}
    qs_test = {it["question"] for it in test}
    assert len(qs_train) == 500 and len(qs_test) == 100
    assert not qs_train & qs_test
    assert make_splits(seed=4, n_train=50, n_test=10) != make_splits(seed=3, n_train=50, n_test=10)


def test_every_template_is_correct():
    rng = random.Random(0)
    for kind in TEMPLATES:
        for _ in range(200):
            item = make_item(rng, kind)
            _check_arithmetic(item["answer"])
            assert item["kind"] == kind
            assert item["answer"].endswith("\n#### " + extract_final_answer(item["answer"]))


def test_row_shapes():
    train, _ = make_splits(seed=0, n_train=20, n_test=5)
    v = verifiable_rows(train)
    s = sft_rows(train)
    assert v[0]["prompt"] == [{"role": "user", "content": train[0]["question"]}]
    assert v[0]["answer"] == extract_final_answer(train[0]["answer"])
    assert s[0]["completion"] == [{"role": "assistant", "content": train[0]["answer"]}]
    assert s[0]["prompt"] == v[0]["prompt"]


def test_preference_rejected_is_wrong_and_deterministic():
    train, _ = make_splits(seed=0, n_train=300, n_test=0)
    rows = preference_rows(train, seed=1)
    assert rows == preference_rows(train, seed=1)
    for row, it in zip(rows, train):
        chosen = row["chosen"][0]["content"]
        rejected = row["rejected"][0]["content"]
        assert chosen == it["answer"]
        assert row["rejected"][0]["role"] == "assistant"
        good, bad = extract_final_answer(chosen), extract_final_answer(rejected)
        assert bad is not None and bad != good and int(bad) >= 0
        # the slip is in the final result: the last "= X" equals the (wrong) #### value
        assert re.findall(r"= (\d+)", rejected)[-1] == bad


def test_alt_format_answer_keeps_the_working_and_is_not_verifiable():
    answer = "Sam has 7 + 5 = 12 apples.\n#### 12"
    assert alt_format_answer(answer) == "Sam has 7 + 5 = 12 apples.\nThe answer is 12."
    assert extract_final_answer(alt_format_answer(answer)) is None


def test_sft_rows_alt_format_rates_per_kind():
    train, _ = make_splits(seed=0, n_train=2000, n_test=0)
    rates = {"add": 1.0, "subtract": 0.5}
    rows = sft_rows(train, alt_format_rates=rates, seed=3)
    assert rows == sft_rows(train, alt_format_rates=rates, seed=3)  # deterministic in seed
    alt = {kind: [] for kind in TEMPLATES}
    for row, it in zip(rows, train):
        text = row["completion"][0]["content"]
        assert row["prompt"] == [{"role": "user", "content": it["question"]}]
        assert text in (it["answer"], alt_format_answer(it["answer"]))
        alt[it["kind"]].append(text != it["answer"])
    assert all(alt["add"]) and not any(alt["multiply"]) and not any(alt["two_step"])
    assert 0.4 < sum(alt["subtract"]) / len(alt["subtract"]) < 0.6
    assert sft_rows(train) == sft_rows(train, alt_format_rates={})  # default: every row ends in #### N


def test_sft_rows_refuses_a_rate_outside_0_1():
    with pytest.raises(ValueError, match=r"alt_format_rates\['add'\] must be in \[0, 1\], got 1.5"):
        sft_rows([], alt_format_rates={"add": 1.5})
