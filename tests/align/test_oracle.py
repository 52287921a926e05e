"""Cross-checks against ../shared/oracle: a peer's (TRL 1.16) first-batch values on a fixed tiny model and batch."""

import json
import math

import pytest
import torch

from posttrain.align.logprobs import sequence_logprobs
from posttrain.align.losses import dpo_loss, group_advantages
from posttrain.data.collate import CompletionBatch


def _load(oracle_dir, name):
    return json.loads((oracle_dir / f"{name}.json").read_text())


def _model(oracle_dir, which):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(oracle_dir / "tiny" / which, dtype=torch.float32)
    return model.eval()


def _batch(raw) -> CompletionBatch:
    ids = torch.tensor(raw["input_ids"])
    attention = torch.tensor(raw["attention_mask"])
    completion = torch.tensor(raw["completion_mask"])
    positions = (attention.cumsum(1) - 1).clamp(min=0) * attention
    return CompletionBatch(ids, attention, completion, positions)


@pytest.fixture(scope="module")
def dpo_case(oracle_dir):
    return _load(oracle_dir, "dpo")


@torch.no_grad()
def test_summed_completion_logprobs_match_peer(oracle_dir, dpo_case):
    batch = _batch(dpo_case["batch"])
    logps, counts = sequence_logprobs(_model(oracle_dir, "policy"), batch)
    n = len(batch) // 2
    ref = dpo_case["logps_policy"]
    assert logps[:n].tolist() == pytest.approx(ref["chosen_sum"], abs=1e-4)
    assert logps[n:].tolist() == pytest.approx(ref["rejected_sum"], abs=1e-4)
    assert counts[:n].tolist() == ref["chosen_ntok"]


@torch.no_grad()
def test_dpo_first_batch_loss_is_ln2_and_alt_reference_loss_matches_peer(oracle_dir, dpo_case):
    batch = _batch(dpo_case["batch"])
    policy, _ = sequence_logprobs(_model(oracle_dir, "policy"), batch)
    alt, _ = sequence_logprobs(_model(oracle_dir, "alt_ref"), batch)
    n = len(batch) // 2
    beta = dpo_case["method_config"]["beta"]
    same, _, _ = dpo_loss(policy[:n], policy[n:], policy[:n], policy[n:], beta)
    assert same.mean().item() == pytest.approx(dpo_case["first_batch_loss_trl"], abs=1e-6)
    assert same.mean().item() == pytest.approx(math.log(2), abs=1e-7)
    losses, _, _ = dpo_loss(policy[:n], policy[n:], alt[:n], alt[n:], beta)
    assert losses.mean().item() == pytest.approx(dpo_case["alt_ref_loss_trl"], abs=1e-4)


def test_dpo_first_step_gradient_norm_matches_peer(oracle_dir, dpo_case):
    """The whole backward path (mean over pairs, completion mask, label shift) against TRL's logged grad norm."""
    model = _model(oracle_dir, "policy")
    batch = _batch(dpo_case["batch"])
    logps, _ = sequence_logprobs(model, batch)
    n = len(batch) // 2
    losses, _, _ = dpo_loss(logps[:n], logps[n:], logps[:n].detach(), logps[n:].detach(),
                            dpo_case["method_config"]["beta"])
    losses.mean().backward()
    norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm.item() == pytest.approx(dpo_case["trl_step1_log"]["grad_norm"], rel=1e-3)


def test_grpo_group_advantages_match_peer(oracle_dir):
    case = _load(oracle_dir, "grpo")
    g = case["method_config"]["num_generations"]
    # The peer shuffles samples after scoring: regroup by prompt (contiguous groups), then scatter back.
    prompts = case["prompts_text"]
    order = sorted(range(len(prompts)), key=lambda i: (prompts.index(prompts[i]), i))
    rewards = torch.tensor([case["rewards_recomputed"][i] for i in order], dtype=torch.float32)
    grouped = group_advantages(rewards, g)
    adv = [0.0] * len(order)
    for k, i in enumerate(order):
        adv[i] = grouped[k].item()
    assert adv == pytest.approx(case["advantages_recomputed"], abs=1e-5)
