import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from posttrain.models.tokenizer_builder import build_tokenizer
from posttrain.rollout.generate import Generation, generate
from posttrain.tasks.arithmetic import make_splits


@pytest.fixture(scope="module")
def tok():
    train, _ = make_splits(seed=0, n_train=200, n_test=0)
    return build_tokenizer((it["question"] + "\n" + it["answer"] for it in train), vocab_size=300)


def tiny_model(tok, seed=0, init=0.02):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=init, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval()


def with_eos_bias(model, eos_id, bias, pad_id=None):
    # Llama's lm_head has no bias; give it one so the test controls how often eos is produced (and can forbid
    # the pad token, so any pad in a completion could only come from padding leaking in).
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_id] = bias
        if pad_id is not None:
            head.bias[pad_id] = -1e4
    model.lm_head = head
    return model


def prompts(tok, texts):
    return [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                        tokenize=False), add_special_tokens=False)["input_ids"] for t in texts]


def test_left_padding_matches_unbatched(tok):
    model = tiny_model(tok, init=0.3)  # peaked logits: greedy choices are far from ties
    ps = prompts(tok, ["Sam has 3 apples.", "A much longer question about marbles and jars and books here?", "Hi"])
    batched = generate(model, tok, ps, max_new_tokens=12)
    for p, g in zip(ps, batched):
        alone = generate(model, tok, [p], max_new_tokens=12)[0]
        assert g.completion_ids == alone.completion_ids
        assert g.prompt_ids == p


def test_cut_after_first_eos_and_flags(tok):
    model = with_eos_bias(tiny_model(tok), tok.eos_token_id, 2.0, tok.pad_token_id)
    ps = prompts(tok, ["Sam has 3 apples.", "Hi"])
    gens = generate(model, tok, ps, max_new_tokens=30, do_sample=True, num_return_sequences=16, seed=1)
    assert len(gens) == 32 and [g.prompt_index for g in gens] == [i // 16 for i in range(32)]
    assert {g.finished for g in gens} == {True, False}
    for g in gens:
        eos_positions = [i for i, t in enumerate(g.completion_ids) if t == tok.eos_token_id]
        if g.finished:
            assert eos_positions == [len(g.completion_ids) - 1]
        else:
            assert eos_positions == [] and len(g.completion_ids) == 30
        assert tok.pad_token_id not in g.completion_ids
        assert g.text == tok.decode(g.completion_ids, skip_special_tokens=True)
        assert "</s>" not in g.text


def test_greedy_immediate_eos(tok):
    model = with_eos_bias(tiny_model(tok), tok.eos_token_id, 50.0)
    g = generate(model, tok, prompts(tok, ["x"]), max_new_tokens=5)[0]
    assert g == Generation(0, g.prompt_ids, [tok.eos_token_id], "", True)


def test_seeded_sampling_is_deterministic_and_restores_rng(tok):
    model = tiny_model(tok)
    ps = prompts(tok, ["Sam has 3 apples.", "Hi"])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tok, ps, max_new_tokens=10, do_sample=True, num_return_sequences=3, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tok, ps, max_new_tokens=10, do_sample=True, num_return_sequences=3, seed=7)
    c = generate(model, tok, ps, max_new_tokens=10, do_sample=True, num_return_sequences=3, seed=8)
    assert a == b
    assert [g.completion_ids for g in a] != [g.completion_ids for g in c]


def _next_token_probs(model, prompt, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    return torch.softmax(logits / temperature, -1)


def _first_tokens(model, tok, prompt, n, **kw):
    gens = generate(model, tok, [prompt], max_new_tokens=1, do_sample=True, num_return_sequences=n, seed=0, **kw)
    return torch.tensor([g.completion_ids[0] for g in gens])


def test_sampling_uses_exactly_the_given_knobs(tok):
    model = tiny_model(tok, init=0.05)
    # A model generation_config that would change sampling if it leaked through.
    model.generation_config = GenerationConfig(top_k=3, repetition_penalty=5.0, temperature=0.1, min_p=0.5)
    saved = model.generation_config
    prompt = prompts(tok, ["Sam has 3 apples."])[0]
    n = 4000
    for temperature in (1.0, 0.5):
        probs = _next_token_probs(model, prompt, temperature)
        outside_top50 = 1.0 - probs.topk(50).values.sum().item()
        assert outside_top50 > 0.3  # the check below would catch a silent top_k=50
        first = _first_tokens(model, tok, prompt, n, temperature=temperature, top_k=0, top_p=1.0)
        top50 = set(probs.topk(50).indices.tolist())
        frac_outside = sum(t not in top50 for t in first.tolist()) / n
        assert abs(frac_outside - outside_top50) < 0.04
        mean_prob = probs[first].mean().item()           # E[p(x)] under p is sum p^2
        assert abs(mean_prob - (probs ** 2).sum().item()) < 0.2 * (probs ** 2).sum().item()
    assert model.generation_config is saved

    probs = _next_token_probs(model, prompt)
    first = _first_tokens(model, tok, prompt, 500, top_k=5)
    assert set(first.tolist()) <= set(probs.topk(5).indices.tolist())
    assert len(set(first.tolist())) == 5

    sorted_p, order = probs.sort(descending=True)
    keep = int((sorted_p.cumsum(0) < 0.2).sum().item()) + 1
    first = _first_tokens(model, tok, prompt, 500, top_p=0.2)
    assert set(first.tolist()) <= set(order[:keep].tolist())


def test_errors_and_empty(tok):
    model = tiny_model(tok)
    assert generate(model, tok, [], max_new_tokens=3) == []
    with pytest.raises(ValueError):
        generate(model, tok, [[]], max_new_tokens=3)
    with pytest.raises(ValueError):
        generate(model, tok, [[1, 2]], max_new_tokens=3, do_sample=True, temperature=0.0)


def test_restores_training_mode(tok):
    model = tiny_model(tok).train()
    generate(model, tok, prompts(tok, ["Hi"]), max_new_tokens=2)
    assert model.training


def test_wrapped_peft_model_does_not_leak_generation_config(tok):
    peft = pytest.importorskip("peft")
    base = tiny_model(tok, init=0.05)
    base.generation_config = GenerationConfig(top_k=3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"])).eval()
    prompt = prompts(tok, ["Sam has 3 apples."])[0]
    first = _first_tokens(model, tok, prompt, 300, top_k=0)
    assert len(set(first.tolist())) > 3
    assert base.generation_config.top_k == 3
