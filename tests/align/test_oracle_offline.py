"""IPO, SimPO, ORPO and SFT against the peer's first-batch values (../shared/oracle), from our own log-prob code.

Where the peer's objective differs on purpose from ours (ORPO's NLL scope), the test reconstructs the peer's number
from our functions and says so; our training loss follows the paper (see align/preference.py)."""

import json

import pytest
import torch

from posttrain.align.logprobs import completion_mask, sequence_logprobs, token_logprobs
from posttrain.align.losses import ipo_loss, nll_sum, orpo_odds_ratio, simpo_loss
from posttrain.data.collate import CompletionBatch


def _case(oracle_dir, name):
    return json.loads((oracle_dir / f"{name}.json").read_text())


def _model(oracle_dir, which):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(oracle_dir / "tiny" / which, dtype=torch.float32).eval()


def _batch(ids, attention, supervised) -> CompletionBatch:
    ids, attention, supervised = (torch.tensor(x) for x in (ids, attention, supervised))
    return CompletionBatch(ids, attention, supervised, (attention.cumsum(1) - 1).clamp(min=0) * attention)


def _pairs_from_labels(b):
    """CPO/ORPO-style batches: chosen/rejected sequences with labels = -100 outside the completion."""
    rows = {}
    for side in ("chosen", "rejected"):
        labels = torch.tensor(b[f"{side}_labels"])
        rows[side] = _batch(b[f"{side}_input_ids"], b[f"{side}_attention_mask"], (labels != -100).long().tolist())
    return rows


@torch.no_grad()
def test_ipo_first_batch_and_alt_reference(oracle_dir):
    case = _case(oracle_dir, "ipo")
    b = case["batch"]
    batch = _batch(b["input_ids"], b["attention_mask"], b["completion_mask"])
    logps, counts = sequence_logprobs(_model(oracle_dir, "policy"), batch)
    ref, _ = sequence_logprobs(_model(oracle_dir, "alt_ref"), batch)
    n, beta = len(batch) // 2, case["method_config"]["beta"]
    zero = (logps - logps) / counts
    assert ipo_loss(zero[:n], zero[n:], beta).mean().item() == pytest.approx(case["first_batch_loss_trl"], abs=1e-6)
    ratio = (logps - ref) / counts
    assert ipo_loss(ratio[:n], ratio[n:], beta).mean().item() == pytest.approx(case["alt_ref_loss_trl"], abs=1e-4)


@torch.no_grad()
def test_simpo_first_batch(oracle_dir):
    case = _case(oracle_dir, "simpo")
    cfg = case["method_config"]
    model = _model(oracle_dir, "policy")
    sides = _pairs_from_labels(case["batch"])
    avg = {}
    for side, batch in sides.items():
        total, count = sequence_logprobs(model, batch)
        avg[side] = total / count
    assert avg["chosen"].tolist() == pytest.approx(case["logps_policy_trl_concatenated_forward"]["chosen"], abs=1e-4)
    loss = simpo_loss(avg["chosen"], avg["rejected"], beta=cfg["beta"], gamma=cfg["simpo_gamma"]).mean()
    assert loss.item() == pytest.approx(case["first_batch_loss_trl"], abs=1e-4)


@torch.no_grad()
def test_orpo_odds_ratio_term_reproduces_the_peer_loss(oracle_dir):
    case = _case(oracle_dir, "orpo")
    model = _model(oracle_dir, "policy")
    sides = _pairs_from_labels(case["batch"])
    avg = {}
    for side, batch in sides.items():
        total, count = sequence_logprobs(model, batch)
        avg[side] = total / count
    odds_loss, log_odds = orpo_odds_ratio(avg["chosen"], avg["rejected"])
    # The peer's NLL term is a token mean over prompt+chosen (its `orpo_nll_scope`); ours is completion-only
    # (the paper's text). Adding the peer's NLL to our odds-ratio term must give the peer's loss.
    peer_loss = case["orpo_chosen_nll_full_sequence"] + case["method_config"]["beta"] * odds_loss.mean().item()
    assert peer_loss == pytest.approx(case["first_batch_loss_trl"], abs=1e-4)
    assert log_odds.mean().item() == pytest.approx(case["trl_step1_log"]["log_odds_chosen"], abs=1e-4)


@torch.no_grad()
def test_sft_token_mean_nll(oracle_dir):
    case = _case(oracle_dir, "sft")
    b = case["batch"]
    labels = torch.tensor(b["labels"])
    batch = _batch(b["input_ids"], b["attention_mask"], (labels != -100).long().tolist())
    total, count = nll_sum(token_logprobs(_model(oracle_dir, "policy"), batch), completion_mask(batch))
    assert (total / count).item() == pytest.approx(case["first_batch_loss_trl"], abs=1e-4)
