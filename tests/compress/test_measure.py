"""Measurement of an artifact against its base: identical models agree fully; int8 is measured, not assumed; held-out
rows are scored on completions — theirs, the chosen side of a pair, or the aligned model's own greedy completion of a
prompt that has none (never on prompt tokens) — and the run's report says which."""

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.align.engine import save_pretrained
from posttrain.compress.int8 import load_int8, quantize_model_to_dir
from posttrain.compress.measure import (SPEED_REPEATS, compare_on_texts, greedy_tokens_per_s, heldout_targets,
                                       measure_artifact)
from posttrain.data.tokenize import encode_completion, encode_prompt
from posttrain.rollout.generate import generate

USER = [{"role": "user", "content": "Sam has 3 apples and buys 4 more. How many apples?"}]
OTHER = [{"role": "user", "content": "Ann has 12 pears and eats 5. How many pears are left?"}]
SAID = [{"role": "assistant", "content": "Sam has 3 + 4 = 7.\n#### 7"}]
WRONG = [{"role": "assistant", "content": "Sam has 3 + 4 = 8.\n#### 8"}]


def completion_nll(model, ids: list[int], start: int) -> tuple[float, int]:
    """Summed NLL of ids[start:] given what precedes them, computed here independently of compare_on_texts."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1:-1]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[start:]), reduction="sum")), len(ids) - start


def test_identical_model_has_full_agreement_and_equal_perplexity(make_llama):
    model = make_llama()
    texts = [[1, 10, 11, 12, 13, 14], [1, 20, 21]]
    ppl, base_ppl, agree, positions = compare_on_texts(model, model, texts)
    assert ppl == pytest.approx(base_ppl) and agree == 1.0 and positions == 7


def test_int8_artifact_measurement(make_llama, tiny_tokenizer, tmp_path):
    model = make_llama()
    base_dir = save_pretrained(model, tiny_tokenizer, tmp_path / "base")
    art = quantize_model_to_dir(model, tiny_tokenizer, tmp_path / "int8")
    targets = heldout_targets(tiny_tokenizer, [{"prompt": USER, "completion": SAID}])
    (ids, start), = targets.items
    prompt = encode_prompt(tiny_tokenizer, USER)
    m = measure_artifact(model, base_dir, art, lambda: load_int8(art), targets, prompt, "transformers (int8)")
    assert 0 < m.size_bytes < m.base_size_bytes and m.tokens_per_s > 0 and m.load_seconds > 0
    # tokens/s is the median of the timed repeats, which are kept (their spread is part of the measurement)
    assert len(m.tokens_per_s_repeats) == SPEED_REPEATS and all(v > 0 for v in m.tokens_per_s_repeats)
    assert m.tokens_per_s == pytest.approx(sorted(m.tokens_per_s_repeats)[SPEED_REPEATS // 2], abs=0.011)
    assert m.positions == len(ids) - start and 0.0 <= m.top1_agreement <= 1.0
    assert (m.scored_on, m.scored_rows, m.max_new_tokens) == ("completions", {"completion": 1}, None)
    nll, n = completion_nll(load_int8(art), ids, start)  # the perplexity the reloaded artifact really has
    assert m.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)


class ScriptedModel:
    """A stand-in for generate's timing: each call takes the next scripted number of seconds on a fake clock."""

    def __init__(self, seconds):
        self.seconds, self.now, self.calls = list(seconds), 0.0, []
        self.weight = torch.zeros(1)

    def parameters(self):
        return iter([self.weight])

    def clock(self):
        return self.now

    def generate(self, input_ids, max_new_tokens, min_new_tokens, do_sample):
        self.calls.append((max_new_tokens, min_new_tokens, do_sample))
        self.now += self.seconds.pop(0)
        return torch.cat([input_ids, torch.zeros(1, max_new_tokens, dtype=input_ids.dtype)], dim=1)


def test_tokens_per_s_warms_up_untimed_then_reports_the_median_of_the_repeats(monkeypatch):
    # Regression: one timed run after a 2-token warm-up; a cold first run read 56.5 tok/s where reruns read 555-710.
    model = ScriptedModel([10.0, 1.0, 4.0, 0.5])  # a slow first (warm-up) call, then three timed runs
    monkeypatch.setattr("posttrain.compress.measure.time.perf_counter", model.clock)
    speed = greedy_tokens_per_s(model, [1, 2, 3], new_tokens=8, repeats=3)
    assert model.calls == [(8, 8, False)] * 4  # the warm-up generates as many tokens as each timed run
    assert speed.repeats == [8.0, 2.0, 16.0]  # the warm-up's 10 s are in none of them
    assert speed.median == 8.0
    with pytest.raises(ValueError, match="at least one timed run"):
        greedy_tokens_per_s(model, [1], repeats=0)


def test_completion_rows_score_their_completion_and_pairs_the_chosen_side(tiny_tokenizer):
    rows = [{"prompt": USER, "completion": SAID}, {"prompt": USER, "completion": WRONG, "label": False},
            {"prompt": OTHER, "chosen": SAID, "rejected": WRONG}]
    targets = heldout_targets(tiny_tokenizer, rows)  # no model: nothing has to be generated
    expected = [encode_completion(tiny_tokenizer, r["prompt"], side) for r, side in
                zip(rows, (SAID, WRONG, SAID))]
    assert targets.items == [(e.input_ids, len(e.prompt_ids)) for e in expected]
    assert targets.items[2][1] == len(encode_prompt(tiny_tokenizer, OTHER))  # the prompt itself is never scored
    assert (targets.scored_on, targets.scored_rows) == ("completions", {"completion": 2, "chosen": 1})
    assert targets.max_new_tokens is None and targets.dropped is None


def test_prompt_rows_are_scored_on_the_aligned_models_greedy_completion(tiny_model, tiny_tokenizer):
    rows = [{"prompt": USER, "answer": "7"}, {"prompt": OTHER}]  # verifiable (bare final answer), prompt-only
    targets = heldout_targets(tiny_tokenizer, rows, model=tiny_model, max_new_tokens=12)
    prompts = [encode_prompt(tiny_tokenizer, r["prompt"]) for r in rows]  # the chat template, as generation has it
    gens = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=12)
    assert all(g.completion_ids for g in gens)
    # Scored positions: exactly the completion tokens of the aligned model's greedy output, after the prompt.
    assert targets.items == [(p + g.completion_ids, len(p)) for p, g in zip(prompts, gens)]
    assert targets.scored_on == "aligned_greedy_completions"
    assert targets.scored_rows == {"aligned_greedy_completion": 2} and targets.max_new_tokens == 12
    ppl, base_ppl, agreement, positions = compare_on_texts(tiny_model, tiny_model, targets)
    assert agreement == 1.0 and ppl == base_ppl and positions == sum(len(g.completion_ids) for g in gens)
    nll = sum(completion_nll(tiny_model, p + g.completion_ids, len(p))[0] for p, g in zip(prompts, gens))
    assert ppl == pytest.approx(math.exp(nll / positions), rel=1e-6)


def test_a_mixed_set_names_both_sources(tiny_model, tiny_tokenizer):
    rows = [{"prompt": USER, "completion": SAID}, {"prompt": OTHER, "answer": "7"}]
    targets = heldout_targets(tiny_tokenizer, rows, model=tiny_model, max_new_tokens=4)
    assert targets.scored_on == "mixed" and targets.scored_rows == {"completion": 1, "aligned_greedy_completion": 1}
    assert 1 <= len(targets.items[1][0]) - targets.items[1][1] <= 4


def test_rows_that_cannot_be_scored_are_named(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"1 held-out rows have no completion \(e.g. row 2\).*aligned model"):
        heldout_targets(tiny_tokenizer, [{"prompt": USER, "completion": SAID}, {"prompt": USER, "answer": "7"}])
    with pytest.raises(ValueError, match=r"held-out row 2: expected 'prompt'.*got fields \['answer'\]"):
        heldout_targets(tiny_tokenizer, [{"prompt": USER, "completion": SAID}, {"answer": "7"}])
    long = len(encode_prompt(tiny_tokenizer, OTHER))  # a prompt that fills max_length leaves no completion token
    assert len(encode_prompt(tiny_tokenizer, USER)) < long
    targets = heldout_targets(tiny_tokenizer, [{"prompt": OTHER, "answer": "7"}, {"prompt": USER, "chosen": SAID}],
                              model=tiny_model, max_length=long)
    assert targets.dropped == {"no_completion_token_within_max_length": 1}
    assert targets.scored_rows == {"chosen": 1} and targets.scored_on == "completions"
    assert all(len(ids) <= long for ids, _ in targets.items)
    with pytest.raises(ValueError, match="none of the 1 held-out rows leaves a completion token"):
        heldout_targets(tiny_tokenizer, [{"prompt": OTHER, "answer": "7"}], model=tiny_model, max_length=long)


@pytest.mark.slow
def test_the_pipeline_reports_what_it_scored_on_verifiable_rows(tmp_path, capsys):
    """The embedded demo's held-out rows are verifiable (prompt + bare final answer): its compression is measured on
    the aligned model's greedy completions, capped by compress.heldout_max_new_tokens, and report.json/report.md
    say so with the numbers re-measured here."""
    from posttrain.agents._io import read_jsonl
    from posttrain.cli import main
    from posttrain.models.loading import load_model, load_tokenizer

    code = main(["demo", "--quiet", "--train.steps", "1", "--grpo.prompts_per_step", "2", "--grpo.num_generations",
                 "2", "--grpo.max_new_tokens", "16", "--evaluate.limit", "8", "--evaluate.max_new_tokens", "16",
                 "--compress.heldout_max_new_tokens", "20", "--runs_dir", str(tmp_path)])
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert code == 0 and report["status"] == "succeeded", report.get("error")
    c = report["compression"]
    heldout = read_jsonl(run_dir / "artifacts" / "data" / "eval.jsonl", limit=16)
    assert len(heldout) == 16 and all("answer" in r and "completion" not in r for r in heldout)
    aligned_dir = str(run_dir / "checkpoints" / "grpo" / "final")
    aligned, tokenizer = load_model(aligned_dir), load_tokenizer(aligned_dir)
    gens = generate(aligned, tokenizer, [encode_prompt(tokenizer, r["prompt"]) for r in heldout], max_new_tokens=20)
    assert c["scored_on"] == "aligned_greedy_completions"
    assert c["scored_rows"] == {"aligned_greedy_completion": 16} and c["max_new_tokens"] == 20
    assert c["positions"] == sum(len(g.completion_ids) for g in gens)
    _, base_ppl, _, _ = compare_on_texts(aligned, aligned, heldout_targets(tokenizer, heldout, model=aligned,
                                                                          max_new_tokens=20))
    assert c["base_perplexity"] == pytest.approx(base_ppl, rel=1e-6)
    md = (run_dir / "report.md").read_text()
    assert (f"Scored on: aligned_greedy_completions (16 rows: the aligned model's greedy completions of the "
            f"prompts, at most 20 new tokens; {c['positions']} completion tokens)") in md
