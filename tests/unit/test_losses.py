import math

import pytest
import torch

from sip.losses import dpo_terms, pack, target_logprobs


def test_dpo_loss_matches_hand_computation():
    # margin = 0.1 * ((-10 - -12) - (-20 - -15)) = 0.1 * (2 + 5) = 0.7
    loss, margin = dpo_terms(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-15.0]), 0.1)
    assert margin.item() == pytest.approx(0.7)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.7))))


def test_dpo_terms_are_per_example():
    loss, margin = dpo_terms(torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -1.0]), torch.zeros(2), torch.zeros(2), 1.0)
    assert margin.tolist() == pytest.approx([1.0, -4.0])
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(4.0))])


def test_pack_left_pads_so_targets_end_together_and_masks_only_target_tokens():
    ids, attention, positions, target = pack([[1, 2, 3], [4]], [[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 6], [0, 0, 0, 4, 7]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]
    assert target.tolist() == [[False, False, False, True, True], [False, False, False, False, True]]


def _tiny_gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary positions, and learned absolute ones
def test_padded_batch_scores_each_row_as_it_scores_alone(tokenizer_dir, arch):
    """Left padding, position ids and logits only where a target is predicted give every row what the
    model gives it unpadded, in value and in gradient."""
    from tests.helpers import tiny_llama

    model, pad = tiny_llama(tokenizer_dir, hidden=48, layers=2, seed=5)
    if arch == "gpt2":
        model = _tiny_gpt2(model.config.vocab_size)
    prefixes = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14], [15, 16, 17]]
    targets = [[20, 21], [22, 23, 24, 25, 26], [27, 28, 29], []]
    columns = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: columns.append(out.shape[1]))
    batched, n = target_logprobs(model, prefixes, targets, pad)
    hook.remove()
    assert columns == [6]  # the longest target's 5 tokens are predicted from 6 - 1 columns, not all 9
    assert n.tolist() == [2, 5, 3, 0]
    for i, (prefix, target) in enumerate(zip(prefixes, targets)):
        row = torch.tensor([prefix + target])
        logits = model(input_ids=row).logits[0, :-1].float()
        alone = torch.log_softmax(logits, -1)[torch.arange(len(prefix) - 1, row.shape[1] - 1), row[0, len(prefix):]].sum()
        assert batched[i].item() == pytest.approx(alone.item(), abs=1e-4)
    model.zero_grad()
    batched.sum().backward()
    padded_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(target_logprobs(model, [p], [t], pad)[0].sum() for p, t in zip(prefixes, targets)).backward()
    for padded, alone in zip(padded_grad, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(padded, alone, atol=1e-5)


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
