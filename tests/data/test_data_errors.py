from posttrain.data.errors import DataError, RowRef, describe


def test_message_format():
    e = DataError("data/train.jsonl", 17, "chosen", "a non-empty string", describe(""))
    assert str(e) == "data/train.jsonl: row 17, field 'chosen': expected a non-empty string, got '' (empty)"
    assert isinstance(e, ValueError)
    assert (e.file, e.row, e.field, e.expected, e.got, e.drop_reason) == (
        "data/train.jsonl", 17, "chosen", "a non-empty string", "'' (empty)", None)


def test_file_level_and_row_level_without_field():
    assert str(DataError("d.json", None, None, "a JSON array", "null")) == "d.json: expected a JSON array, got null"
    row_level = DataError("d.jsonl", 3, None, "a JSON object", "'x'")
    assert str(row_level) == "d.jsonl: row 3: expected a JSON object, got 'x'"
    assert str(DataError("d.csv", None, "a", "x", "y")) == "d.csv: field 'a': expected x, got y"


def test_row_ref_builds_errors():
    e = RowRef("f.jsonl", 2).error("label", "true or false", "1 (a number)", drop_reason="r")
    assert (e.file, e.row, e.field, e.drop_reason) == ("f.jsonl", 2, "label", "r")


def test_describe_is_short():
    long = describe("x" * 10_000)
    assert len(long) <= 100
    assert long.endswith("…' (10000 chars)")
    assert len(describe(list(range(1000)))) <= 90
    assert describe([1, 2]) == "[1, 2] (a list of 2)"
    assert describe({"a": 1, "b": 2}) == "an object with fields 'a', 'b'"
    assert describe({}) == "an empty object"
    assert describe(None) == "null"
    assert describe(True) == "true (a boolean)"
    assert describe(3.5) == "3.5 (a number)"
    assert describe("  ") == "'  ' (blank)"
    assert describe("ok") == "'ok'"


def test_got_is_capped_even_when_callers_pass_long_text():
    assert len(DataError("f", 1, "x", "y", "z" * 1000).got) <= 160


# ------------------------------------------------------------------------------- preference rows without a prompt

def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PROMPT_EXPECTED = ("expected a non-empty prompt, or 'chosen' and 'rejected' conversations that begin with the same "
                   "non-empty prompt turn (as HH-RLHF transcripts do)")


def test_pairs_without_a_prompt_are_refused_at_the_data_stage(tmp_path):
    import pytest

    from posttrain.data import prepare

    path = _jsonl(tmp_path / "pairs.jsonl", [{"chosen": "4", "rejected": "5"}] * 3)
    with pytest.raises(DataError) as info:
        prepare(path)
    assert str(info.value) == (f"{path}: row 1, field 'prompt': {PROMPT_EXPECTED}, got no 'prompt' field (the row "
                               "has fields 'chosen', 'rejected'), and 'chosen' and 'rejected' share no prompt turn")


def test_one_null_prompt_among_good_rows_names_its_row(tmp_path):
    import pytest

    from posttrain.data import prepare

    rows = [{"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(5)]
    rows[3] = {"prompt": None, "chosen": "6", "rejected": "7"}
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare(path, kind="preference")
    assert (info.value.file, info.value.row, info.value.field) == (path, 4, "prompt")
    assert str(info.value) == (f"{path}: row 4, field 'prompt': {PROMPT_EXPECTED}, got null, and 'chosen' and "
                               "'rejected' share no prompt turn")


def test_conversations_that_share_no_turn_or_only_blank_ones_are_refused(tmp_path):
    import pytest

    from posttrain.data import prepare

    u, a = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    path = _jsonl(tmp_path / "a.jsonl", [{"chosen": [a("4")], "rejected": [a("5")]}])
    with pytest.raises(DataError, match=r"row 1, field 'prompt': expected a non-empty prompt.* share no prompt turn$"):
        prepare(path, kind="preference")
    path = _jsonl(tmp_path / "b.jsonl", [{"chosen": [u(" "), a("4")], "rejected": [u(" "), a("5")]}])
    with pytest.raises(DataError) as info:
        prepare(path, kind="preference")
    assert str(info.value).endswith("got no 'prompt' field (the row has fields 'chosen', 'rejected'), and the turns "
                                    "'chosen' and 'rejected' share have no text (user)")
    path = _jsonl(tmp_path / "c.jsonl", [{"prompt": [u("  ")], "chosen": "4", "rejected": "5"}])
    with pytest.raises(DataError) as info:
        prepare(path, kind="preference")
    assert str(info.value) == (f"{path}: row 1, field 'prompt': expected a non-empty prompt, got turns without text "
                               "(user)")


def test_hh_rlhf_and_sharegpt_rows_still_give_their_shared_prompt(tmp_path):
    from posttrain.data import prepare

    hh = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"}
    sharegpt = {"conversations": [{"from": "human", "value": "What is 2+2?"}],
                "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}
    for name, row in (("hh.jsonl", hh), ("sharegpt.jsonl", sharegpt)):
        data = prepare(_jsonl(tmp_path / name, [row, row]))
        assert data.rows[0] == {"prompt": [{"role": "user", "content": "What is 2+2?"}],
                                "chosen": [{"role": "assistant", "content": "4"}],
                                "rejected": [{"role": "assistant", "content": "5"}]}
