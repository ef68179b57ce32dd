"""What several test modules share: tiny run settings, a one-rank learner in this process, and the CLI
run as a user runs it. Fixtures live in conftest.py; test modules never import each other."""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from sip.actors.learner import LearnerRank
from sip.config import load_config
from sip.records import TrainExample

REPO = Path(__file__).resolve().parents[1]

# A run small enough for a test: a world of 12 subjects, 8-token suffixes, a 1-layer policy.
TINY = [
    "data.world.countries=6", "data.world.elements=6", "data.world.eval_fact_prefixes=6",
    "data.world.eval_unsafe_prefixes=4", "data.world.eval_question_prefixes=2", "data.world.eval_sheet_prefixes=2", "data.suffix_tokens=8", "data.max_seq_tokens=40",
    "data.tokenizer_docs=300", "data.vocab_size=400", "policy.hidden_size=32", "policy.num_layers=1",
    "policy.num_heads=2", "policy.intermediate_size=64", "train.batch_size=4", "rollout.k=2",
    "run.progress=false", "pipeline.timeout_s=120", "base.steps=0",
]

# Five examples of uneven lengths, each with a rejected candidate (DPO) that NLL objectives ignore.
EXAMPLES = [TrainExample(f"s{i}", [5, 6, 7 + i, 9][: 2 + i % 3], [20, 21, 22 + i][: 2 + i % 2], "suffix", [30, 31, 32], "rollout")
            for i in range(5)]


def make_cfg(objective, *extra):
    overrides = [f"train.objective={objective}", "policy.hidden_size=32", "policy.num_layers=2", "policy.num_heads=2",
                 "policy.intermediate_size=64", "train.lr=0.01", "train.warmup_steps=0", "train.steps=30"]
    if objective == "nll":
        overrides.append("train.candidates=[suffix]")
    return load_config(None, overrides + list(extra))


def tiny_llama(tokenizer_dir, hidden: int, layers: int, seed: int):
    """A small Llama from scratch with the test tokenizer, in eval mode, and its pad id."""
    from transformers import AutoTokenizer

    from sip.actors.policy import build_policy

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = load_config(None, [f"policy.hidden_size={hidden}", f"policy.num_layers={layers}", "policy.num_heads=2",
                             f"policy.intermediate_size={2 * hidden}"])
    return build_policy(cfg.policy, tokenizer, seed=seed, max_positions=64).eval(), tokenizer.pad_token_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_rank(cfg, tokenizer_dir, resume_from=None):
    """A learner of one rank in this process (its own gloo process group)."""
    learner = LearnerRank(cfg, str(tokenizer_dir))
    try:
        learner.setup(f"tcp://127.0.0.1:{free_port()}", str(resume_from) if resume_from else None)
        yield learner
    finally:
        learner.close()


def step(learner, examples, micro_batch_size=0):
    size = micro_batch_size or len(examples) or 1
    totals = {"examples": len(examples), "chosen_tokens": sum(len(e.chosen_ids) for e in examples),
              "micro_batches": -(-len(examples) // size), "micro_batch_size": size, "filler": examples[0] if examples else None}
    return learner.train_step(examples, totals)


def sip(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sip.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - start


def assert_refused(done: subprocess.CompletedProcess, seconds: float, *needles: str, within: float = 20) -> None:
    assert done.returncode in (1, 2), done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in done.stderr, done.stderr[-2000:]
    assert seconds < within, f"took {seconds:.0f}s to refuse"
