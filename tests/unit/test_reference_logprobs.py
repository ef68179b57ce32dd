"""train.reference_logprobs=rollout_worker: the worker's reference log-probabilities give the learner's DPO
step the loss it would compute itself, on a real tiny Llama."""

import copy
import dataclasses

import pytest
import torch
from helpers import tiny_llama
from sip.actors.generator import attach_reference_logprobs
from sip.objectives import OBJECTIVES
from sip.records import Candidate, JudgedSample, Sample

DPO = OBJECTIVES["dpo"]


@pytest.fixture(scope="module")
def models(tokenizer_dir):
    reference, pad = tiny_llama(tokenizer_dir, hidden=32, layers=1, seed=1)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference, pad


def batch():
    out = []
    for s in range(6):
        sample = Sample(f"world:0:{s}", [5 + s, 6, 7, 8][: 2 + s % 3], [9, 10], "p", "s")
        cands = [Candidate("rollout", [20 + s + i, 30 + i, 40][: 2 + (s + i) % 2], f"t{i}", 0) for i in range(4)]
        rewards = [0.5, 0.5, 0.5, 0.5] if s == 5 else [(s * 7 + i * 3) % 5 / 4 for i in range(4)]
        out.append(JudgedSample(sample, cands, rewards))
    return out


def test_the_workers_reference_logprobs_give_the_learners_loss(models):
    policy, reference, pad = models
    judged = batch()
    plain = [DPO.select(j, seed=3) for j in judged if DPO.skip_reason(j) is None]
    attach_reference_logprobs(reference, judged, DPO, 3, pad)
    given = [DPO.select(j, seed=3) for j in judged if DPO.skip_reason(j) is None]
    assert len(given) == 5, "the tie is skipped, and gets no reference log-probabilities"
    assert all(e.chosen_reference_logprob is not None and e.rejected_reference_logprob is not None for e in given)
    assert [(e.chosen_ids, e.rejected_ids) for e in given] == [(e.chosen_ids, e.rejected_ids) for e in plain]
    picked = {i for j in judged if DPO.skip_reason(j) is None for i in DPO.pair(j, 3)}
    assert all(c.reference_logprob is None for j in judged for i, c in enumerate(j.candidates)
               if DPO.skip_reason(j) is not None or i not in DPO.pair(j, 3)) and picked, "only what is trained on"
    totals = {"examples": len(given), "chosen_tokens": sum(len(e.chosen_ids) for e in given)}
    learner_loss, learner_sums = DPO.micro_batch(policy, reference, plain, totals, 0.1, 1.0, pad)
    worker_loss, worker_sums = DPO.micro_batch(policy, None, given, totals, 0.1, 1.0, pad)  # no reference needed
    assert worker_loss.item() == pytest.approx(learner_loss.item(), rel=1e-5)
    assert worker_sums == pytest.approx(learner_sums, rel=1e-5)
    worker_loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_a_wrong_reference_logprob_changes_the_loss(models):
    policy, reference, pad = models
    judged = batch()
    attach_reference_logprobs(reference, judged, DPO, 3, pad)
    given = [DPO.select(j, seed=3) for j in judged if DPO.skip_reason(j) is None]
    totals = {"examples": len(given), "chosen_tokens": sum(len(e.chosen_ids) for e in given)}
    shifted = [dataclasses.replace(given[0], chosen_reference_logprob=given[0].chosen_reference_logprob - 5), *given[1:]]
    right, _ = DPO.micro_batch(policy, None, given, totals, 0.1, 1.0, pad)
    wrong, _ = DPO.micro_batch(policy, None, shifted, totals, 0.1, 1.0, pad)
    assert abs(right.item() - wrong.item()) > 1e-3
