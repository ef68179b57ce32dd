"""Samples/s of the async pipeline versus sync mode on the same work (same config, seed, steps).

    python bench/throughput.py [--steps 40] [key=value overrides...]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from sip.config import load_config
from sip.train.pipeline import run_training


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    for mode in ("async", "sync"):
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(None, [*args.overrides, f"train.steps={args.steps}", f"pipeline.mode={mode}",
                                     "run.eval_at_end=false", "run.progress=false", f"run.output_dir={out}"])
            summary = run_training(cfg)
        results[mode] = {"samples_per_s": summary["samples_per_s"], "train_seconds": summary["train_seconds"],
                         "staleness_mean": summary["final"].get("staleness_mean")}
        print(mode, json.dumps(results[mode]), flush=True)
    print(f"speedup async/sync: {results['async']['samples_per_s'] / results['sync']['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
