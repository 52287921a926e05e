import pytest

from posttrain.evaluate.benchmarks.mt_bench import load_questions, load_references
from posttrain.evaluate.judge_parsing import (checked_rating, format_pair, format_single, load_judge_prompts,
                                              pair_prompt_name, parse_rating, parse_verdict, resolve_swap,
                                              single_prompt_name)


@pytest.mark.parametrize("text, expected", [
    ("The answer is fine. Rating: [[8]]", 8.0),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [8]", 8.0),                       # FastChat's single-bracket fallback
    ("[[3]] first, then [[9]]", 3.0),           # first match wins
    ("[7] but later [[4]]", 4.0),               # the double-bracket pattern is tried first over the whole text
    ("Rating: [[10]]", 10.0),
    ("[[ten]]", None),
    ("no rating here", None),
    ("Rating: [[ 7 ]]", None),                  # FastChat's patterns allow no spaces
    ("", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


def test_rating_range_is_checked_separately():
    assert checked_rating("Rating: [[0]]") == (None, "rating 0 outside 1-10")
    assert checked_rating("Rating: [[11]]") == (None, "rating 11 outside 1-10")
    assert checked_rating("[[1]]") == (1.0, None)
    assert checked_rating("nothing") == (None, "no [[rating]] in the judge output")


@pytest.mark.parametrize("text, expected", [
    ("Assistant A is clearly better. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both are equal. [[C]]", "tie"),
    ("[[B]] ... on reflection [[A]]", "A"),     # FastChat checks [[A]] before [[B]]
    ("A is better", None),
    ("[A]", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("first, second, outcome", [
    ("A", "B", "win"),      # model preferred in both positions
    ("B", "A", "loss"),     # baseline preferred in both positions
    ("A", "A", "tie"),      # position A always wins: inconsistent
    ("B", "B", "tie"),
    ("tie", "B", "tie"),
    ("A", "tie", "tie"),
    ("tie", "tie", "tie"),
    (None, "B", "error"),
    ("A", None, "error"),
])
def test_resolve_swap(first, second, outcome):
    assert resolve_swap(first, second) == outcome


def test_prompt_names():
    assert single_prompt_name("writing", 1) == "single-v1"
    assert single_prompt_name("stem", 2) == "single-v1-multi-turn"
    assert single_prompt_name("math", 1) == "single-math-v1"
    assert single_prompt_name("coding", 2) == "single-math-v1-multi-turn"
    assert pair_prompt_name("reasoning", 1) == "pair-math-v1"
    assert pair_prompt_name("humanities", 2) == "pair-v2-multi-turn"
    assert single_prompt_name("extraction", 1) == "single-v1"  # extraction is not reference-guided


def test_math_judge_prompt_holds_the_reference_answer(datasets_dir):
    prompts = load_judge_prompts(datasets_dir / "mt_bench" / "judge_prompts.jsonl")
    assert len(prompts) == 8
    question = next(q for q in load_questions(datasets_dir) if q["category"] == "math")
    reference = load_references(datasets_dir)[question["question_id"]]
    answers = ["MODEL-TURN-1", "MODEL-TURN-2"]

    system, user = format_single(prompts["single-math-v1"], question["turns"], answers, 1, reference)
    assert system == "You are a helpful assistant."
    assert reference[0] in user and question["turns"][0] in user and "MODEL-TURN-1" in user
    assert "[The Start of Reference Answer]\n" + reference[0] + "\n[The End of Reference Answer]" in user
    assert reference[1] not in user

    system, user = format_single(prompts["single-math-v1-multi-turn"], question["turns"], answers, 2, reference)
    assert "focus on the assistant's answer to the second question" in system
    for text in (*reference, *question["turns"], *answers):
        assert text in user

    _, user = format_pair(prompts["pair-math-v1"], question["turns"], ["A1", "A2"], ["B1", "B2"], 1, reference)
    assert reference[0] in user
    a_block = user.index("[The Start of Assistant A's Answer]\nA1\n")
    assert a_block < user.index("[The Start of Assistant B's Answer]\nB1\n")


def test_general_prompts_fill_every_field(datasets_dir):
    prompts = load_judge_prompts(datasets_dir / "mt_bench" / "judge_prompts.jsonl")
    turns = ["Q1", "Q2"]
    _, user = format_single(prompts["single-v1"], turns, ["a1", "a2"], 1)
    assert "[Question]\nQ1\n" in user and "[The Start of Assistant's Answer]\na1\n" in user and "{" not in user
    _, user = format_single(prompts["single-v1-multi-turn"], turns, ["a1", "a2"], 2)
    assert "### User:\nQ2\n\n### Assistant A:\na2\n" in user
    _, user = format_pair(prompts["pair-v2-multi-turn"], turns, ["a1", "a2"], ["b1", "b2"], 2)
    assert "### Assistant A:\na2\n" in user and "### Assistant B:\nb2\n" in user
