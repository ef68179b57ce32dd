"""Which stage sets the pace of a run: the mean seconds per step of each stage, from its metrics.jsonl.

    python bench/stage_times.py runs/latest [--skip 3]

Driver stages: `learner_step` (the FSDP2 step on every rank), `publish` (gathering and publishing
the new weights), `wait` (the driver waiting for the next judged batch). Worker stages, per batch:
`worker_weights` (loading a new version), `worker_rewrite`, `worker_generate`, `worker_judge`,
`worker_episode` (all of it). Also the learner's idle share and the wall time per step. The first
`--skip` steps are left out (they include start-up).

`--scale` adds what the same stages would give with more rollout workers and judge / rewriter
replicas on a machine with a core for each (a model, not a measurement): a step costs its slowest
stage, a worker's episode is shared by the workers the staleness bound lets work at once
(`pipeline.max_staleness` + 1 batches in flight), and the judge's and rewriter's time by their
replicas. The learner's step stays as measured; it scales with `train.num_learners` instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run's output folder, or its metrics.jsonl")
    parser.add_argument("--skip", type=int, default=3, help="first steps to leave out")
    parser.add_argument("--scale", action="store_true", help="also model more rollout workers and replicas")
    args = parser.parse_args()
    path = args.run / "metrics.jsonl" if args.run.is_dir() else args.run
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][args.skip:]
    if not rows:
        raise SystemExit(f"{path}: no steps after the first {args.skip}")
    stages = sorted({k for r in rows for k in r.get("time_s", {})}, key=lambda k: (k.startswith("worker_"), k))
    walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    print(f"{path}: steps {rows[0]['step']}–{rows[-1]['step']}")
    print(f"{'stage':<18} {'s per step':>10}")
    for stage in stages:
        print(f"{stage:<18} {mean(r['time_s'].get(stage, 0.0) for r in rows):>10.3f}")
    if walls:
        print(f"{'wall per step':<18} {mean(walls):>10.3f}")
    print(f"{'learner idle':<18} {mean(r['learner_idle'] for r in rows):>10.0%}")
    print(f"{'samples/s':<18} {mean(r['samples_per_s'] for r in rows):>10.2f}")
    if args.scale:
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
        scale(rows, config["train"]["batch_size"], config["pipeline"]["max_staleness"])


def scale(rows: list[dict], batch_size: int, max_staleness: int) -> None:
    def stage(name: str) -> float:
        return mean(r["time_s"].get(name, 0.0) for r in rows)

    learner = stage("learner_step") + stage("publish")
    episode, judge, rewrite = stage("worker_episode"), stage("worker_judge"), stage("worker_rewrite")
    print(f"\nmodelled steady state, one core per actor (max_staleness={max_staleness}: "
          f"{max_staleness + 1} batches in flight at most)")
    print(f"{'workers':>8} {'replicas':>9} {'s per step':>11} {'prefixes/s':>11}  slowest")
    for workers in (1, 2, 4, 8):
        for replicas in (1, 2):
            parallel = min(workers, max_staleness + 1)
            times = {"learner": learner, "rollout workers": episode / parallel,
                     "judge": judge / replicas, "rewriter": rewrite / replicas}
            slowest = max(times, key=times.get)
            print(f"{workers:>8} {replicas:>9} {times[slowest]:>11.3f} {batch_size / times[slowest]:>11.1f}  {slowest}")


if __name__ == "__main__":
    main()
