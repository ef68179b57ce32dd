"""SmolLM2-135M as the policy: a real pretrained model with its own tokenizer, sharded over two
FSDP2 learner ranks, trains on the world with the world teacher, and its checkpoint loads back."""

import json

import pytest

from sip.config import load_config
from helpers import REPO

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.llm, pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]


def test_smollm2_policy_trains_on_two_ranks_and_its_checkpoint_loads(smollm2, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sip.train.pipeline import run_training

    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "smollm2_policy.yaml", [  # the shipped recipe, shrunk
        f"policy.init={smollm2}", "train.micro_batch_size=1",
        "train.batch_size=4", "rollout.k=1", "data.suffix_tokens=8", "data.max_seq_tokens=40", "train.steps=2",
        "train.lr=1e-4", "train.warmup_steps=0", "data.world.eval_fact_prefixes=4", "data.world.eval_unsafe_prefixes=2",
        "data.world.eval_question_prefixes=1", "data.world.eval_sheet_prefixes=1",
        "run.progress=false", "pipeline.timeout_s=600", f"run.output_dir={out}",
    ])
    summary = run_training(cfg)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in rows), "finite losses, real gradients"
    assert summary["num_learners"] == 2 and cfg.base.steps == 0 and summary["samples"]["fed"] == 8 and summary["samples"]["lost"] == 0
    assert set(summary["eval"]) >= {"factuality", "safety"} and set(summary["eval_initial"]) >= {"factuality", "safety"}

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.vocab_size == AutoTokenizer.from_pretrained(smollm2).vocab_size, "the model's own tokenizer"
    trained = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    start = AutoModelForCausalLM.from_pretrained(smollm2)
    assert sum(p.numel() for p in trained.parameters()) == sum(p.numel() for p in start.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values())]
    assert any(moved), "two optimizer steps changed the weights"
