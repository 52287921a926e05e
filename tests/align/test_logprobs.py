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
