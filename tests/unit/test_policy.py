"""The lean decoding loop against transformers' `generate`, on a real tiny Llama."""

import pytest
import torch
from helpers import tiny_llama
from sip.actors.policy import generate, sample_rollouts
from sip.losses import target_logprobs

PREFIXES = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]


@pytest.fixture(scope="module")
def model_and_pad(tokenizer_dir):
    model, pad = tiny_llama(tokenizer_dir, hidden=48, layers=2, seed=3)
    with torch.no_grad():  # make end-of-text the model's favourite, so its suppression is tested
        model.lm_head.weight[model.generation_config.eos_token_id] = model.lm_head.weight.max(0).values * 4
    return model, pad


def hf_generate(model, prefixes, n, pad_id, **sampling):
    width = max(len(p) for p in prefixes)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prefixes])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id,
                         **sampling)
    return out[:, width:].tolist()


def test_greedy_tokens_equal_transformers_generate(model_and_pad):
    model, pad = model_and_pad
    expected = hf_generate(model, PREFIXES, 12, pad, do_sample=False)
    assert [rows[0] for rows in generate(model, PREFIXES, 12, pad, greedy=True)] == expected
    eos = model.generation_config.eos_token_id
    assert all(eos not in row for row in expected), "end-of-text is never chosen, as with min_new_tokens"
    raw_favourite = model(torch.tensor([PREFIXES[1]])).logits[0, -1].argmax().item()
    assert raw_favourite == eos, "the model would end the text if it were allowed to"


def test_sampled_tokens_follow_transformers_given_the_seed(model_and_pad):
    model, pad = model_and_pad
    torch.manual_seed(7)
    expected = hf_generate(model, PREFIXES, 10, pad, do_sample=True, num_return_sequences=3, top_k=0, top_p=0.9,
                           temperature=0.8)
    torch.manual_seed(7)
    ours = generate(model, PREFIXES, 10, pad, samples=3, temperature=0.8, top_p=0.9)
    assert [row for rows in ours for row in rows] == expected


def test_a_tiny_top_p_is_greedy_and_logprobs_are_the_models_own(model_and_pad):
    model, pad = model_and_pad
    rollouts = sample_rollouts(model, PREFIXES, 8, pad, samples=2, top_p=1e-6)
    greedy = [rows[0] for rows in generate(model, PREFIXES, 8, pad, greedy=True)]
    assert [[r.ids for r in rows] for rows in rollouts] == [[g, g] for g in greedy]
    for prefix, rows in zip(PREFIXES, rollouts):
        for r in rows:
            summed, _ = target_logprobs(model, [prefix], [r.ids], pad)
            assert sum(r.logprobs) == pytest.approx(summed.item(), abs=1e-4)
            assert len(r.ids) == len(r.logprobs) == 8
