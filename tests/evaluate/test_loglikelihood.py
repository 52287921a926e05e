"""loglikelihood: lm-eval's encoding (whitespace move, joint encoding, split), truncation, batching and sharing, all
checked against the model's own forward on hand-built token sequences."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.evaluate.loglikelihood import encode_pair, leading_special_tokens, loglikelihood, prefix_token_id


def manual(model, ctx_ids, cont_ids, max_length=None):
    """Sum of log-probs of cont given ctx and whether each was the argmax, from one plain forward."""
    full = list(ctx_ids) + list(cont_ids)
    if max_length is not None:
        full = full[-(max_length + 1):]
    inp = torch.tensor([full[:-1]])
    with torch.no_grad():
        logits = model(input_ids=inp).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    n = len(cont_ids)
    rows = range(len(full) - 1 - n, len(full) - 1)
    total = sum(logp[r, t].item() for r, t in zip(rows, cont_ids))
    greedy = all(int(logits[r].argmax()) == t for r, t in zip(rows, cont_ids))
    return total, greedy


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- encoding

def test_trailing_whitespace_moves_to_the_continuation(tiny_tokenizer):
    assert encode_pair(tiny_tokenizer, "Sam has ", "3") == encode_pair(tiny_tokenizer, "Sam has", " 3")
    ctx, cont = encode_pair(tiny_tokenizer, "Sam has", " 3 apples")
    assert ctx + cont == ids(tiny_tokenizer, "Sam has 3 apples")
    assert ctx == ids(tiny_tokenizer, "Sam has")


def test_empty_context_is_the_prefix_token(tiny_tokenizer):
    assert prefix_token_id(tiny_tokenizer) == tiny_tokenizer.bos_token_id
    assert encode_pair(tiny_tokenizer, "", "Sam has") == ([tiny_tokenizer.bos_token_id], ids(tiny_tokenizer, "Sam has"))
    # whitespace-only context: the whitespace moves over and the context becomes empty
    assert encode_pair(tiny_tokenizer, "  ", "Sam") == ([tiny_tokenizer.bos_token_id], ids(tiny_tokenizer, "  Sam"))


def join_tokenizer(bos_post_processor=False):
    """A character BPE without pre-tokenizer whose merges cross the context/continuation join: ": " and ": C"."""
    chars = sorted(set("Answer: CD"))
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "<pad>", *chars, ": ", ": C"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(":", " "), (": ", "C")]))
    if bos_post_processor:  # a tokenizer that adds BOS and EOS itself, like many sentencepiece ones
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return tok, vocab


def test_a_token_straddling_the_join_is_scored_with_the_continuation():
    tok, v = join_tokenizer()
    answer = [v[c] for c in "Answer"]
    assert ids(tok, "Answer: C") == answer + [v[": C"]]  # one token across the join
    assert ids(tok, "Answer:") == answer + [v[":"]]
    # lm-eval's split whole[len(ctx):] would leave nothing here; we split at the common prefix instead.
    assert encode_pair(tok, "Answer:", " C") == (answer, [v[": C"]])
    # ...and would silently drop " C" here (whole[7:] == [D]); we keep it.
    assert encode_pair(tok, "Answer:", " CD") == (answer, [v[": C"], v["D"]])
    assert encode_pair(tok, "Answer:", " D") == (answer, [v[": "], v["D"]])
    # no straddle: the usual split
    assert encode_pair(tok, "Answer", ":") == (answer, [v[":"]])

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(v), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    got = loglikelihood(model, tok, [("Answer:", " C"), ("Answer: ", "CD")], batch_size=2, max_length=32)
    assert got[0][0] == pytest.approx(manual(model, answer, [v[": C"]])[0], abs=1e-5)
    assert got[1][0] == pytest.approx(manual(model, answer, [v[": C"], v["D"]])[0], abs=1e-5)


def test_tokenizer_bos_is_kept_once_and_its_eos_dropped():
    tok, v = join_tokenizer(bos_post_processor=True)
    assert leading_special_tokens(tok) == [v["<s>"]]
    assert encode_pair(tok, "Answer", ":") == ([v["<s>"]] + [v[c] for c in "Answer"], [v[":"]])
    # with add_special_tokens=False (a chat-rendered prompt writes its own BOS) nothing is added
    assert encode_pair(tok, "Answer", ":", add_special_tokens=False) == ([v[c] for c in "Answer"], [v[":"]])


# ------------------------------------------------------------------------------------------- scoring

REQUESTS = [
    ("Sam has 3 apples and buys 4 more. How many apples? Sam has ", "3 + 4 = 7."),
    ("Sam has", " 11 apples"),
    ("How many apples?", " Sam"),
    ("", "Sam has 2 apples"),
    ("Sam has 5 apples and buys 6 more.", " How many apples? Sam has 5 + 6 = 11."),
]


def test_matches_the_models_own_forward(tiny_tokenizer, make_llama):
    model = make_llama(seed=1)
    got = loglikelihood(model, tiny_tokenizer, REQUESTS, batch_size=8, max_length=200)
    for (c, x), (lp, greedy) in zip(REQUESTS, got):
        want_lp, want_greedy = manual(model, *encode_pair(tiny_tokenizer, c, x))
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert greedy == want_greedy
        assert lp < 0


def test_batched_equals_one_at_a_time(tiny_tokenizer, make_llama):
    model = make_llama(seed=2)
    batched = loglikelihood(model, tiny_tokenizer, REQUESTS, batch_size=3, max_length=200)
    alone = [loglikelihood(model, tiny_tokenizer, [r], batch_size=1, max_length=200)[0] for r in REQUESTS]
    for (a, ga), (b, gb) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-5)
        assert ga == gb


def test_choices_of_one_question_share_a_forward_row_and_match_scoring_alone(tiny_tokenizer, make_llama):
    model = make_llama(seed=3)
    rows = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    ctx = "Sam has 3 apples and buys 4 more. How many apples? Answer:"
    requests = [(ctx, f" {d}") for d in "0123"] + [("Sam has 2", " apples")]
    shared = loglikelihood(model, tiny_tokenizer, requests, batch_size=8, max_length=200)
    assert rows == [2]  # the four one-token answers have the same input: one row, plus the other request
    hook.remove()
    for r, (lp, greedy) in zip(requests, shared):
        alone = loglikelihood(model, tiny_tokenizer, [r], batch_size=1, max_length=200)[0]
        assert lp == pytest.approx(alone[0], abs=1e-5) and greedy == alone[1]
    assert sum(math.exp(lp) for lp, _ in shared[:4]) < 1.0  # four disjoint tokens of one distribution


def test_left_truncation_keeps_the_last_max_length_tokens(tiny_tokenizer, make_llama):
    model = make_llama(seed=4)
    c, x = REQUESTS[4]
    ctx_ids, cont_ids = encode_pair(tiny_tokenizer, c, x)
    assert len(ctx_ids) + len(cont_ids) > 24 + 1
    (lp, greedy), = loglikelihood(model, tiny_tokenizer, [(c, x)], batch_size=1, max_length=24)
    want_lp, want_greedy = manual(model, ctx_ids, cont_ids, max_length=24)
    assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    untruncated = loglikelihood(model, tiny_tokenizer, [(c, x)], batch_size=1, max_length=200)[0][0]
    assert abs(untruncated - lp) > 1e-6  # truncation really changed the conditioning
    with pytest.raises(ValueError, match="does not fit"):
        loglikelihood(model, tiny_tokenizer, [(c, x)], batch_size=1, max_length=len(cont_ids) - 1)


def test_learned_positions_never_see_more_than_max_length(tiny_tokenizer):
    # GPT-2's position table has exactly n_positions rows: one input token too many would be an index error.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=16, n_embd=16, n_layer=1,
                                       n_head=2)).eval()
    got = loglikelihood(model, tiny_tokenizer, REQUESTS, batch_size=2, max_length=16)
    for (c, x), (lp, _) in zip(REQUESTS, got):
        assert lp == pytest.approx(manual(model, *encode_pair(tiny_tokenizer, c, x), max_length=16)[0], abs=1e-4)


class NoKeepWrapper(torch.nn.Module):
    """A model whose forward has no `logits_to_keep`: the full logits are computed and the tail taken."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_models_without_logits_to_keep_give_the_same_numbers(tiny_tokenizer, make_llama):
    model = make_llama(seed=5)
    a = loglikelihood(model, tiny_tokenizer, REQUESTS, batch_size=4, max_length=200)
    b = loglikelihood(NoKeepWrapper(model), tiny_tokenizer, REQUESTS, batch_size=4, max_length=200)
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5) and gx == gy


def test_chunked_encoding_gives_the_same_numbers_in_request_order(tiny_tokenizer, make_llama, monkeypatch):
    import posttrain.evaluate.loglikelihood as ll_mod

    model = make_llama(seed=6)
    whole = loglikelihood(model, tiny_tokenizer, REQUESTS, batch_size=4, max_length=200)
    monkeypatch.setattr(ll_mod, "CHUNK_REQUESTS", 2)
    seen = []
    chunked = loglikelihood(model, tiny_tokenizer, REQUESTS, batch_size=4, max_length=200,
                            progress=lambda done, total: seen.append((done, total)))
    for (a, ga), (b, gb) in zip(whole, chunked):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    assert seen[-1] == (len(REQUESTS), len(REQUESTS)) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_bfloat16_models_are_scored_in_float32(tiny_tokenizer, make_llama):
    model = make_llama(seed=7).to(torch.bfloat16)
    got = loglikelihood(model, tiny_tokenizer, REQUESTS, batch_size=1, max_length=200)
    for (c, x), (lp, greedy) in zip(REQUESTS, got):
        want_lp, want_greedy = manual(model, *encode_pair(tiny_tokenizer, c, x))  # bf16 logits, fp32 log-softmax
        assert lp == pytest.approx(want_lp, abs=1e-3) and greedy == want_greedy
