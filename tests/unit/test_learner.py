"""The learner on a tiny real Llama: FSDP2 ranks, micro-batches, checkpoints, and 1 rank against 2."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sip.actors.learner import warmup_cosine
from sip.actors.learner_group import shard_by_length
from sip.weights import from_wire
from sip.checkpoint import CheckpointError, step_dir
from helpers import EXAMPLES, make_cfg, one_rank, step
from sip.records import TrainExample

pytestmark = pytest.mark.filterwarnings("ignore")


def weights(learner):
    return from_wire(learner.full_weights())


def test_schedule_warms_up_then_decays_to_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("objective", ["nll", "rf_nll", "dpo"])
def test_steps_reduce_the_loss_and_bump_the_version(objective, tokenizer_dir):
    with one_rank(make_cfg(objective), tokenizer_dir) as learner:
        first = step(learner, EXAMPLES)
        for _ in range(15):
            last = step(learner, EXAMPLES)
        assert last["policy_version"] == 16
        assert last["loss"] < first["loss"]
        if objective == "dpo":
            assert last["reward_margin"] > first["reward_margin"]
            assert last["preference_accuracy"] == 1.0
        assert step(learner, [])["policy_version"] == 17  # an empty batch (all ties) still advances the version


@pytest.mark.parametrize("objective", ["rf_nll", "dpo"])
def test_micro_batches_take_the_same_step_as_the_whole_batch(objective, tokenizer_dir):
    cfg = make_cfg(objective)
    with one_rank(cfg, tokenizer_dir) as whole:
        losses = [step(whole, EXAMPLES)["loss"] for _ in range(3)]
        expected = weights(whole)
    with one_rank(cfg, tokenizer_dir) as micro:
        micro_losses = [step(micro, EXAMPLES, micro_batch_size=2)["loss"] for _ in range(3)]
        got = weights(micro)
    assert micro_losses == pytest.approx(losses, rel=1e-5)
    assert all(torch.allclose(expected[k], got[k], atol=1e-5) for k in expected)


def test_shards_go_in_order_of_length_and_keep_every_example():
    lengths = [9, 3, 7, 1, 8, 2, 6]
    examples = [TrainExample(f"s{i}", [0] * n, [1, 2], "suffix", [1] * (n % 3), "rollout") for i, n in enumerate(lengths)]
    shares = shard_by_length(examples, 2)
    padded = [[len(e.prefix_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in share] for share in shares]
    assert all(p == sorted(p) for p in padded)
    assert sorted(e.sample_id for share in shares for e in share) == sorted(e.sample_id for e in examples)
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    assert padded[0][:2] == [3, 5] and padded[1][:2] == [4, 8]  # a micro-batch of the shortest pads to 5, not 11


def test_reference_stays_frozen(tokenizer_dir):
    with one_rank(make_cfg("dpo"), tokenizer_dir) as learner:
        before = from_wire({"dtype": "float32", "tensors": {k: v.numpy() for k, v in learner._full_state(learner.reference).items()}})
        step(learner, EXAMPLES)
        after = learner._full_state(learner.reference)
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_bfloat16_compute_keeps_float32_master_weights(tokenizer_dir):
    with one_rank(make_cfg("dpo", "train.dtype=bfloat16"), tokenizer_dir) as learner:
        first = step(learner, EXAMPLES)
        for _ in range(5):
            last = step(learner, EXAMPLES)
        assert last["loss"] < first["loss"]
        assert all(t.dtype == torch.float32 for t in weights(learner).values())
        assert all(a.dtype == __import__("numpy").int16 for a in learner.full_weights("bfloat16")["tensors"].values())


def test_checkpoint_is_an_hf_folder_and_resume_is_exact(tokenizer_dir, tmp_path):
    cfg = make_cfg("dpo")
    final = step_dir(tmp_path, 3)
    with one_rank(cfg, tokenizer_dir) as learner:
        for _ in range(3):
            step(learner, EXAMPLES)
        assert learner.save(str(tmp_path / "partial"), str(final), {"sampler": {"next_document": 12}}) == str(final)
        loaded = AutoModelForCausalLM.from_pretrained(final)
        trained = weights(learner)
        assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)
        a = step(learner, EXAMPLES)
        after_a = weights(learner)
    with one_rank(cfg, tokenizer_dir, resume_from=final) as resumed:
        assert (resumed.version, resumed.extra) == (3, {"sampler": {"next_document": 12}})
        b = step(resumed, EXAMPLES)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == b["lr"]
        after_b = weights(resumed)
    assert all(torch.allclose(after_a[k], after_b[k], atol=1e-7) for k in after_a)


def test_a_crafted_pickle_in_the_sharded_state_is_refused_unrun(tokenizer_dir, tmp_path):
    import pickle

    cfg = make_cfg("nll")
    final = step_dir(tmp_path, 1)
    with one_rank(cfg, tokenizer_dir) as learner:
        step(learner, EXAMPLES)
        learner.save(str(tmp_path / "partial"), str(final), {})
    witness = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {witness}",))

    (final / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        with one_rank(cfg, tokenizer_dir, resume_from=final):
            pass
    assert not witness.exists()


def test_greedy_returns_exactly_n_tokens(tokenizer_dir):
    with one_rank(make_cfg("nll"), tokenizer_dir) as learner:
        out = learner.greedy([[5, 6, 7], [8]], 6)
        assert [len(o) for o in out] == [6, 6]
        assert out == learner.greedy([[5, 6, 7], [8]], 6)
