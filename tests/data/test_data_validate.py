import pytest

from posttrain.data import DataError, DataKind, prepare, validate

GOOD = {"prompt": "q", "chosen": "good", "rejected": "bad"}


def test_validate_normalises_every_row():
    result = validate([GOOD, {**GOOD, "prompt": "q2"}], "preference", "d.jsonl")
    assert result.kind is DataKind.PREFERENCE
    assert [r["prompt"][0]["content"] for r in result.rows] == ["q", "q2"]
    assert (result.dropped, result.dropped_rows, result.total) == ({}, {}, 2)


def test_identical_pairs_are_dropped_and_counted():
    records = [GOOD, {**GOOD, "rejected": "good"}, GOOD, {**GOOD, "chosen": "bad"}]
    result = validate(records, DataKind.PREFERENCE, "d.jsonl")
    assert len(result.rows) == 2
    assert result.dropped == {"identical_pair": 2}
    assert result.dropped_rows == {"identical_pair": [2, 4]}
    assert result.total == 4


def test_empty_response_raises_by_default_and_drops_on_request():
    records = [GOOD, GOOD, {**GOOD, "chosen": ""}, {**GOOD, "rejected": "good"}]
    with pytest.raises(DataError) as e:
        validate(records, DataKind.PREFERENCE, "d.jsonl")
    assert (e.value.file, e.value.row, e.value.field, e.value.drop_reason) == ("d.jsonl", 3, "chosen",
                                                                               "empty_response")
    assert str(e.value) == ("d.jsonl: row 3, field 'chosen': expected a non-empty response, got '' (empty) "
                            "(set data_options.drop_empty: true, or pass drop_empty=True, to drop and count such rows instead)")
    result = validate(records, DataKind.PREFERENCE, "d.jsonl", drop_empty=True)
    assert result.dropped == {"empty_response": 1, "identical_pair": 1}
    assert result.dropped_rows == {"empty_response": [3], "identical_pair": [4]}


def test_first_malformed_row_raises_even_after_droppable_ones():
    records = [{**GOOD, "rejected": "good"}, GOOD, {"prompt": "q", "chosen": "a"}, {"prompt": "q"}]
    with pytest.raises(DataError) as e:
        validate(records, DataKind.PREFERENCE, "d.jsonl", drop_empty=True)
    assert (e.value.row, e.value.field) == (3, "rejected")


def test_no_usable_row_is_an_error():
    with pytest.raises(DataError) as e:
        validate([{**GOOD, "rejected": "good"}] * 3, DataKind.PREFERENCE, "d.jsonl")
    assert (e.value.row, e.value.expected, e.value.got) == (None, "at least one usable row",
                                                            "none of 3 (3 identical_pair)")
    with pytest.raises(DataError) as e:
        validate([], DataKind.SFT, "d.jsonl")
    assert e.value.got == "none of 0 (the dataset is empty)"


def test_unknown_kind():
    with pytest.raises(DataError) as e:
        validate([GOOD], "dpo", "d.jsonl")
    assert e.value.expected == "a kind among preference, verifiable, sft, unpaired"


# ---------------------------------------------------------------------- through files: messages name file, row, field

@pytest.mark.parametrize("bad, kind, field, message", [
    ({"prompt": "q"}, None, "completion",
     "row 3, field 'completion': expected a string or a list of messages, got nothing (the row has fields 'prompt')"),
    ({"prompt": "q", "completion": ""}, None, "completion",
     "row 3, field 'completion': expected a non-empty response, got '' (empty) (set data_options.drop_empty: true"),
    ({"prompt": "q", "completion": 42}, None, "completion",
     "row 3, field 'completion': expected a string or a list of messages, got 42 (a number)"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "unpaired", "label",
     "row 3, field 'label': expected true or false (a JSON boolean), got 'yes'"),
    ({"prompt": "q", "completion": [{"role": "bot", "content": "a"}]}, None, "completion[0].role",
     "row 3, field 'completion[0].role': expected one of 'system', 'user', 'assistant', got 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, None,
     "messages[1].content", "row 3, field 'messages[1].content': expected a string, got null"),
])
def test_error_messages_from_files(tmp_path, write_jsonl, bad, kind, field, message):
    good = {"prompt": "q", "completion": "a", "label": True} if kind == "unpaired" else {"prompt": "q",
                                                                                        "completion": "a"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as e:
        prepare(str(path), kind=kind)
    assert (e.value.file, e.value.row, e.value.field) == (str(path), 3, field)
    assert str(e.value).startswith(f"{path}: {message}")


def test_non_json_line_through_prepare(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError) as e:
        prepare(str(path))
    assert (e.value.file, e.value.row, e.value.field) == (str(path), 2, None)
    assert str(e.value).startswith(f"{path}: row 2: expected a JSON object, got invalid JSON")


def test_prepare_end_to_end(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "4"},
        {"question": "capital of France?", "answer": "Paris"}, {"question": "1+1?", "answer": "#### 2"}])
    data = prepare(str(tmp_path))  # a directory: train.jsonl by default
    assert data.kind is DataKind.VERIFIABLE
    assert [r["answer"] for r in data.rows] == ["2", "4", "Paris", "2"]
    assert data.dropped == {}
    assert data.source == str(path)
    assert (data.profile["rows"], data.profile["duplicates"], data.profile["numeric_answers"]) == (4, 1, 3)
    assert data.profile["numeric_answer_fraction"] == 0.75
    limited = prepare(str(path), kind="verifiable", limit=2)
    assert len(limited.rows) == 2
