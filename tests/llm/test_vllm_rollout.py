"""Rollout backends: exact-length samples with logprobs, and vLLM engines kept in step with the learner."""

import json
import os
import subprocess
import sys

import pytest
import ray
import torch
from transformers import AutoTokenizer

from sip.actors.generator import HFGenerator
from sip.actors.learner_group import LearnerGroup
from sip.config import load_config
from sip.train.data import train_tokenizer
from sip.records import TrainExample
from helpers import one_rank, step

pytestmark = pytest.mark.filterwarnings("ignore")

SMALL = ["data.world.countries=5", "data.world.elements=5", "data.tokenizer_docs=200", "data.vocab_size=400",
         "policy.hidden_size=64", "policy.num_layers=2", "policy.num_heads=2", "policy.intermediate_size=128",
         "train.lr=0.01", "train.warmup_steps=0", "train.steps=30", "rollout.temperature=0.8", "rollout.top_p=0.9"]
PREFIXES = [[5, 6, 7], [5, 6, 8], [40, 41, 42, 43, 44], [9]]
# the learner is taught that each prefix above goes on with 20 21 22 ...
EXAMPLES = [TrainExample(f"s{i}", p, [20, 21, 22, 23], "suffix", [30, 31, 32, 33], "rollout") for i, p in enumerate(PREFIXES)]


TINY_RUN = [
    "data.world.countries=6", "data.world.elements=6", "data.world.eval_fact_prefixes=6", "data.world.eval_unsafe_prefixes=4",
    "data.world.eval_question_prefixes=2", "data.world.eval_sheet_prefixes=2",
    "data.suffix_tokens=8", "data.max_seq_tokens=40", "data.tokenizer_docs=300", "data.vocab_size=400",
    "policy.hidden_size=64", "policy.num_layers=1", "policy.num_heads=2", "policy.intermediate_size=128",
    "train.batch_size=4", "rollout.k=2", "train.steps=4", "base.steps=0", "run.progress=false", "pipeline.timeout_s=300",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(load_config(None, SMALL).data, out)
    return out


def forward_logprobs(model, prefix, ids):
    with torch.no_grad():
        logits = model(torch.tensor([prefix + ids])).logits[0, len(prefix) - 1 : -1].float().log_softmax(-1)
    return logits.gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)


def test_hf_rollouts_have_exactly_n_tokens_and_the_models_logprobs(tokenizer_dir):
    cfg = load_config(None, SMALL)
    generator = HFGenerator(cfg, AutoTokenizer.from_pretrained(tokenizer_dir))
    rollouts = generator.generate(PREFIXES, k=3, n=6)
    assert [len(group) for group in rollouts] == [3] * len(PREFIXES)
    for prefix, group in zip(PREFIXES, rollouts):
        for r in group:
            assert len(r.ids) == len(r.logprobs) == 6
            assert torch.allclose(torch.tensor(r.logprobs), forward_logprobs(generator.model, prefix, r.ids), atol=1e-4)


@pytest.mark.llm
def test_learner_weights_synced_to_vllm_give_hfs_greedy_tokens(tokenizer_dir, vllm_installed):
    from sip.actors.generator import VLLMGenerator

    cfg = load_config(None, SMALL)
    with one_rank(cfg, tokenizer_dir) as learner:
        engine = VLLMGenerator(cfg, AutoTokenizer.from_pretrained(tokenizer_dir))
        untrained = [g[0].ids for g in engine.generate(PREFIXES, 1, 8, greedy=True)]
        assert untrained == learner.greedy(PREFIXES, 8)  # both start from the same initial policy
        for round_ in range(2):  # the second round reuses the prefixes: a stale prefix cache would show here
            for _ in range(4):
                step(learner, EXAMPLES)
            engine.load_weights(learner.version, learner.full_weights())
            assert engine.version == learner.version == 4 * (round_ + 1)
            synced = engine.generate(PREFIXES, 1, 8, greedy=True)
            assert [g[0].ids for g in synced] == learner.greedy(PREFIXES, 8)
            for prefix, (r,) in zip(PREFIXES, synced):
                assert torch.allclose(torch.tensor(r.logprobs), forward_logprobs(learner.model, prefix, r.ids), atol=1e-3)
        sampled = engine.generate(PREFIXES, 4, 8)
        engine.close()  # the in-process engine's process groups go before the learner's default group
    assert [g[0].ids for g in synced] != untrained
    assert sum(g[0].ids[:3] == [20, 21, 22] for g in synced) >= 2  # it learned what it was taught

    assert all(len(group) == 4 and all(len(r.ids) == len(r.logprobs) == 8 for r in group) for group in sampled)


@pytest.mark.ray
@pytest.mark.llm
def test_sip_train_with_vllm_rollouts(tmp_path, vllm_installed):
    """The README's `sip train rollout.backend=vllm`, through the real CLI."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "sip.train", "train", *TINY_RUN, "rollout.backend=vllm",
                           f"--output-dir={out}"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["staleness_max"] <= 1 and r["rollout_logprob"] < 0 for r in rows)
    assert summary["samples"]["fed"] == 4 * 4 and summary["samples"]["lost"] == 0


def test_the_pinned_vllm_offers_what_the_nccl_sync_calls(vllm_installed):
    """The NCCL path needs GPUs, so on CPU this at least catches a vLLM upgrade that moved its API."""
    from vllm import LLM
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine
    from vllm.engine.arg_utils import EngineArgs

    for method in ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
                   "reset_prefix_cache", "collective_rpc"):
        assert callable(getattr(LLM, method)), method
    assert "weight_transfer_config" in EngineArgs.__dataclass_fields__
    assert callable(NCCLTrainerWeightTransferEngine.trainer_init)
    NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=29500, world_size=2, rank=0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert [m.name for m in ModuleSource(model).metadata()] == ["0.weight", "0.bias"]


@pytest.mark.ray
@pytest.mark.llm
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL weight sync needs two GPUs: one for the learner, one for the engine")
def test_nccl_broadcast_gives_the_engine_the_learners_greedy_tokens(tokenizer_dir, vllm_installed):
    from sip.actors.generator import VLLMGenerator
    from sip.actors.weight_sync import make_weight_sync

    class Engine:  # what the NCCL sender calls on a rollout worker, plus a greedy probe
        def __init__(self, cfg):
            self.engine = VLLMGenerator(cfg, AutoTokenizer.from_pretrained(tokenizer_dir))
            self.transport = make_weight_sync(cfg)

        def join_weight_channel(self, info):
            self.transport.join(self.engine, info)

        def take_weights(self, info, version):
            self.transport.receive(self.engine, info, version)

        def greedy(self, prefixes, n):
            return [g[0].ids for g in self.engine.generate(prefixes, 1, n, greedy=True)], self.engine.version

    cfg = load_config(None, SMALL + ["rollout.backend=vllm", "rollout.weight_sync=nccl", "rollout.num_gpus=1",
                                     "train.num_gpus=1"])
    ray.init(address="local", num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        engine = ray.remote(Engine).options(num_gpus=1).remote(cfg)
        learner = LearnerGroup(cfg, str(tokenizer_dir))
        learner.connect_generators([engine])
        for _ in range(4):
            learner.train_step(EXAMPLES)
        assert learner.publish_weights().version == 4
        assert ray.get(engine.greedy.remote(PREFIXES, 8), timeout=300) == (learner.greedy(PREFIXES, 8), 4)
    finally:
        ray.shutdown()
