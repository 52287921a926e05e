import pytest
from transformers import AutoTokenizer

from posttrain.models.tokenizer_builder import CHAT_TEMPLATE, ROLE_TOKENS, build_tokenizer
from posttrain.tasks.arithmetic import make_splits


@pytest.fixture(scope="module")
def tok_and_items():
    train, test = make_splits(seed=0, n_train=400, n_test=50)
    tok = build_tokenizer((it["question"] + "\n" + it["answer"] for it in train), vocab_size=400)
    return tok, train + test


def _conversation(item, system=False):
    msgs = [{"role": "system", "content": "Solve it."}] if system else []
    return msgs + [{"role": "user", "content": item["question"]},
                   {"role": "assistant", "content": item["answer"]}]


def test_special_tokens(tok_and_items):
    tok, _ = tok_and_items
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    for marker in ROLE_TOKENS:
        ids = tok(marker, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and marker in tok.all_special_tokens
    assert tok.chat_template == CHAT_TEMPLATE
    assert len(tok) <= 400


def test_plain_encoding_adds_nothing(tok_and_items):
    tok, _ = tok_and_items
    assert tok("12 apples")["input_ids"] == tok("12 apples", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in tok("12 apples")["input_ids"]
    assert tok.eos_token_id not in tok("12 apples")["input_ids"]


def test_digits_are_individual(tok_and_items):
    tok, _ = tok_and_items
    tokens = tok.convert_ids_to_tokens(tok("1234 + 56", add_special_tokens=False)["input_ids"])
    assert [t for t in tokens if any(ch.isdigit() for ch in t)] == ["1", "2", "3", "4", "5", "6"]


@pytest.mark.parametrize("system", [False, True])
def test_stable_boundary_single_bos_and_eos_per_turn(tok_and_items, system):
    tok, items = tok_and_items
    for item in items[:100]:
        msgs = _conversation(item, system)
        prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(msgs, tokenize=False)
        assert full.startswith(prompt)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        assert p_ids + c_ids == f_ids
        assert f_ids.count(tok.bos_token_id) == 1 and f_ids[0] == tok.bos_token_id
        assert f_ids.count(tok.eos_token_id) == 1 and c_ids[-1] == tok.eos_token_id
        assert tok.decode(c_ids, skip_special_tokens=True) == item["answer"]


def test_eos_once_per_assistant_turn(tok_and_items):
    tok, items = tok_and_items
    msgs = _conversation(items[0]) + _conversation(items[1])[0:2]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2 and ids.count(tok.bos_token_id) == 1


def test_decode_round_trips_text(tok_and_items):
    tok, _ = tok_and_items
    for text in ["Sam has 7 + 5 = 12 apples.\n#### 12", "  leading spaces", "unicode: café ✓ 日本",
                 "tabs\tand\n\nnewlines", "#### -3.5", "zzz qqq unseen words"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_save_and_reload_keeps_template(tok_and_items, tmp_path):
    tok, items = tok_and_items
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == CHAT_TEMPLATE
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    msgs = _conversation(items[0], system=True)
    assert again.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert again("7 apples")["input_ids"] == tok("7 apples")["input_ids"]


def test_deterministic():
    corpus = ["Sam has 7 + 5 = 12 apples.", "Ava gives 3 pencils to Leo."] * 20
    a = build_tokenizer(corpus, vocab_size=300)
    b = build_tokenizer(corpus, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()


def test_too_small_vocab():
    with pytest.raises(ValueError):
        build_tokenizer(["abc"], vocab_size=100)
