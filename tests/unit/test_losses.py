import math

import pytest
import torch

from sip.losses import dpo_terms, nll_loss, pack, target_logprobs


def test_dpo_loss_matches_hand_computation():
    # margin = 0.1 * ((-10 - -12) - (-20 - -15)) = 0.1 * (2 + 5) = 0.7
    loss, margin = dpo_terms(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-15.0]), 0.1)
    assert margin.item() == pytest.approx(0.7)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.7))))


def test_dpo_terms_are_per_example():
    loss, margin = dpo_terms(torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -1.0]), torch.zeros(2), torch.zeros(2), 1.0)
    assert margin.tolist() == pytest.approx([1.0, -4.0])
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(4.0))])


def test_nll_is_mean_per_token():
    assert nll_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])).item() == pytest.approx(2.0)


def test_pack_masks_only_target_tokens():
    ids, attention, target = pack([[1, 2, 3], [4]], [[5, 6], [7, 8]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert target.tolist() == [[False, False, False, True, True], [False, True, True, False, False]]


class _Bigram(torch.nn.Module):
    """A real (tiny) causal LM: next-token logits depend on the current token only."""

    def __init__(self, vocab=10):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_target_logprobs_sum_only_continuation_tokens():
    model = _Bigram()
    logp, n = target_logprobs(model, [[1, 2, 3]], [[4, 5]], pad_id=0)
    table = torch.log_softmax(model.table, -1)
    expected = table[3, 4] + table[4, 5]  # p(4|3) + p(5|4); nothing for the prefix
    assert n.tolist() == [2]
    assert logp.item() == pytest.approx(expected.item(), rel=1e-5)
