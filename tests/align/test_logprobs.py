"""Log-probs: label shift, completion-only, padding-side independence, pad == eos safety."""

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
