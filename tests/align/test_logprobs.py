"""Log-probs: label shift, completion-only, padding-side independence, pad == eos safety."""

import pytest
import torch

from posttrain.align.logprobs import sequence_logprobs, token_logprobs
from posttrain.data.collate import collate_completions


def test_left_and_right_padding_give_the_same_logprobs(tiny_model):
    rows = [([1, 10, 11, 12], [13, 2]), ([1, 14], [15, 16, 17, 2]), ([1], [18, 2])]
    right = collate_completions(rows, pad_id=2, padding_side="right")
    left = collate_completions(rows, pad_id=2, padding_side="left")
    with torch.no_grad():
        lr, nr = sequence_logprobs(tiny_model, right)
        ll, nl = sequence_logprobs(tiny_model, left)
        alone = [sequence_logprobs(tiny_model, collate_completions([r], pad_id=2))[0].item() for r in rows]
    torch.testing.assert_close(lr, ll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lr, torch.tensor(alone), atol=1e-5, rtol=1e-5)
    assert nr.tolist() == nl.tolist() == [2.0, 4.0, 2.0]


def test_label_shift_scores_each_completion_token_from_the_previous_position(tiny_model):
    rows = [([1, 10, 11], [12, 13, 2])]
    batch = collate_completions(rows, pad_id=0)
    with torch.no_grad():
        per_token = token_logprobs(tiny_model, batch)
        logits = tiny_model(input_ids=batch.input_ids).logits[0]
    logp = torch.log_softmax(logits, -1)
    expected = [0.0, 0.0, logp[2, 12].item(), logp[3, 13].item(), logp[4, 2].item()]
    torch.testing.assert_close(per_token[0], torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_pad_equal_to_eos_keeps_the_final_eos_supervised():
    eos = 2
    batch = collate_completions([([1, 5], [6, eos]), ([1], [7, 8, 9, eos])], pad_id=eos)
    # One supervised EOS per sequence, counted from lengths, not from token == pad.
    shifted = batch.completion_mask[:, 1:]
    eos_supervised = ((batch.input_ids[:, 1:] == eos) & (shifted == 1)).sum().item()
    assert eos_supervised == 2
    assert batch.attention_mask.sum(1).tolist() == [4, 5]


def test_shared_prompt_scoring_equals_scoring_each_sequence_with_the_same_gradients(tiny_model):
    from posttrain.align.logprobs import shared_prompt_logprobs

    tiny_model.train()
    prompts = [[1, 10, 11, 12, 13], [1, 14], [1, 15, 16]]
    completions = [[[20, 21, 2], [22, 2]], [[23, 24, 25, 26, 2], [27, 2]], [[28, 2], [29, 30, 2]]]
    rows = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    expected, expected_counts = sequence_logprobs(tiny_model, collate_completions(rows, pad_id=0))
    shared, counts = shared_prompt_logprobs(tiny_model, prompts, completions, pad_id=0)
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == expected_counts.tolist() == [3, 2, 5, 2, 2, 3]
    params = list(tiny_model.parameters())
    for a, b in zip(torch.autograd.grad(expected.sum(), params), torch.autograd.grad(shared.sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fast_path_falls_back_for_a_model_whose_forward_is_not_head_of_decoder(tiny_model):
    """A model that scales its logits (like soft-capping) must not be scored by decoder + head alone."""
    from posttrain.align import logprobs as lp

    class Scaled(type(tiny_model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = Scaled(tiny_model.config).eval()
    batch = collate_completions([([1, 10, 11], [12, 2])], pad_id=0)
    lp._FAST_PATH_OK.pop(Scaled, None)
    with torch.no_grad():
        got = token_logprobs(model, batch)
        logits = model(input_ids=batch.input_ids).logits[0]
    assert lp._FAST_PATH_OK[Scaled] is False
    expected = torch.log_softmax(logits, -1)
    torch.testing.assert_close(got[0, 2:], torch.stack([expected[2, 12], expected[3, 2]]), atol=1e-5, rtol=1e-5)


# ---- the restricted last layer (queries, attention output and MLP only where a token is scored) ----------------

ROWS = [([1, 10, 11, 12, 9, 8], [13, 2]), ([1, 14], [15, 16, 17, 5, 6, 2]), ([1], [18, 2]), ([1, 3, 4], [7])]


def _family_model(family: str, window: int | None = None):
    """A tiny random model of `family` whose last layer matters (initializer_range 0.2: a wrong rotary, mask or
    query position moves log-probs by 1e-2 or more), with grouped-query attention and, where the family has them,
    biases and a sliding window (by default shorter than the rows, so that it binds)."""
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(0)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True)).eval()
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=window or 3)).eval()
    # Qwen2: biases on q/k/v; sliding window on the last layer only (layers >= max_window_layers)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=window or 4,
                                              max_window_layers=2)).eval()


@pytest.fixture
def fresh_checks(monkeypatch):
    """Empty check caches, and a count of the restricted last layer's runs."""
    from posttrain.align import logprobs as lp

    for name in ("_FAST_PATH_OK", "_LAST_LAYER_OK", "_LAST_LAYER_GRADS_OK", "_PREFIX_OK", "_PREFIX_GRADS_OK", "_TREE_OK",
                 "_TREE_GRADS_OK"):
        monkeypatch.setattr(lp, name, {})
    runs = []
    original = lp._last_layer_at
    monkeypatch.setattr(lp, "_last_layer_at", lambda *a, **k: runs.append(1) or original(*a, **k))
    return runs


def _grads(values: torch.Tensor, model) -> list[torch.Tensor]:
    return list(torch.autograd.grad(values.sum(), list(model.parameters()), allow_unused=True))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_restricted_last_layer_gives_the_plain_forwards_logprobs_and_gradients(family, side, fresh_checks):
    from posttrain.align import logprobs as lp

    model = _family_model(family)
    plan = lp.last_layer_plan(model.model)
    assert plan is not None and plan.window == {"llama": None, "mistral": 3, "qwen2": 4}[family]
    batch = collate_completions(ROWS, pad_id=0, padding_side=side)
    got = token_logprobs(model, batch)
    assert len(fresh_checks) >= 1 and lp._LAST_LAYER_OK[(type(model), torch.float32)] is True
    assert lp._LAST_LAYER_GRADS_OK[(type(model), torch.float32)] is True
    runs = len(fresh_checks)
    again = token_logprobs(model, batch)  # checked: the restricted path alone
    assert len(fresh_checks) == runs + 1
    expected = lp._full_token_logprobs(model, batch, 1.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(again, model), _grads(expected, model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the plain path's own left/right padding independence holds too
    other = collate_completions(ROWS, pad_id=0, padding_side="left" if side == "right" else "right")
    torch.testing.assert_close(again.sum(-1), token_logprobs(model, other).sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_restricted_last_layer_on_shared_prompts_gives_the_plain_forwards_sums_and_gradients(family, fresh_checks):
    from posttrain.align import logprobs as lp
    from posttrain.align.logprobs import shared_prompt_logprobs

    model = _family_model(family, window=16).train()  # a window covering every key: the cached path can restrict
    lp._TREE_OK[(type(model.model), torch.float32)] = False  # the two-pass path (the packed one: tested below)
    prompts = [[1, 10, 11, 12, 13], [1, 14], [1, 15, 16]]
    completions = [[[20, 21, 2], [22, 2]], [[23, 24, 25, 26, 2], [27]], [[28, 2], [29, 30, 2]]]
    rows = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    shared, counts = shared_prompt_logprobs(model, prompts, completions, pad_id=0)
    assert fresh_checks and lp._LAST_LAYER_GRADS_OK[(type(model), torch.float32)] is True
    batch = collate_completions(rows, pad_id=0)
    expected = lp._full_token_logprobs(model, batch, 1.0).sum(-1)
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [3, 2, 5, 1, 2, 3]
    for a, b in zip(_grads(shared, model), _grads(expected, model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_shared_prompts_with_a_binding_sliding_window_run_the_last_layer_whole(fresh_checks):
    """A sliding layer's cache keeps only the last window - 1 keys: the shared path restricts nothing then."""
    from posttrain.align import logprobs as lp
    from posttrain.align.logprobs import shared_prompt_logprobs

    model = _family_model("mistral")  # window 3, rows longer than that
    prompts, completions = [[1, 10, 11, 12], [1, 14]], [[[20, 21, 2], [22, 2]], [[23, 24, 2], [27, 2]]]
    shared, _ = shared_prompt_logprobs(model, prompts, completions, pad_id=0)
    assert fresh_checks == []
    batch = collate_completions([(p, c) for p, cs in zip(prompts, completions) for c in cs], pad_id=0)
    torch.testing.assert_close(shared, lp._full_token_logprobs(model, batch, 1.0).sum(-1), atol=1e-5, rtol=1e-5)


def test_a_wrong_restricted_layer_is_caught_by_the_value_check_and_switched_off(fresh_checks, monkeypatch):
    from posttrain.align import logprobs as lp

    model = _family_model("llama")
    monkeypatch.setattr(lp, "_rotate", lambda x, cos, sin: x)  # forgets the rotary embedding
    batch = collate_completions(ROWS, pad_id=0)
    got = token_logprobs(model, batch)
    assert lp._LAST_LAYER_OK[(type(model), torch.float32)] is False
    expected = lp._full_token_logprobs(model, batch, 1.0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    runs = len(fresh_checks)
    token_logprobs(model, batch)
    assert len(fresh_checks) == runs  # switched off for good


def test_a_restricted_layer_with_right_values_but_wrong_gradients_is_switched_off(fresh_checks, monkeypatch):
    from posttrain.align import logprobs as lp

    model = _family_model("qwen2")
    original = lp._last_layer_at

    def values_only(*args, **kwargs):  # the same numbers, but no gradient reaches the layers below
        out = original(*args, **kwargs)
        return out.detach() + 0 * out

    monkeypatch.setattr(lp, "_last_layer_at", values_only)
    batch = collate_completions(ROWS, pad_id=0)
    with torch.no_grad():  # a reference model's use: values only, checked and accepted
        token_logprobs(model, batch)
    key = (type(model), torch.float32)
    assert lp._LAST_LAYER_OK[key] is True and key not in lp._LAST_LAYER_GRADS_OK
    got = token_logprobs(model, batch)  # first use with gradients: the probe's gradients disagree
    assert lp._LAST_LAYER_GRADS_OK[key] is False and lp._LAST_LAYER_OK[key] is False
    expected = lp._full_token_logprobs(model, batch, 1.0)
    for a, b in zip(_grads(got, model), _grads(expected, model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unverified_architectures_and_layers_run_the_last_layer_whole(fresh_checks, tiny_model):
    import transformers as tf

    from posttrain.align import logprobs as lp

    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    assert lp.last_layer_plan(gpt2.transformer) is None
    batch = collate_completions(ROWS, pad_id=0)
    torch.testing.assert_close(token_logprobs(gpt2, batch), lp._full_token_logprobs(gpt2, batch, 1.0),
                               atol=1e-5, rtol=1e-5)
    assert fresh_checks == []

    class OwnLayer(type(tiny_model.model.layers[-1])):  # a subclass may change the forward: not verified
        pass

    tiny_model.model.layers[-1].__class__ = OwnLayer
    assert lp.last_layer_plan(tiny_model.model) is None
    llama = _family_model("llama").train()
    llama.config.attention_dropout = 0.0
    assert lp.last_layer_plan(llama.model) is not None
    llama.model.layers[-1].self_attn.attention_dropout = 0.1  # dropout on attention weights: no subset reproduces it
    assert lp.last_layer_plan(llama.model) is None
    assert lp.last_layer_plan(llama.model.eval()) is not None


def test_shared_prompts_under_gradient_checkpointing_run_the_sequences_whole(fresh_checks):
    """Checkpointed layers drop the key/value cache in training; the shared path used to crash on the None cache."""
    from posttrain.align import logprobs as lp
    from posttrain.align.logprobs import shared_prompt_hidden, shared_prompt_logprobs

    model = _family_model("llama").train()
    model.gradient_checkpointing_enable()
    prompts, completions = [[1, 10, 11], [1, 14]], [[[20, 2], [21, 22, 2]], [[23, 2], [24, 2]]]
    shared, counts = shared_prompt_logprobs(model, prompts, completions, pad_id=0)
    batch = collate_completions([(p, c) for p, cs in zip(prompts, completions) for c in cs], pad_id=0)
    torch.testing.assert_close(shared, lp._full_token_logprobs(model, batch, 1.0).sum(-1), atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [2, 3, 2, 2]
    with pytest.raises(ValueError, match="gradient checkpointing"):
        shared_prompt_hidden(model.model, prompts, completions, pad_id=0)


# -- a common prefix computed once (align/prefix_sharing.py) ------------------------------------------------------
PREFIX = [1, 30, 31, 32, 33, 34]  # e.g. a chat template's header: every row starts with it


def _prefixed_batch():
    """Rows sharing PREFIX, of different lengths (right-padded); row 0's supervision starts right after the prefix
    (the prefix's last state predicts a scored token), row 2 is supervised on two separate spans (assistant turns)."""
    from posttrain.data.collate import collate_masked

    rows = [PREFIX + [40, 41, 2], PREFIX + [42, 43, 44, 45, 46, 2], PREFIX + [47, 48, 49, 50, 2], PREFIX + [51, 2]]
    masks = [[0] * 6 + [1, 1, 1], [0] * 10 + [1, 1], [0] * 6 + [0, 1, 0, 1, 1], [0] * 7 + [1]]
    return collate_masked(list(zip(rows, masks)), pad_id=0)


@pytest.fixture
def prefix_runs(fresh_checks, monkeypatch):
    from posttrain.align import logprobs as lp

    runs = []
    original = lp.tree_states
    monkeypatch.setattr(lp, "tree_states", lambda *a, **k: runs.append(1) or original(*a, **k))
    return runs


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_shared_prefix_gives_the_plain_forwards_logprobs_and_every_gradient(family, temperature, prefix_runs):
    from posttrain.align import logprobs as lp

    model = _family_model(family, window=32).train()
    batch = _prefixed_batch()
    assert lp.shared_prefix_length(batch) == 6
    got = token_logprobs(model, batch, temperature)
    key = (type(model.model), torch.float32)
    assert prefix_runs and lp._PREFIX_OK[key] is True and lp._PREFIX_GRADS_OK[key] is True
    expected = lp._full_token_logprobs(model, batch, temperature)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got != 0).sum() == (batch.completion_mask[:, 1:] != 0).sum()  # every scored token, nothing else
    for a, b in zip(_grads(got, model), _grads(expected, model)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_shared_prefix_length_stops_at_the_first_scored_token_and_leaves_each_row_a_token():
    from posttrain.align import logprobs as lp
    from posttrain.data.collate import collate_masked

    def length(rows, masks, side="right"):
        return lp.shared_prefix_length(collate_masked(list(zip(rows, masks)), pad_id=0, padding_side=side))

    same = [1, 5, 6, 7, 8]
    assert length([same + [9], same + [10, 11]], [[0] * 5 + [1], [0] * 5 + [1, 1]]) == 5
    assert length([same + [9], same + [10, 11]], [[0] * 3 + [1] * 3, [0] * 5 + [1, 1]]) == 3  # scored from token 3
    assert length([same, same], [[0] * 4 + [1], [0] * 4 + [1]]) == 4  # identical rows keep their last token
    assert length([[1, 5, 6, 9], [1, 5, 7, 9]], [[0, 0, 0, 1]] * 2) == 2
    assert length([[2, 5, 6, 9], [1, 5, 6, 9]], [[0, 0, 0, 1]] * 2) == 0
    assert length([same + [9], same + [10, 11]], [[0] * 5 + [1], [0] * 5 + [1, 1]], side="left") == 0
    assert length([same + [9]], [[0] * 5 + [1]]) == 0  # one row: nothing to share


def test_prefix_sharing_is_not_used_where_it_does_not_hold_or_pay(prefix_runs):
    from posttrain.align import logprobs as lp
    from posttrain.data.collate import collate_masked

    batch = _prefixed_batch()
    token_logprobs(_family_model("mistral", window=4), batch)  # a window shorter than the rows
    token_logprobs(_family_model("llama", window=32), collate_completions(ROWS, pad_id=0))  # a 1-token prefix
    short = collate_masked([([1, 30, 40, 2], [0, 0, 1, 1]), ([1, 30, 41, 2], [0, 0, 1, 1])], pad_id=0)
    token_logprobs(_family_model("llama"), short)  # (rows - 1) * prefix below MIN_SHARED_PREFIX_SAVING
    checkpointed = _family_model("llama").train()
    checkpointed.gradient_checkpointing_enable()
    token_logprobs(checkpointed, batch)
    assert prefix_runs == []


def test_a_wrong_shared_prefix_pass_is_caught_and_switched_off(prefix_runs, monkeypatch):
    from posttrain.align import logprobs as lp

    model = _family_model("llama")
    original = lp.tree_states

    def shifted(*args, **kwargs):
        tree = original(*args, **kwargs)
        tree.rows = tree.rows + 0.05
        return tree
    monkeypatch.setattr(lp, "tree_states", shifted)
    batch = _prefixed_batch()
    got = token_logprobs(model, batch)
    assert lp._PREFIX_OK[(type(model.model), torch.float32)] is False
    torch.testing.assert_close(got, lp._full_token_logprobs(model, batch, 1.0), atol=1e-5, rtol=1e-5)


def test_a_shared_prefix_pass_with_right_values_but_wrong_gradients_is_switched_off(prefix_runs, monkeypatch):
    from posttrain.align import logprobs as lp

    model = _family_model("qwen2", window=32)
    original = lp.tree_states

    def values_only(*args, **kwargs):
        tree = original(*args, **kwargs)
        tree.rows = tree.rows.detach() + 0 * tree.rows.sum()
        return tree
    monkeypatch.setattr(lp, "tree_states", values_only)
    batch = _prefixed_batch()
    with torch.no_grad():
        token_logprobs(model, batch)
    key = (type(model.model), torch.float32)
    assert lp._PREFIX_OK[key] is True and key not in lp._PREFIX_GRADS_OK
    got = token_logprobs(model, batch)
    assert lp._PREFIX_GRADS_OK[key] is False and lp._PREFIX_OK[key] is False
    expected = lp._full_token_logprobs(model, batch, 1.0)
    for a, b in zip(_grads(got, model), _grads(expected, model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- shared prompts in one packed pass ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("prompts", [[[1, 5, 6, 10, 11, 12, 13], [1, 5, 6, 14], [1, 5, 6, 15, 16]],  # common [1, 5, 6]
                                     [[1, 10, 11], [2, 14], [3]]],  # none in common; a one-token prompt
                         ids=["common-prefix", "no-common-prefix"])
def test_packed_shared_prompts_give_the_plain_forwards_sums_and_every_gradient(family, prompts, fresh_checks):
    from posttrain.align import logprobs as lp
    from posttrain.align.logprobs import shared_prompt_logprobs

    model = _family_model(family, window=32).train()
    completions = [[[20, 21, 2], [22, 2]], [[23, 24, 25, 26, 2], [27]], [[28, 2], [29, 30, 2]]]
    shared, counts = shared_prompt_logprobs(model, prompts, completions, pad_id=0)
    key = (type(model.model), torch.float32)
    assert lp._TREE_OK[key] is True and lp._TREE_GRADS_OK[key] is True
    batch = collate_completions([(p, c) for p, cs in zip(prompts, completions) for c in cs], pad_id=0)
    expected = lp._full_token_logprobs(model, batch, 1.0).sum(-1)
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [3, 2, 5, 1, 2, 3]
    for a, b in zip(_grads(shared, model), _grads(expected, model)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_shared_prompts_with_different_completion_counts_and_no_keep(fresh_checks):
    """The evaluation's use: prompts with different numbers of completions, every completion state read."""
    from posttrain.align import logprobs as lp

    model = _family_model("llama")
    prompts = [[1, 5, 6, 10, 11], [1, 5, 6, 12]]
    completions = [[[20, 21], [22], [23, 24, 25]], [[26, 27]]]
    with torch.no_grad():
        packed = lp.shared_prompt_hidden(model.model, prompts, completions, pad_id=0)
        two_pass = lp._two_pass_shared_prompt(model.model, prompts, completions, 0, None)
    assert lp._TREE_OK[(type(model.model), torch.float32)] is True
    real = two_pass.mask.bool()
    torch.testing.assert_close(packed.prompt_last, two_pass.prompt_last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.hidden[real], two_pass.hidden[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.ids, two_pass.ids) and torch.equal(packed.mask, two_pass.mask)


def test_a_wrong_packed_shared_prompt_pass_is_caught_and_switched_off(fresh_checks, monkeypatch):
    from posttrain.align import logprobs as lp
    from posttrain.align.logprobs import shared_prompt_logprobs

    model = _family_model("qwen2", window=32)
    original = lp.tree_states

    def values_only(*args, **kwargs):  # right numbers, no gradient below the completions' last layer
        tree = original(*args, **kwargs)
        tree.completions = tree.completions.detach() + 0 * tree.completions.sum()
        return tree
    monkeypatch.setattr(lp, "tree_states", values_only)
    prompts, completions = [[1, 5, 6, 10], [1, 5, 7]], [[[20, 21, 2], [22, 2]], [[23, 2], [24, 25, 2]]]
    with torch.no_grad():
        shared_prompt_logprobs(model, prompts, completions, pad_id=0)
    key = (type(model.model), torch.float32)
    assert lp._TREE_OK[key] is True and key not in lp._TREE_GRADS_OK
    got, _ = shared_prompt_logprobs(model, prompts, completions, pad_id=0)
    assert lp._TREE_GRADS_OK[key] is False and lp._TREE_OK[key] is False
    batch = collate_completions([(p, c) for p, cs in zip(prompts, completions) for c in cs], pad_id=0)
    expected = lp._full_token_logprobs(model, batch, 1.0).sum(-1)
    for a, b in zip(_grads(got, model), _grads(expected, model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
