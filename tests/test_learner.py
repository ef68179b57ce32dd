"""The learner on a tiny real Llama: losses fall, checkpoints load with from_pretrained, resume is exact."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sip.actors.learner import Learner, warmup_cosine
from sip.train.config import load_config
from sip.train.data import train_tokenizer
from sip.train.records import TrainExample

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    cfg = load_config(None, ["data.world.countries=5", "data.world.elements=5", "data.tokenizer_docs=200", "data.vocab_size=400"])
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(cfg.data, out)
    return out


def make_cfg(objective, **extra):
    overrides = [f"train.objective={objective}", "policy.hidden_size=32", "policy.num_layers=1", "policy.num_heads=2",
                 "policy.intermediate_size=64", "train.lr=0.01", "train.warmup_steps=0", "train.steps=30"]
    if objective == "nll":
        overrides.append("train.candidates=[suffix]")
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


EXAMPLES = [TrainExample(f"s{i}", [5, 6, 7 + i], [20, 21, 22], "suffix", [30, 31, 32], "rollout") for i in range(4)]


def test_schedule_warms_up_then_decays_to_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("objective", ["nll", "rf_nll", "dpo"])
def test_steps_reduce_the_loss_and_bump_the_version(objective, tokenizer_dir):
    learner = Learner(make_cfg(objective), str(tokenizer_dir))
    first = learner.train_step(EXAMPLES)
    for _ in range(15):
        last = learner.train_step(EXAMPLES)
    assert last["policy_version"] == 16
    assert last["loss"] < first["loss"]
    if objective == "dpo":
        assert last["reward_margin"] > first["reward_margin"]
        assert last["preference_accuracy"] == 1.0


def test_reference_stays_frozen(tokenizer_dir):
    learner = Learner(make_cfg("dpo"), str(tokenizer_dir))
    before = {k: v.clone() for k, v in learner.reference.state_dict().items()}
    learner.train_step(EXAMPLES)
    assert all(torch.equal(before[k], v) for k, v in learner.reference.state_dict().items())


def test_checkpoint_is_an_hf_folder_and_resume_is_exact(tokenizer_dir, tmp_path):
    cfg = make_cfg("dpo")
    learner = Learner(cfg, str(tokenizer_dir))
    for _ in range(3):
        learner.train_step(EXAMPLES)
    path = learner.save(str(tmp_path / "ckpt"), {"sampler": {"next_document": 12}})
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), learner.model.state_dict().values()))

    resumed = Learner(cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume_from": tmp_path / "ckpt"})}), str(tokenizer_dir))
    assert resumed.resumed_state() == (3, {"sampler": {"next_document": 12}})
    a, b = learner.train_step(EXAMPLES), resumed.train_step(EXAMPLES)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(learner.model.state_dict().values(), resumed.model.state_dict().values()))


def test_greedy_returns_exactly_n_tokens(tokenizer_dir):
    learner = Learner(make_cfg("nll"), str(tokenizer_dir))
    out = learner.greedy([[5, 6, 7], [8]], 6)
    assert [len(o) for o in out] == [6, 6]
    assert out == learner.greedy([[5, 6, 7], [8]], 6)
