"""What GRPO changes in the embedded model: its answer form, its arithmetic, or both (printed, not asserted).

    python bench/grpo_embedded.py [--seeds 0 1 2] [--key.sub VALUE ...]   # keys of the demo config: --train.lr 3e-4

Trains the embedded model with the demo's GRPO settings (``src/posttrain/configs/demo.yaml``, overridable like
``posttrain demo``) on the demo's training prompts once per seed, and greedy-decodes the demo's 200 held-out problems
before and after.
For each model it prints:

- ``exact_match``: the demo's metric, the ``#### N`` answer equals the gold answer;
- ``answered``: outputs with a ``#### N`` line the verifier can read, right or wrong;
- ``last_number_match``: the last number the output writes equals the gold answer, whatever its form (lm-eval's
  "flexible extract" for GSM8K), i.e. the arithmetic alone;

and, per seed, the exact paired test (``evaluate.stats.paired_sign_test``) of exact match after vs before.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from posttrain.align.grpo import GRPOSettings, train_grpo
from posttrain.cli import _demo_config_path
from posttrain.config import load_config, parse_overrides
from posttrain.evaluate.exact_match import evaluate_exact_match
from posttrain.evaluate.filters import gsm8k_flexible, gsm8k_match
from posttrain.evaluate.stats import paired_sign_test
from posttrain.models.loading import load_model, load_tokenizer
from posttrain.rewards.verifiable import hash_answer_reward
from posttrain.tasks import arithmetic

def measure(model, tokenizer, rows, config) -> tuple[dict, list[bool]]:
    result = evaluate_exact_match(model, tokenizer, rows, batch_size=config.evaluate.batch_size,
                                  max_new_tokens=config.evaluate.max_new_tokens)
    flexible = sum(gsm8k_match(gsm8k_flexible(r["output"]), r["target"]) for r in result.records)
    numbers = {"exact_match": result.value, "answered": result.answered, "last_number_match": flexible / result.n,
               "n": result.n}
    return numbers, [bool(r["correct"]) for r in result.records]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args, extra = parser.parse_known_args()
    config = load_config(_demo_config_path(), parse_overrides(extra))
    tokenizer, base = load_tokenizer(config.model), load_model(config.model)
    train_items, test_items = arithmetic.make_splits(seed=0)  # the data agent's split of the embedded task
    rows, held_out = arithmetic.verifiable_rows(train_items), arithmetic.verifiable_rows(test_items)
    if config.evaluate.limit:
        held_out = held_out[:config.evaluate.limit]
    before, base_correct = measure(base, tokenizer, held_out, config)
    print(json.dumps({"model": "base", **before, "torch_threads": torch.get_num_threads()}), flush=True)
    settings = GRPOSettings(**config.grpo.model_dump(exclude={"reward"}))
    for seed in args.seeds:
        model = copy.deepcopy(base)
        started = time.perf_counter()
        train_grpo(model, tokenizer, rows, config.train.model_copy(update={"seed": seed}), settings,
                   hash_answer_reward)
        train_s = time.perf_counter() - started
        after, correct = measure(model, tokenizer, held_out, config)
        gained, lost, p = paired_sign_test(base_correct, correct)
        print(json.dumps({"model": "grpo", "seed": seed, **after, "gained": gained, "lost": lost, "paired_p": p,
                          "train_s": round(train_s, 1), "lr": config.train.lr, "rounds": config.train.steps,
                          "prompts_x_samples": f"{settings.prompts_per_step}x{settings.num_generations}"}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
