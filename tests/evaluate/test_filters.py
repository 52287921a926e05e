"""lm-eval's GSM8K filters and exact match, checked value by value on tricky strings."""

from __future__ import annotations

import pytest

from posttrain.evaluate.filters import (GSM8K_IGNORE_REGEXES, INVALID, exact_match, gsm8k_flexible, gsm8k_match,
                                        gsm8k_strict, normalize_for_match, regex_extract)

REFERENCE = "She pays 2 * 500 = <<2*500=1000>>1000 dollars.\n#### 1000"


@pytest.mark.parametrize("output, strict, flexible", [
    ("1,000.", INVALID, "1,000."),
    ("$5", INVALID, "$5"),
    ("#### -3", "-3", "-3"),
    ("The answer is 12.5.", INVALID, "12.5."),
    ("3 apples and 4 pears make 7", INVALID, "7"),
    ("no number here", INVALID, INVALID),
    ("", INVALID, INVALID),
    ("#### 1,000.\nQuestion", "1,000.", "1,000."),
    ("#### 5 then #### 6", "5", "6"),            # strict takes the first "####", flexible the last number
    ("costs $1,234.50 in total", INVALID, "$1,234.50"),
    ("x = -7 and y = 9", INVALID, "9"),
    ("so -7", INVALID, "-7"),                   # a single digit is only found by the second alternative
    ("####5", INVALID, "5"),                      # strict needs the space after ####
    ("#### .", ".", INVALID),                   # strict accepts punctuation-only; "." alone is too short for flexible
])
def test_gsm8k_extraction(output: str, strict: str, flexible: str) -> None:
    assert gsm8k_strict(output) == strict
    assert gsm8k_flexible(output) == flexible


@pytest.mark.parametrize("text, expected", [
    ("1,000.", "1000"),
    ("$5", "5"),
    ("-3", "-3"),
    ("12.5.", "12.5"),
    (REFERENCE, "1000"),                          # everything up to the last "#### " is dropped
    ("a\n#### 1\nb #### 2", "2"),                # (?s): the dot crosses lines, greedy to the last marker
    ("1..", "1."),                                # only one trailing dot goes
    ("ABC", "abc"),
    (INVALID, INVALID),
])
def test_normalization(text: str, expected: str) -> None:
    assert normalize_for_match(text, GSM8K_IGNORE_REGEXES, ignore_case=True) == expected


@pytest.mark.parametrize("extracted, reference, expected", [
    ("1,000.", REFERENCE, True),
    ("1000", REFERENCE, True),
    ("$1,000", REFERENCE, True),
    ("1000.0", REFERENCE, False),                 # string equality, not numeric
    ("100", REFERENCE, False),
    (INVALID, REFERENCE, False),
    ("-3", "#### -3", True),
    ("12.5.", "#### 12.5", True),
    (" 1000", REFERENCE, False),                  # no whitespace normalisation beyond the filter's strip
])
def test_gsm8k_match(extracted: str, reference: str, expected: bool) -> None:
    assert gsm8k_match(extracted, reference) is expected


def test_full_pipeline_on_outputs() -> None:
    assert gsm8k_match(gsm8k_strict("She pays 1,000.\n#### 1,000."), REFERENCE)
    assert gsm8k_match(gsm8k_flexible("Total: $1,000."), REFERENCE)
    assert not gsm8k_match(gsm8k_strict("Total: $1,000."), REFERENCE)
    assert not gsm8k_match(gsm8k_flexible("It is 1000 or 999"), REFERENCE)


def test_regex_extract_groups_and_fallback() -> None:
    assert regex_extract("a1 b22 c3", r"([a-z])(\d+)", 1) == "b"          # first non-empty group of the match
    assert regex_extract("x", r"(\d)", 0, fallback="none") == "none"
    assert regex_extract("1 2", r"(\d)", 5) == INVALID                  # out-of-range selection
    assert regex_extract("a  7  b", r"(\s*7\s*)") == "7"                # stripped


def test_exact_match_options() -> None:
    assert exact_match("Paris", "paris", ignore_case=True)
    assert not exact_match("Paris", "paris")
    assert exact_match("a-b", "ab", ignore=["-"])
