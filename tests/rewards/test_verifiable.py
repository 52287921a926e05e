import pytest

from posttrain.rewards.verifiable import answers_match, extract_final_answer, hash_answer_reward


@pytest.mark.parametrize("text, expected", [
    ("Sam has 7 + 5 = 12 apples.\n#### 12", "12"),
    ("#### 12", "12"),
    ("####12", "12"),
    ("#### 1,234", "1234"),
    ("#### $1,234.", "1234"),
    ("#### -3", "-3"),
    ("#### -$3", "-3"),
    ("#### +4", "4"),
    ("#### 1.5", "1.5"),
    ("#### .5", ".5"),
    ("#### 12.0", "12.0"),
    ("#### 12.", "12"),
    ("#### 1 000", "1000"),
    ("#### 3\n#### 4", "4"),           # the LAST marker wins
    ("#### 4\nmore words", "4"),       # only the marker's own line counts
    ("#### 5 #### 6", "6"),
    ("#### 12 apples", None),          # not a single number: no guessing
    ("#### ", None),
    ("####", None),
    ("#### 1e5", None),
    ("#### 1.2.3", None),
    ("#### --3", None),
    ("the answer is 12", None),
    ("", None),
    ("# 12", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("12", "12", True),
    ("12.0", "12", True),
    ("12", "12.00", True),
    ("-0", "0", True),
    ("1,000", "1000", True),
    ("12", "13", False),
    ("-12", "12", False),
    (None, "12", False),
    ("12", None, False),
    ("yes", "yes", True),
    (" yes ", "yes", True),
    ("yes", "Yes", False),
    ("12", "twelve", False),
])
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_hash_answer_reward():
    completions = ["x = 12\n#### 12", "#### 12.0", "#### 13", "no marker 12", "#### 12 apples"]
    assert hash_answer_reward(completions, ["12"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert hash_answer_reward([], []) == []
    with pytest.raises(ValueError):
        hash_answer_reward(["#### 1"], [])
