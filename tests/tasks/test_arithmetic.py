import re

from posttrain.rewards.verifiable import extract_final_answer
from posttrain.tasks.arithmetic import (TEMPLATES, make_item, make_splits, preference_rows, sft_rows,
                                        verifiable_rows)

import random


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
