import pytest

from posttrain.data.errors import DataError
from posttrain.data.kinds import SAMPLE, a_kind, detect_kind, kind_of
from posttrain.data.schema import DataKind

MSGS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("record, kind", [
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, DataKind.PREFERENCE),
    ({"chosen": "a", "rejected": "b"}, DataKind.PREFERENCE),
    ({"conversations": MSGS, "chosen": {"from": "gpt", "value": "a"}, "rejected": {}}, DataKind.PREFERENCE),
    ({"chosen": "a", "rejected": "b", "label": True}, DataKind.PREFERENCE),  # pairs win over labels
    ({"prompt": "q", "completion": "a", "label": True}, DataKind.UNPAIRED),
    ({"messages": MSGS, "label": False}, DataKind.UNPAIRED),
    ({"question": "q", "answer": "#### 1"}, DataKind.VERIFIABLE),
    ({"prompt": "q", "solution": "1"}, DataKind.VERIFIABLE),
    ({"prompt": MSGS[:1], "ground_truth": "1"}, DataKind.VERIFIABLE),
    ({"prompt": "q", "completion": "a"}, DataKind.SFT),
    ({"messages": MSGS}, DataKind.SFT),
    ({"conversations": MSGS}, DataKind.SFT),
    ({"text": "t"}, DataKind.SFT),
    ({"prompt": "q", "completion": "a", "label": None}, DataKind.SFT),  # a null column is an absent one
    ({"prompt": "q"}, None),
    ({"chosen": "a"}, None),
    ({"label": True, "text": "t"}, DataKind.SFT),
    ("not a dict", None),
])
def test_kind_of(record, kind):
    assert kind_of(record) is kind


def test_detect_kind_first_row_unknown_lists_accepted_sets():
    with pytest.raises(DataError) as e:
        detect_kind([{"question_id": 1, "turns": ["a"]}], "q.jsonl")
    err = e.value
    assert (err.file, err.row, err.field) == ("q.jsonl", 1, None)
    assert err.got == "fields 'question_id', 'turns'"
    for accepted in ("preference: chosen+rejected", "unpaired: prompt+completion+label",
                     "verifiable: prompt|question+answer|solution|ground_truth", "sft: prompt+completion"):
        assert accepted in err.expected


def test_detect_kind_mixed_rows_name_the_first_disagreeing_row():
    records = [{"prompt": "q", "completion": "a"}] * 10 + [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError) as e:
        detect_kind(records, "mix.jsonl")
    assert (e.value.row, e.value.expected) == (11, "the fields of an sft row, like row 1")
    assert e.value.got == "fields 'prompt', 'chosen', 'rejected' (a preference row)"


def test_detect_kind_samples_spread_over_the_file():
    # The sample always includes the last row (a second file appended to the first shows there).
    n = 10 * SAMPLE
    records = [{"text": "t"}] * n
    records[-1] = {"chosen": "a", "rejected": "b"}
    with pytest.raises(DataError) as e:
        detect_kind(records, "big.jsonl")
    assert (e.value.row, e.value.got) == (n, "fields 'chosen', 'rejected' (a preference row)")
    assert detect_kind([{"text": "t"}] * n, "big.jsonl") is DataKind.SFT


def test_detect_kind_leaves_incomplete_rows_to_validate():
    # A later row missing a field is not "another kind": validate reports it with the field's name.
    assert detect_kind([{"prompt": "q", "completion": "a"}, {"prompt": "q"}], "d.jsonl") is DataKind.SFT


def test_detect_kind_empty():
    with pytest.raises(DataError) as e:
        detect_kind([], "empty.jsonl")
    assert (e.value.row, e.value.expected, e.value.got) == (None, "at least one row", "no rows")


def test_every_kind_name_takes_the_article_it_is_said_with():
    # Regression: "the fields of a sft row" ("sft" is said ess-eff-tee: "an sft").
    assert {kind: a_kind(kind) for kind in DataKind} == {
        DataKind.PREFERENCE: "a preference", DataKind.VERIFIABLE: "a verifiable", DataKind.SFT: "an sft",
        DataKind.UNPAIRED: "an unpaired"}


def test_detect_kind_mixed_rows_use_the_right_article_for_the_other_kind():
    records = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "q", "completion": "a", "label": True}]
    with pytest.raises(DataError) as e:
        detect_kind(records, "mix.jsonl")
    assert e.value.expected == "the fields of a preference row, like row 1"
    assert e.value.got == "fields 'prompt', 'completion', 'label' (an unpaired row)"
