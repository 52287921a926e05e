"""Prompt/completion tokenization: stable boundary, one BOS, one end-of-turn, per-row truncation budget."""

import pytest

from posttrain.data.tokenize import encode_completion, encode_prompt, render_prompt

PROMPT = [{"role": "user", "content": "Sam has 3 apples and buys 4 more. How many apples?"}]
CHOSEN = [{"role": "assistant", "content": "Sam has 3 + 4 = 7 apples.\n#### 7"}]
REJECTED = [{"role": "assistant", "content": "Sam has 3 + 4 = 8 apples.\n#### 8"}]


def test_prompt_ids_identical_across_chosen_and_rejected_and_completion_round_trips(tiny_tokenizer):
    c = encode_completion(tiny_tokenizer, PROMPT, CHOSEN)
    r = encode_completion(tiny_tokenizer, PROMPT, REJECTED)
    assert c.prompt_ids == r.prompt_ids == encode_prompt(tiny_tokenizer, PROMPT)
    assert tiny_tokenizer.decode(c.completion_ids) == CHOSEN[0]["content"] + tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(c.completion_ids, skip_special_tokens=True) == CHOSEN[0]["content"]


def test_concatenation_equals_the_whole_rendered_conversation(tiny_tokenizer):
    c = encode_completion(tiny_tokenizer, PROMPT, CHOSEN)
    whole = tiny_tokenizer.apply_chat_template(PROMPT + CHOSEN, tokenize=False)
    assert c.input_ids == tiny_tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_exactly_one_bos_and_one_end_of_turn(tiny_tokenizer):
    c = encode_completion(tiny_tokenizer, PROMPT, CHOSEN)
    ids = c.input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id and ids.count(tiny_tokenizer.bos_token_id) == 1
    assert c.completion_ids[-1] == tiny_tokenizer.eos_token_id
    assert c.completion_ids.count(tiny_tokenizer.eos_token_id) == 1


def test_truncation_keeps_the_prompt_and_cuts_the_completion(tiny_tokenizer):
    prompt_len = len(encode_prompt(tiny_tokenizer, PROMPT))
    c = encode_completion(tiny_tokenizer, PROMPT, CHOSEN, max_length=prompt_len + 3)
    assert len(c.completion_ids) == 3 and c.truncated


def test_truncation_that_empties_the_completion_returns_none(tiny_tokenizer):
    prompt_len = len(encode_prompt(tiny_tokenizer, PROMPT))
    assert encode_completion(tiny_tokenizer, PROMPT, CHOSEN, max_length=prompt_len) is None


def test_max_prompt_length_left_truncates_and_keeps_bos(tiny_tokenizer):
    c = encode_completion(tiny_tokenizer, PROMPT, CHOSEN, max_prompt_length=5)
    full = encode_prompt(tiny_tokenizer, PROMPT)
    assert c.prompt_ids == [tiny_tokenizer.bos_token_id] + full[-4:]


def test_non_prefix_preserving_template_is_refused(tiny_tokenizer):
    broken = tiny_tokenizer
    saved = broken.chat_template
    try:
        # A template that renders the generation prompt differently from a finished assistant turn.
        broken.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                "{% if add_generation_prompt %}ASSISTANT> {% endif %}")
        with pytest.raises(ValueError, match="not prefix-preserving"):
            encode_completion(broken, PROMPT, CHOSEN)
    finally:
        broken.chat_template = saved


def test_plain_tokenizer_without_template_appends_eos(tiny_tokenizer):
    saved = tiny_tokenizer.chat_template
    try:
        tiny_tokenizer.chat_template = None
        assert render_prompt(tiny_tokenizer, PROMPT) == PROMPT[0]["content"] + "\n\n"
        c = encode_completion(tiny_tokenizer, PROMPT, CHOSEN)
        assert c.completion_ids[-1] == tiny_tokenizer.eos_token_id
        assert c.completion_ids.count(tiny_tokenizer.eos_token_id) == 1
    finally:
        tiny_tokenizer.chat_template = saved


def test_assistant_turn_mask_covers_each_assistant_turn_exactly(tiny_tokenizer):
    from posttrain.data.tokenize import encode_conversation

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"},
            {"role": "assistant", "content": "#### 2"}, {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "#### 4"}]
    enc = encode_conversation(tiny_tokenizer, conv)
    whole = tiny_tokenizer(tiny_tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False)
    assert enc.input_ids == whole["input_ids"]
    supervised = [t for t, m in zip(enc.input_ids, enc.assistant_mask) if m]
    eos = tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(supervised) == f"#### 2{eos}#### 4{eos}"
    assert enc.input_ids.count(tiny_tokenizer.bos_token_id) == 1
