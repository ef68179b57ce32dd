"""Fault injection: one `sip train` run that loses a rollout worker, a judge replica and a learner rank.

    python bench/chaos.py [--steps 60] [--every 12] [key=value overrides...]

The run trains in this process on a local Ray cluster. Every `--every` steps the next fault is
injected: SIGKILL of a rollout worker's process, of a judge replica's, then of a learner rank's
(found by their process titles among this process's descendants). Printed: faults injected and
survived, restarts and retried requests per role, samples fed / trained / skipped / re-fed / lost,
and steps written twice to metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

FAULTS = (("rollout worker", "RolloutWorker"), ("judge replica", "ServeReplica:sip-judge"), ("learner rank", "LearnerRank"))


def kill_one(title: str) -> int | None:
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith(f"ray::{title}"):
                os.kill(proc.pid, signal.SIGKILL)
                return proc.pid
        except psutil.NoSuchProcess:
            continue
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=12, help="steps between faults")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from sip.config import load_config
    from sip.train.pipeline import run_training

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = load_config(None, [f"train.steps={args.steps}", "run.eval_at_end=false", "run.progress=false",
                                 f"run.checkpoint_every={max(1, args.every // 2)}", *args.overrides, f"run.output_dir={out}"])
        result: dict = {}

        def train():
            try:
                result["summary"] = run_training(cfg)
            except BaseException as err:  # noqa: BLE001 — printed below
                result["error"] = err

        thread = threading.Thread(target=train)
        start = time.perf_counter()
        thread.start()
        injected = []
        metrics = out / "metrics.jsonl"
        for n, (role, title) in enumerate(FAULTS, start=1):
            while thread.is_alive() and (not metrics.exists() or len(metrics.read_text().splitlines()) < n * args.every):
                time.sleep(0.2)
            if not thread.is_alive():
                break
            pid = kill_one(title)
            injected.append((role, pid, len(metrics.read_text().splitlines())))
            print(f"step {injected[-1][2]}: killed the {role} (pid {pid})", flush=True)
        thread.join()
        seconds = time.perf_counter() - start
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
    ray.shutdown()

    summary = result.get("summary")
    print(f"\nfaults injected: {sum(pid is not None for _, pid, _ in injected)} ({', '.join(r for r, _, _ in injected)})")
    if summary is None:
        print(f"the run did NOT survive: {result.get('error')!r}")
        raise SystemExit(1)
    duplicated = sum(c - 1 for c in Counter(steps).values() if c > 1)
    counts = summary["samples"]
    print(f"faults survived: all; the run finished {summary['steps']} of {args.steps} steps in {seconds:.0f} s")
    print(f"restarts: {summary['restarts']}; retried requests: {summary['request_retries']}")
    print(f"samples: fed {counts['fed']}, trained {counts['trained']}, skipped {counts['skipped']}, "
          f"re-fed {counts['refed']}, in flight {counts['in_flight']}, lost {counts['lost']}")
    print(f"steps in metrics.jsonl: {len(steps)}, written twice: {duplicated}, missing: {len(set(range(1, args.steps + 1)) - set(steps))}")


if __name__ == "__main__":
    main()
