"""KTO against the peer's (TRL 1.16) first batch in ../shared/oracle/kto.json, through our own batching and losses.

The peer's batch is split back into (prompt, completion) ids per example; our collation and KL pairing must rebuild
its exact input ids and KL input ids, our log-prob code its sums, and our loss functions its losses."""

import json

import pytest
import torch

from posttrain.align.kto import EncodedExample, collate_examples, collate_kl_pairs, example_and_kl_logprobs
from posttrain.align.logprobs import sequence_logprobs
from posttrain.align.losses import kto_kl_baseline, kto_loss
from posttrain.data.tokenize import EncodedCompletion


@pytest.fixture(scope="module")
def case(oracle_dir):
    return json.loads((oracle_dir / "kto.json").read_text())


def _model(oracle_dir, which):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(oracle_dir / "tiny" / which, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def frozen(oracle_dir):
    """The two oracle models, loaded once for the tests that need no gradient."""
    return {which: _model(oracle_dir, which) for which in ("policy", "alt_ref")}


def _examples(case) -> list[EncodedExample]:
    b = case["batch"]
    out = []
    for i, (ids, att, comp) in enumerate(zip(b["input_ids"], b["attention_mask"], b["completion_mask"])):
        prompt = [t for t, a, c in zip(ids, att, comp) if a and not c]
        completion = [t for t, a, c in zip(ids, att, comp) if a and c]
        out.append(EncodedExample(EncodedCompletion(prompt, completion), bool(b["label"][i]), i))
    return out


def _real(ids, mask):
    return [[t for t, a in zip(r, m) if a] for r, m in zip(ids, mask)]


@pytest.fixture(scope="module")
def batches(case):
    examples = _examples(case)
    pad = 0  # the peer's pad id (its batch is right-padded with 0)
    max_length = case["method_config"]["max_length"]
    return examples, collate_examples(examples, pad), collate_kl_pairs(examples, pad, max_length)


def test_our_collation_and_kl_rotation_rebuild_the_peer_batch(case, batches):
    _, batch, kl = batches
    b = case["batch"]
    ours = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "completion_mask":
            batch.completion_mask, "KL_input_ids": kl.input_ids, "KL_attention_mask": kl.attention_mask,
            "KL_completion_mask": kl.completion_mask}
    for ids, mask in [("input_ids", "attention_mask"), ("input_ids", "completion_mask"),
                      ("KL_input_ids", "KL_attention_mask"), ("KL_input_ids", "KL_completion_mask")]:
        assert _real(ours[ids].tolist(), ours[mask].tolist()) == _real(b[ids], b[mask]), (ids, mask)


@torch.no_grad()
def test_summed_logprobs_match_peer_on_real_and_kl_sequences(frozen, case, batches):
    _, batch, kl = batches
    for which, model in frozen.items():
        logps, counts = sequence_logprobs(model, batch)
        kl_logps, _ = sequence_logprobs(model, kl)
        ref = case[f"logps_{which}"]
        assert logps.tolist() == pytest.approx(ref["completion_sum"], abs=1e-4)
        assert counts.tolist() == ref["completion_ntok"]
        assert kl_logps.tolist() == pytest.approx(ref["KL_completion_sum"], abs=1e-4)
        # The training path scores both rows with one prompt forward; it must agree with the collated rows.
        own, kl_shared = example_and_kl_logprobs(model, batches[0], 0, case["method_config"]["max_length"])
        assert own.tolist() == pytest.approx(ref["completion_sum"], abs=1e-4)
        assert kl_shared.tolist() == pytest.approx(ref["KL_completion_sum"], abs=1e-4)


@torch.no_grad()
def test_first_batch_loss_is_one_half_and_alt_reference_loss_matches_peer(frozen, case, batches):
    examples, batch, kl = batches
    cfg = case["method_config"]
    labels = torch.tensor(case["labels"])
    assert labels.tolist() == [e.label for e in examples]
    kw = dict(beta=cfg["beta"], desirable_weight=cfg["desirable_weight"], undesirable_weight=cfg["undesirable_weight"])
    policy, alt = frozen["policy"], frozen["alt_ref"]
    logps, kl_logps = sequence_logprobs(policy, batch)[0], sequence_logprobs(policy, kl)[0]
    same, rewards = kto_loss(logps, logps, labels, kto_kl_baseline(kl_logps, kl_logps), **kw)
    assert same.mean().item() == pytest.approx(case["first_batch_loss_trl"], abs=1e-7) == 0.5
    assert rewards.abs().max().item() == 0.0
    # The peer's logged logps/chosen and logps/rejected are the per-label means of the summed log-probs.
    log = case["trl_step1_log"]
    assert logps[labels].mean().item() == pytest.approx(log["logps/chosen"], abs=1e-4)
    assert logps[~labels].mean().item() == pytest.approx(log["logps/rejected"], abs=1e-4)
    alt_logps, alt_kl = sequence_logprobs(alt, batch)[0], sequence_logprobs(alt, kl)[0]
    z0 = kto_kl_baseline(kl_logps, alt_kl)
    losses, _ = kto_loss(logps, alt_logps, labels, z0, **kw)
    assert losses.mean().item() == pytest.approx(case["alt_ref_loss_trl"], abs=1e-4)


def test_first_step_gradient_norm_matches_peer(oracle_dir, case, batches):
    """The backward path (mean over examples, no gradient through the KL forward) against the peer's grad norm."""
    _, batch, kl = batches
    model = _model(oracle_dir, "policy")
    logps, _ = sequence_logprobs(model, batch)
    with torch.no_grad():
        kl_logps, _ = sequence_logprobs(model, kl)
    losses, _ = kto_loss(logps, logps.detach(), torch.tensor(case["labels"]), kto_kl_baseline(kl_logps, kl_logps),
                         beta=case["method_config"]["beta"])
    losses.mean().backward()
    norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm.item() == pytest.approx(case["trl_step1_log"]["grad_norm"], rel=1e-3)
