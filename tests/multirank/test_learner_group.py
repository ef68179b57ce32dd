"""The learner group on a local Ray cluster: 2 FSDP2 ranks over gloo take the same steps as 1, and a
checkpoint written by one number of ranks resumes on another."""

import pytest
import ray
import torch

from sip.actors.learner_group import LearnerGroup
from sip.weights import from_wire
from sip.checkpoint import step_dir
from helpers import EXAMPLES, make_cfg

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]


def published(group) -> dict[str, torch.Tensor]:
    return from_wire(ray.get(group.publish_weights().refs[0]))


def run(group, steps=3):
    return [group.train_step(EXAMPLES)["loss"] for _ in range(steps)]


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, f"weights differ by up to {worst}"


@pytest.mark.parametrize("objective", ["dpo", "rf_nll", "nll"])
def test_two_ranks_take_the_same_steps_as_one(objective, tokenizer_dir):
    results = {}
    for ranks in (1, 2):
        group = LearnerGroup(make_cfg(objective, f"train.num_learners={ranks}"), tokenizer_dir)
        try:
            results[ranks] = (run(group), published(group), group.version)
        finally:
            group.shutdown()
    (one_losses, one_weights, one_version), (two_losses, two_weights, two_version) = results[1], results[2]
    assert one_version == two_version == 3
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    assert one_losses[-1] < one_losses[0]
    assert_same_weights(one_weights, two_weights)


def test_a_two_rank_checkpoint_resumes_on_one_rank_and_back(tokenizer_dir, tmp_path):
    cfg2 = make_cfg("dpo", "train.num_learners=2", "train.micro_batch_size=1")
    group = LearnerGroup(cfg2, tokenizer_dir)
    try:
        run(group, 2)
        checkpoint = group.save(step_dir(tmp_path, 2), {"sampler": {"next_document": 7}})
        expected_losses = run(group, 2)
        expected = published(group)
    finally:
        group.shutdown()
    one = LearnerGroup(make_cfg("dpo", "train.num_learners=1"), tokenizer_dir, resume_from=checkpoint)
    try:
        assert (one.version, one.extra) == (2, {"sampler": {"next_document": 7}})
        losses = [one.train_step(EXAMPLES)["loss"]]
        again = one.save(step_dir(tmp_path, 3), {})
    finally:
        one.shutdown()
    two = LearnerGroup(cfg2, tokenizer_dir, resume_from=again)
    try:
        losses.append(two.train_step(EXAMPLES)["loss"])
        got = published(two)
    finally:
        two.shutdown()
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert_same_weights(expected, got)
