"""Unstructured and N:M pruning: exact sparsity, the 2:4 pattern, what is skipped, and Wanda's reconstruction
advantage over magnitude on calibration inputs with outlier channels."""

import copy

import pytest
import torch
from torch import nn

from posttrain.compress.prune import (check_nm, keep_mask, prune_magnitude, prune_wanda, prunable_linears,
                                      sparsity_report)


def test_magnitude_sparsity_is_exact_per_row_and_keeps_the_largest(make_llama):
    model = make_llama(hidden=64)
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(model)}
    stats = prune_magnitude(model, 0.3)
    assert set(stats) == set(before) and "lm_head" not in stats
    for name, linear in prunable_linears(model):
        w, old = linear.weight.detach(), before[name]
        k = round(0.3 * w.shape[1])
        assert ((w == 0).sum(1) == k).all()  # exactly k zeros in every row
        assert stats[name] == k / w.shape[1]
        assert torch.equal(w[w != 0], old[w != 0])  # kept weights are untouched
        # every dropped weight is no larger than any kept weight of its row
        dropped = old.abs().masked_fill(w != 0, float("-inf")).max(1).values
        kept = old.abs().masked_fill(w == 0, float("inf")).min(1).values
        assert (dropped <= kept).all()
    assert torch.count_nonzero(model.lm_head.weight) == model.lm_head.weight.numel()


def test_two_four_pattern_holds_in_every_pruned_layer(make_llama):
    model = make_llama(hidden=64)
    stats = prune_magnitude(model, 0.5, pattern="2:4")
    for name, linear in prunable_linears(model):
        assert check_nm(linear.weight, 2, 4), name
        assert stats[name] == 0.5
    report = sparsity_report(model, skip=("lm_head",))
    assert report.overall == 0.5 and report.layers == stats
    assert sparsity_report(model).overall < 0.5  # the dense lm_head counts when not skipped


def test_nm_keeps_the_largest_of_each_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    assert keep_mask(scores, None, "2:4").tolist() == [[True, False, True, False, False, True, True, False]]
    assert not check_nm(torch.ones(1, 8), 2, 4)
    assert check_nm(torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 1]]), 2, 4)


def test_bad_requests_are_refused(make_llama):
    with pytest.raises(ValueError, match="implies sparsity 0.5"):
        prune_magnitude(make_llama(), 0.3, pattern="2:4")
    with pytest.raises(ValueError, match="multiple of 8"):
        keep_mask(torch.ones(2, 12), None, "2:8")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_magnitude(make_llama(), 1.0)


def test_skip_patterns_and_lm_head_opt_in(make_llama):
    model = make_llama()
    stats = prune_magnitude(model, 0.5, skip=("*.down_proj",))
    assert "lm_head" in stats and not any(n.endswith("down_proj") for n in stats)
    down = model.model.layers[0].mlp.down_proj.weight
    assert torch.count_nonzero(down) == down.numel()


def _layer_inputs(model, ids):
    inputs = {}
    def keep(name):
        return lambda _m, args: inputs.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1]))

    handles = [lin.register_forward_pre_hook(keep(name)) for name, lin in prunable_linears(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return inputs


OUTLIERS = [3, 17, 38, 50]  # in different groups of 4, so a 2:4 mask can keep all of them


@pytest.mark.parametrize("pattern,sparsity", [(None, 0.5), ("2:4", 0.5)])
def test_wanda_reconstructs_calibration_outputs_better_than_magnitude(make_llama, pattern, sparsity):
    model = make_llama(hidden=64)
    with torch.no_grad():  # outlier input channels, as in real LLMs, are what Wanda's activation term is for
        for layer in model.model.layers:
            layer.input_layernorm.weight[OUTLIERS] *= 20
            layer.post_attention_layernorm.weight[OUTLIERS] *= 20
    ids = torch.randint(6, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    inputs = _layer_inputs(model, ids)
    dense = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model)}
    wanda, magnitude = copy.deepcopy(model), copy.deepcopy(model)
    prune_wanda(wanda, [ids], sparsity, pattern)
    prune_magnitude(magnitude, sparsity, pattern)

    def error(pruned: nn.Module) -> float:
        # ‖X (W − W')ᵀ‖² summed over the layers, on the inputs each layer saw in the dense model
        return sum(float((inputs[n] @ (dense[n] - lin.weight.detach()).T).pow(2).sum())
                   for n, lin in prunable_linears(pruned))

    for name, lin in prunable_linears(wanda):
        assert pattern is None or check_nm(lin.weight, 2, 4)
        assert float((lin.weight == 0).float().mean()) == sparsity
    assert error(wanda) < 0.5 * error(magnitude)  # measured about 0.04x on this model
