"""How long the base stage takes: `pretrain_base` on a local Ray cluster, into a temporary folder.

    python bench/base_stage.py --steps 60                          # the default config's base, 60 steps
    python bench/base_stage.py --steps 60 base.micro_batch_size=0  # the whole batch in one forward

Prints the seconds of the whole build (tokenizer, learner set-up, steps, saving), the seconds of the
steps alone, and the final loss. The cache is not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. base.micro_batch_size=0")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from sip.actors.learner_group import LearnerGroup
    from sip.config import load_config
    from sip.train.base import pretrain_base

    cfg = load_config(None, [f"base.steps={args.steps}", *args.overrides])
    stepping = []
    train_step = LearnerGroup.train_step

    def timed_step(self, examples):
        start = time.perf_counter()
        try:
            return train_step(self, examples)
        finally:
            stepping.append(time.perf_counter() - start)

    LearnerGroup.train_step = timed_step
    ray.init(address="local", num_cpus=max(2, int(cfg.base.num_cpus)), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            info = pretrain_base(cfg, Path(tmp) / "base")
    finally:
        ray.shutdown()
    print(json.dumps({"steps": info["steps"], "build_s": info["seconds"], "steps_s": round(sum(stepping), 1),
                      "s_per_step": round(sum(stepping) / max(1, len(stepping)), 3), "final_loss": info["final_loss"],
                      "micro_batch_size": cfg.base.micro_batch_size}))


if __name__ == "__main__":
    main()
