"""Wall time of each stage of the demo pipeline on this machine (printed, not asserted).

    python bench/pipeline.py [--runs N] [--key.sub VALUE ...]

Builds the embedded model first if it is not cached (that time is printed separately: it is set-up, not the demo),
then runs the demo `N` times and prints one JSON line per run with each stage's wall time and the total, then a
summary line with the median total. The goal is a demo under 60 s after set-up on a 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from posttrain.cli import _demo_config_path
from posttrain.config import load_config, parse_overrides
from posttrain.models.embedded import embedded_model_dir
from posttrain.run import execute


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    args, extra = parser.parse_known_args()
    started = time.perf_counter()
    embedded_model_dir()
    setup_s = time.perf_counter() - started
    print(json.dumps({"event": "setup", "embedded_ready_s": round(setup_s, 2), "torch_threads": torch.get_num_threads(),
                      "machine": platform.machine(), "python": platform.python_version()}), flush=True)
    totals = []
    with tempfile.TemporaryDirectory() as runs_dir:
        overrides = {"runs_dir": runs_dir, **parse_overrides(extra)}
        config = load_config(_demo_config_path(), overrides)
        for i in range(args.runs):
            t0 = time.perf_counter()
            outcome = execute(config, view="quiet")
            total = time.perf_counter() - t0
            totals.append(total)
            stages = {s["name"]: s["wall_s"] for s in outcome.report["stages"]}
            acc = {k: (v["value"] if v else None) for k, v in outcome.report["accuracy"].items()}
            print(json.dumps({"event": "run", "index": i, "status": outcome.status, "total_s": round(total, 2),
                              "stages_s": stages, "accuracy": acc}), flush=True)
    print(json.dumps({"event": "summary", "runs": len(totals), "median_total_s": round(statistics.median(totals), 2),
                      "target_s": 60}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
