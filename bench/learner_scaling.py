"""Learner throughput and memory per rank: 1 against 2 FSDP2 ranks, with and without micro-batches.

    python bench/learner_scaling.py [--model tiny|smollm2|PATH] [--steps 4] [--batch 16] [key=value ...]

Each setting starts a fresh learner group on a local Ray cluster and trains DPO steps on world
samples (chosen: the original suffix, rejected: another sample's suffix). Printed per setting:
learner tokens/s (prefix and continuation tokens of every example, over the timed steps), the
training state each rank holds (parameters, gradients, AdamW moments and the DPO reference: its
local FSDP2 shards, in MB), and each rank's resident memory now and at its peak (MB; the peak
includes loading the model before it is sharded).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

SETTINGS = ((1, 0), (1, 4), (2, 0), (2, 4))  # (ranks, micro_batch_size; 0 = the whole share in one pass)


def rank_memory(learner) -> dict:
    """In a rank's process: MB of the state it holds, and its resident memory now and at peak."""
    import resource

    import psutil
    import torch

    def local_bytes(tensors) -> int:
        total = 0
        for t in tensors:
            t = getattr(t, "_local_tensor", t)  # a DTensor's own shard
            total += t.numel() * t.element_size()
        return total

    params = list(learner.model.parameters())
    optim = [v for s in learner.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    reference = list(learner.reference.parameters()) if learner.reference is not None else []
    state = local_bytes(params) + local_bytes(p.grad for p in params if p.grad is not None) + local_bytes(optim) + local_bytes(reference)
    return {"state_mb": state / 2**20, "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


def examples_from_world(cfg, tokenizer, n: int):
    from sip.train.data import Sampler
    from sip.records import TrainExample

    samples = Sampler(cfg.data, tokenizer).take(n)
    others = samples[1:] + samples[:1]
    return [TrainExample(s.id, s.prefix_ids, s.suffix_ids, "suffix", o.suffix_ids, "rollout") for s, o in zip(samples, others)]


def measure(cfg, tokenizer_dir: str, examples, steps: int) -> dict:
    import ray

    from sip.actors.learner_group import LearnerGroup

    group = LearnerGroup(cfg, tokenizer_dir)
    try:
        group.train_step(examples)  # warm-up: first allocations, thread pools
        start = time.perf_counter()
        for _ in range(steps):
            group.train_step(examples)
        seconds = time.perf_counter() - start
        memory = ray.get([r.__ray_call__.remote(rank_memory) for r in group.ranks])
    finally:
        group.shutdown()
    tokens = sum(len(e.prefix_ids) * 2 + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    return {"tokens_per_s": tokens * steps / seconds, "step_s": seconds / steps, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (the default policy), smollm2, or an HF folder")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    parser.add_argument("--batch", type=int, default=16, help="examples per step")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from sip.config import load_config
    from sip.train.data import load_or_train_tokenizer

    model = args.model
    if model == "smollm2":
        from sip.serve.smollm2 import convert

        model = str(convert())
    init = [] if model == "tiny" else [f"policy.init={model}", "base.steps=0"]
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(None, [*init, "train.objective=dpo", f"train.batch_size={args.batch}", *args.overrides])
        tokenizer = load_or_train_tokenizer(base.data, base.policy, tmp)
        examples = examples_from_world(base, tokenizer, args.batch)
        print(f"model {args.model}, {args.batch} DPO examples per step, {args.steps} timed steps, "
              f"{base.data.max_seq_tokens} tokens per sequence at most, train.dtype={base.train.dtype}")
        print(f"{'ranks':>5} {'micro':>5} {'tokens/s':>9} {'step s':>7} {'state MB/rank':>14} {'RSS MB/rank':>12} {'peak RSS MB/rank':>17}")
        for ranks, micro in SETTINGS:
            cfg = load_config(None, [*init, "train.objective=dpo", f"train.batch_size={args.batch}",
                                     f"train.num_learners={ranks}", f"train.micro_batch_size={micro}", *args.overrides])
            got = measure(cfg, tmp, examples, args.steps)
            mem = got["memory"]
            per_rank = lambda key: "/".join(f"{m[key]:.0f}" for m in mem)  # noqa: E731
            print(f"{ranks:>5} {micro or 'all':>5} {got['tokens_per_s']:>9.0f} {got['step_s']:>7.2f} "
                  f"{per_rank('state_mb'):>14} {per_rank('rss_mb'):>12} {per_rank('peak_rss_mb'):>17}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
