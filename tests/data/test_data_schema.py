import pytest

from posttrain.data.errors import DataError, RowRef
from posttrain.data.messages import looks_like_transcript, parse_transcript, split_shared_prefix
from posttrain.data.schema import DataKind, normalise

REF = RowRef("d.jsonl", 7)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def err(record, kind):
    with pytest.raises(DataError) as e:
        normalise(record, kind, REF)
    assert (e.value.file, e.value.row) == ("d.jsonl", 7)
    return e.value


# ---------------------------------------------------------------------------------------------------- preference

def test_preference_strings():
    row = normalise({"prompt": "q", "chosen": "good", "rejected": "bad", "extra": 1}, DataKind.PREFERENCE, REF)
    assert row == {"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}


def test_preference_conversational_with_prompt():
    rec = {"prompt": [S("be brief"), U("q")], "chosen": [A("good")], "rejected": [A("bad")]}
    assert normalise(rec, DataKind.PREFERENCE, REF) == rec


def test_preference_prompt_repeated_inside_responses_is_removed():
    rec = {"prompt": "q", "chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")]}
    assert normalise(rec, DataKind.PREFERENCE, REF) == {"prompt": [U("q")], "chosen": [A("good")],
                                                       "rejected": [A("bad")]}


def test_preference_shared_turns_that_differ_from_the_prompt():
    rec = {"prompt": "q", "chosen": [U("other"), A("good")], "rejected": [U("other"), A("bad")]}
    assert err(rec, DataKind.PREFERENCE).field == "chosen"


def test_preference_implicit_prompt_from_message_lists():
    rec = {"chosen": [U("hi"), A("hello"), U("q"), A("good")], "rejected": [U("hi"), A("hello"), U("q"), A("bad")]}
    assert normalise(rec, DataKind.PREFERENCE, REF) == {
        "prompt": [U("hi"), A("hello"), U("q")], "chosen": [A("good")], "rejected": [A("bad")]}


def test_preference_implicit_prompt_from_hh_transcripts():
    rec = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
           "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:  Seven. "}
    assert normalise(rec, DataKind.PREFERENCE, REF) == {
        "prompt": [U("What is 2+2?"), A("4."), U("And 3+3?")], "chosen": [A("6.")], "rejected": [A("Seven.")]}


def test_preference_remainder_with_several_assistant_turns():
    rec = {"chosen": [U("q"), A("a1")], "rejected": [U("q"), A("b1"), A("b2")]}
    assert normalise(rec, DataKind.PREFERENCE, REF)["rejected"] == [A("b1"), A("b2")]


def test_preference_remainder_with_a_user_turn_is_refused():
    e = err({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b"), U("q2"), A("c")]}, DataKind.PREFERENCE)
    assert (e.field, e.expected, e.got) == ("rejected", "assistant turns only after the prompt",
                                            "turns: assistant, user, assistant")
    # sides that share no turn at all have no prompt
    assert err({"chosen": [U("q"), A("a")], "rejected": [U("q2"), A("b")]}, DataKind.PREFERENCE).field == "prompt"


def test_preference_without_a_prompt_is_refused():
    # Plain strings are not conversations: no prompt can be extracted (this used to pass and crash in tokenization).
    e = err({"chosen": "x", "rejected": "y"}, DataKind.PREFERENCE)
    assert (e.field, e.drop_reason) == ("prompt", None)
    assert e.expected.startswith("a non-empty prompt, or 'chosen' and 'rejected' conversations")


def test_preference_sharegpt_pairwise():
    rec = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"}],
           "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    assert normalise(rec, DataKind.PREFERENCE, REF) == {"prompt": [S("sys"), U("q")], "chosen": [A("good")],
                                                       "rejected": [A("bad")]}


def test_preference_identical_pair_is_marked_for_dropping():
    e = err({"prompt": "q", "chosen": "same", "rejected": "same"}, DataKind.PREFERENCE)
    assert (e.field, e.drop_reason) == ("rejected", "identical_pair")
    # identical transcripts too (before they could look like two empty responses)
    t = "\n\nHuman: q\n\nAssistant: a"
    assert err({"chosen": t, "rejected": t}, DataKind.PREFERENCE).drop_reason == "identical_pair"


@pytest.mark.parametrize("rec, field, got", [
    ({"prompt": "q", "chosen": "", "rejected": "bad"}, "chosen", "'' (empty)"),
    ({"prompt": "q", "chosen": "good", "rejected": "  \n"}, "rejected", "'  \\n' (blank)"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: "}, "rejected",
     "'' (empty) as the final assistant turn"),
    ({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("a"), A("b")]}, "chosen",
     "nothing (it ends where the prompt does)"),
])
def test_preference_empty_response_is_marked(rec, field, got):
    e = err(rec, DataKind.PREFERENCE)
    assert (e.field, e.got, e.drop_reason) == (field, got, "empty_response")


@pytest.mark.parametrize("rec, field, expected", [
    ({"prompt": "q", "rejected": "b"}, "chosen", "a string or a list of messages"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "chosen", "a string or a list of messages"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "a string or a list of messages"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "a non-empty string"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt", "a non-empty list of messages"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0].role",
     "one of 'system', 'user', 'assistant'"),
    ({"prompt": [U("q"), {"role": "user", "content": ["part"]}], "chosen": "a", "rejected": "b"},
     "prompt[1].content", "a string"),
    ({"prompt": [U("q"), {"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt[1].content", "a string"),
    ({"prompt": ["q"], "chosen": "a", "rejected": "b"}, "prompt[0]", "a message object with 'role' and 'content'"),
    ({"conversations": [{"from": "bot", "value": "x"}], "chosen": "a", "rejected": "b"}, "conversations[0].from",
     "one of 'human', 'gpt', 'system'"),
    ({"prompt": "q", "chosen": [U("a")], "rejected": "b"}, "chosen", "assistant turns only after the prompt"),
])
def test_preference_malformed(rec, field, expected):
    e = err(rec, DataKind.PREFERENCE)
    assert (e.field, e.expected, e.drop_reason) == (field, expected, None)


# ---------------------------------------------------------------------------------------------------- transcripts

def test_transcript_parsing_keeps_inline_markers():
    text = "\n\nHuman: hi\n\nAssistant: ok.  Human: Thanks.\n\nHuman: bye\n\nAssistant: "
    assert looks_like_transcript(text)
    assert parse_transcript(text) == [U("hi"), A("ok.  Human: Thanks."), U("bye"), A("")]
    assert not looks_like_transcript("Assistant: hi")
    assert not looks_like_transcript("Human: no assistant turn")


def test_split_shared_prefix():
    assert split_shared_prefix([U("a"), A("b")], [U("a"), A("c")]) == ([U("a")], [A("b")], [A("c")])
    assert split_shared_prefix([A("b")], [A("c")]) == ([], [A("b")], [A("c")])


# ---------------------------------------------------------------------------------------------------- verifiable

@pytest.mark.parametrize("answer, final", [
    ("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### $5.", "5"),
    ("#### -3", "-3"),
    ("42", "42"),
    (" 1,000 ", "1000"),
    ("$7.50", "7.50"),
    ("Paris", "Paris"),
    ("  B ", "B"),
    (18, "18"),
    (2.0, "2"),
    (2.5, "2.5"),
])
def test_verifiable_final_answer(answer, final):
    row = normalise({"question": "q?", "answer": answer}, DataKind.VERIFIABLE, REF)
    assert row == {"prompt": [U("q?")], "answer": final}


def test_verifiable_field_aliases():
    row = normalise({"prompt": [S("s"), U("q")], "ground_truth": "7"}, DataKind.VERIFIABLE, REF)
    assert row == {"prompt": [S("s"), U("q")], "answer": "7"}
    assert normalise({"prompt": "q", "solution": "x\n#### 3"}, DataKind.VERIFIABLE, REF)["answer"] == "3"


@pytest.mark.parametrize("rec, field, expected", [
    ({"answer": "1"}, "prompt", "a string or a list of messages (in 'prompt' or 'question')"),
    ({"question": "q"}, "answer", "an answer (in 'answer', 'solution' or 'ground_truth')"),
    ({"question": "q", "answer": ""}, "answer", "a non-empty answer"),
    ({"question": "q", "answer": "#### twelve"}, "answer", "a single number after the last '####'"),
    ({"question": "q", "answer": True}, "answer", "a string or a number"),
    ({"question": "q", "answer": ["1"]}, "answer", "a string or a number"),
    ({"question": "q", "answer": float("nan")}, "answer", "a finite number"),
    ({"question": 5, "answer": "1"}, "question", "a string or a list of messages"),
])
def test_verifiable_malformed(rec, field, expected):
    e = err(rec, DataKind.VERIFIABLE)
    assert (e.field, e.expected) == (field, expected)


# ---------------------------------------------------------------------------------------------------- sft

def test_sft_prompt_completion():
    assert normalise({"prompt": "q", "completion": "a"}, DataKind.SFT, REF) == {"prompt": [U("q")],
                                                                               "completion": [A("a")]}


def test_sft_messages_last_assistant_turn_is_the_completion():
    msgs = [S("s"), U("q1"), A("a1"), U("q2"), A("a2")]
    assert normalise({"messages": msgs}, DataKind.SFT, REF) == {"prompt": msgs[:4], "completion": [A("a2")]}


def test_sft_sharegpt_conversations():
    rec = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert normalise(rec, DataKind.SFT, REF) == {"prompt": [U("q")], "completion": [A("a")]}


def test_sft_text_is_one_assistant_message_with_empty_prompt():
    assert normalise({"text": "once upon"}, DataKind.SFT, REF) == {"prompt": [], "completion": [A("once upon")]}


@pytest.mark.parametrize("rec, field, expected, drop", [
    ({"prompt": "q", "completion": ""}, "completion", "a non-empty response", "empty_response"),
    ({"prompt": "q"}, "completion", "a string or a list of messages", None),
    ({"completion": "a"}, "prompt", "a string or a list of messages", None),
    ({"prompt": "q", "completion": [U("a")]}, "completion", "assistant turns only after the prompt", None),
    ({"messages": [U("q"), A("a"), U("q2")]}, "messages[2].role",
     "an assistant turn (the last message is the completion)", None),
    ({"messages": [U("q"), A(" ")]}, "messages[1].content", "a non-empty response", "empty_response"),
    ({"messages": "q"}, "messages", "a list of messages", None),
    ({"conversations": [{"from": "human", "value": "q"}]}, "conversations[0].from",
     "an assistant turn (the last message is the completion)", None),
    ({"text": ""}, "text", "a non-empty response", "empty_response"),
    ({"text": 3}, "text", "a string", None),
    ({"title": "x"}, None, "the fields of an sft row: prompt+completion or messages|conversations or text", None),
])
def test_sft_malformed(rec, field, expected, drop):
    e = err(rec, DataKind.SFT)
    assert (e.field, e.expected, e.drop_reason) == (field, expected, drop)


# ---------------------------------------------------------------------------------------------------- unpaired

def test_unpaired_forms():
    assert normalise({"prompt": "q", "completion": "a", "label": False}, DataKind.UNPAIRED, REF) == {
        "prompt": [U("q")], "completion": [A("a")], "label": False}
    assert normalise({"messages": [U("q"), A("a")], "label": True}, DataKind.UNPAIRED, REF) == {
        "prompt": [U("q")], "completion": [A("a")], "label": True}


@pytest.mark.parametrize("label, got", [(1, "1 (a number)"), ("true", "'true'"), (None, None)])
def test_unpaired_label_must_be_boolean(label, got):
    e = err({"prompt": "q", "completion": "a", "label": label}, DataKind.UNPAIRED)
    assert e.field == "label"
    if got is not None:
        assert e.got == got
    else:
        assert e.got.startswith("nothing (the row has fields")


def test_not_an_object():
    assert err(["x"], DataKind.SFT).expected == "an object"
