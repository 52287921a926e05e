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


# ------------------------------------------------------------------------------------------- shared prefixes

def mmlu_style_requests(n_shots=2):
    """Two 'subjects' of three questions each in MMLU's few-shot template (the benchmark's own prompt builder): the
    few-shot prefix is shared within a subject, the answers " A".." D" share each question's input."""
    from posttrain.evaluate.benchmarks.mmlu import Question, build_prompt

    def question(subject, i, a, b):
        return Question(subject, i, f"Sam has {a} apples and buys {b} more. How many apples?",
                        (str(a + b), str(a + b + 1), str(a + b - 1), str(a * b)), i % 4)

    requests = []
    for j, subject in enumerate(("apples", "pears")):
        shots = [question(subject, k, k + 1, k + 2 + j) for k in range(n_shots)]
        for i in range(3):
            requests += [(build_prompt(question(subject, 10 + i, 3 + i, 4 + j), shots), f" {d}") for d in "ABCD"]
    requests.append((requests[0][0], " 7 apples"))  # a multi-token continuation: an input of its own in the group
    return requests


def prefix_path_calls(monkeypatch):
    """Records one True per batch scored on the shared-prefix path (`shared_prompt_hidden`, its one entry point,
    whichever way that runs the decoder: its own forward on a cache, or the packed pass)."""
    import posttrain.evaluate.loglikelihood as ll_mod

    calls = []
    original = ll_mod.shared_prompt_hidden
    monkeypatch.setattr(ll_mod, "shared_prompt_hidden", lambda *a, **k: calls.append(True) or original(*a, **k))
    return calls


@pytest.fixture(params=["llama", "gpt2"])
def arch(request, tiny_tokenizer, make_llama, datasets_dir, gpt2_builder):
    if request.param == "llama":
        return make_llama(seed=8), tiny_tokenizer
    return gpt2_builder(datasets_dir, n_positions=256)


def test_shared_prefix_path_equals_the_plain_path_on_mmlu_style_requests(arch, monkeypatch):
    import posttrain.evaluate.loglikelihood as ll_mod
    from posttrain.evaluate.loglikelihood import encode_pairs, plan_requests

    model, tok = arch
    requests = mmlu_style_requests()
    plan = plan_requests(encode_pairs(tok, requests), max_length=256)
    # one group per subject, nothing run whole (GPT-2's BPE merges some answers with ": " across the join, so
    # there a question has more than one input: the straddling split on the prefix path)
    assert len(plan.groups) == 2 and plan.plain == []
    monkeypatch.setitem(ll_mod._PREFIX_PATH_OK, (type(model), torch.float32), True)  # skip the once-only check
    calls = prefix_path_calls(monkeypatch)
    shared = loglikelihood(model, tok, requests, batch_size=4, max_length=256)
    assert True in calls  # the prefix path ran
    plain = loglikelihood(model, tok, requests, batch_size=4, max_length=256, share_prefixes=False)
    for (c, x), (a, ga), (b, gb) in zip(requests, shared, plain):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
        assert a == pytest.approx(manual(model, *encode_pair(tok, c, x))[0], abs=1e-5)


def test_left_truncated_requests_are_run_whole(tiny_tokenizer, make_llama, monkeypatch):
    import posttrain.evaluate.loglikelihood as ll_mod
    from posttrain.evaluate.loglikelihood import encode_pairs, plan_requests

    model = make_llama(seed=9)
    fits, long = mmlu_style_requests(n_shots=2)[:12], mmlu_style_requests(n_shots=4)[:12]
    pairs = encode_pairs(tiny_tokenizer, fits + long)
    assert max(len(c) + len(x) for c, x in pairs[:12]) <= 256 + 1 < min(len(c) + len(x) for c, x in pairs[12:])
    plan = plan_requests(pairs, max_length=256)
    assert [sorted(g) for _, g in plan.groups] == [[0, 1, 2]] and plan.plain == [3, 4, 5]  # the truncated ones
    monkeypatch.setitem(ll_mod._PREFIX_PATH_OK, (type(model), torch.float32), True)
    calls = prefix_path_calls(monkeypatch)
    got = loglikelihood(model, tiny_tokenizer, fits + long, batch_size=8, max_length=256)
    assert True in calls
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        want_lp, want_greedy = manual(model, ctx, cont, max_length=256)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy


def test_the_prefix_path_is_checked_once_per_model_class_and_dropped_when_it_disagrees(tiny_tokenizer, make_llama,
                                                                                       monkeypatch):
    """A model that scales its logits (like soft-capping) must not be scored by decoder + head alone; one whose
    forward is head(decoder(x)) passes the check and keeps the prefix path."""
    import posttrain.evaluate.loglikelihood as ll_mod
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    class Same(LlamaForCausalLM):
        pass

    requests = mmlu_style_requests()
    for cls, ok in ((Scaled, False), (Same, True)):
        model = cls(make_llama(seed=10).config).eval()
        calls = prefix_path_calls(monkeypatch)
        for _ in range(2):  # the first call is checked, the second uses the verdict
            got = loglikelihood(model, tiny_tokenizer, requests, batch_size=4, max_length=256)
            for (c, x), (lp, greedy) in zip(requests, got):
                want_lp, want_greedy = manual(model, *encode_pair(tiny_tokenizer, c, x))
                assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
        assert ll_mod._PREFIX_PATH_OK[(cls, torch.float32)] is ok
        # two prefix batches per call (groups of 4 and 3 inputs at batch_size 4); Scaled: only the checked one
        assert calls.count(True) == (4 if ok else 1)


def test_learned_positions_on_the_prefix_path_stay_inside_the_table(tiny_tokenizer, monkeypatch):
    # One batch holds a long prefix with a one-token rest and a short prefix with long rests: the first group's
    # padding columns must not get positions past GPT-2's 64-row table.
    import posttrain.evaluate.loglikelihood as ll_mod
    from posttrain.evaluate.loglikelihood import loglikelihood_tokens, plan_requests

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=16, n_layer=1,
                                       n_head=2)).eval()
    long_prefix, short_prefix = [10 + t % 50 for t in range(55)], [70 + t % 30 for t in range(31)]
    pairs = [(long_prefix + [100 + i], [5 + i]) for i in range(3)]
    pairs += [(short_prefix + [110 + i] + [120 + (i * t) % 40 for t in range(30)], [7]) for i in range(3)]
    plan = plan_requests(pairs, max_length=64)
    assert sorted((n, len(g)) for n, g in plan.groups) == [(31, 3), (55, 3)]
    monkeypatch.setitem(ll_mod._PREFIX_PATH_OK, (GPT2LMHeadModel, torch.float32), True)
    got = loglikelihood_tokens(model, pairs, batch_size=8, max_length=64)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        want_lp, want_greedy = manual(model, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy


def test_a_token_straddling_the_join_on_a_shared_prefix(monkeypatch):
    import posttrain.evaluate.loglikelihood as ll_mod
    from posttrain.evaluate.loglikelihood import encode_pairs, plan_requests

    tok, v = join_tokenizer()
    context = "Answer" * 4 + ":"
    requests = [(context, " C"), (context, " CD"), (context, " D")]
    chars = [v[c] for c in "Answer" * 4]
    pairs = encode_pairs(tok, requests)
    assert pairs == [(chars, [v[": C"]]), (chars, [v[": C"], v["D"]]), (chars, [v[": "], v["D"]])]
    assert [(n, len(g)) for n, g in plan_requests(pairs, max_length=32).groups] == [(23, 3)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(v), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    monkeypatch.setitem(ll_mod._PREFIX_PATH_OK, (LlamaForCausalLM, torch.float32), True)
    calls = prefix_path_calls(monkeypatch)
    got = loglikelihood(model, tok, requests, batch_size=4, max_length=32)
    assert True in calls
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        want_lp, want_greedy = manual(model, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-5) and greedy == want_greedy
