import pytest

from posttrain.data.profile import field_text, profile, row_hash
from posttrain.data.schema import DataKind


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


class SpaceTokenizer:
    """One token per whitespace-separated word; records how it was called."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append(add_special_tokens)
        return {"input_ids": list(range(len(text.split())))}


PREF = [
    {"prompt": [U("ab")], "chosen": [A("good one")], "rejected": [A("bad")]},
    {"prompt": [U("abcd"), A("x y"), U("z")], "chosen": [A("fine")], "rejected": [A("no no no")]},
    {"prompt": [U("ab")], "chosen": [A("good one")], "rejected": [A("bad")]},  # duplicate of row 1
]


def test_preference_profile_exact():
    p = profile(PREF, DataKind.PREFERENCE)
    assert p["kind"] == "preference"
    assert (p["rows"], p["duplicates"]) == (3, 1)
    # prompt texts: "ab" (2), "abcd\nx y\nz" (10), "ab" (2)
    assert p["chars"]["prompt"] == {"min": 2, "mean": 14 / 3, "max": 10}
    assert p["chars"]["chosen"] == {"min": 4, "mean": 20 / 3, "max": 8}
    assert p["chars"]["rejected"] == {"min": 3, "mean": 14 / 3, "max": 8}
    assert "tokens" not in p


def test_token_lengths_without_special_tokens():
    tok = SpaceTokenizer()
    p = profile(PREF, "preference", tokenizer=tok)
    assert p["tokens"]["prompt"] == {"min": 1, "mean": 2.0, "max": 4}  # 1, 4 ("abcd x y z"), 1 words
    assert p["tokens"]["chosen"] == {"min": 1, "mean": 5 / 3, "max": 2}
    assert p["tokens"]["rejected"] == {"min": 1, "mean": 5 / 3, "max": 3}
    assert tok.calls == [False] * 9


def test_token_lengths_with_a_real_hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[UNK]")
    rows = [{"prompt": [U("a b"), A("a")], "completion": [A("b b b b")]}]
    p = profile(rows, DataKind.SFT, tokenizer=tok)
    assert p["tokens"] == {"prompt": {"min": 3, "mean": 3.0, "max": 3}, "completion": {"min": 4, "mean": 4.0, "max": 4}}


def test_unpaired_label_balance():
    rows = [{"prompt": [U("q")], "completion": [A(c)], "label": lab} for c, lab in
            [("a", True), ("b", False), ("c", False), ("d", False)]]
    p = profile(rows, DataKind.UNPAIRED)
    assert p["labels"] == {"true": 1, "false": 3, "true_fraction": 0.25}
    assert p["duplicates"] == 0


def test_verifiable_numeric_fraction():
    rows = [{"prompt": [U("q")], "answer": a} for a in ["18", "-3", "2.5", "Paris", "1000"]]
    p = profile(rows, DataKind.VERIFIABLE)
    assert (p["numeric_answers"], p["numeric_answer_fraction"]) == (4, 0.8)
    assert p["chars"]["answer"] == {"min": 2, "mean": 16 / 5, "max": 5}


def test_empty_rows_give_none_not_zero():
    p = profile([], DataKind.UNPAIRED)
    assert (p["rows"], p["duplicates"]) == (0, 0)
    assert p["chars"] == {"prompt": None, "completion": None}
    assert p["labels"] == {"true": 0, "false": 0, "true_fraction": None}


def test_row_hash_is_stable_and_key_order_free():
    a = {"prompt": [U("q")], "completion": [A("a")]}
    b = {"completion": [{"content": "a", "role": "assistant"}], "prompt": [{"content": "q", "role": "user"}]}
    assert row_hash(a) == row_hash(b)
    assert row_hash(a) != row_hash({**a, "completion": [A("b")]})
    # sha256 of the canonical JSON text {"x":"é"} (checked with `printf '{"x":"é"}' | sha256sum`)
    assert row_hash({"x": "é"}) == "97f06f396a709c3a29824e1cc794eeb98e2d1a262d7d455439d286d42803f0fe"


def test_field_text():
    assert field_text([U("a"), A("b")]) == "a\nb"
    assert field_text("18") == "18"
