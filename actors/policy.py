"""Building the policy model, loading weights that came through the object store, and sampling from it."""

from __future__ import annotations

import torch

from sip.config import PolicyConfig
from sip.records import Rollout
from sip.weights import from_wire


def build_policy(cfg: PolicyConfig, tokenizer, seed: int, max_positions: int):
    """A tiny Llama from scratch, or any causal LM from an HF folder (continual pretraining)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.init != "scratch":
        return AutoModelForCausalLM.from_pretrained(cfg.init, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(128, max_positions),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def load_wire(model, weights: dict) -> None:
    model.load_state_dict(from_wire(weights))


def generate(model, prefixes: list[list[int]], n: int, pad_id: int, *, samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> list[list[list[int]]]:
    """Exactly `n` new tokens per sample (end-of-text is suppressed), `samples` per prefix.

    Returns ids[prefix][sample]. Prefixes are left-padded so every row ends where generation starts.
    """
    ids, _ = _generate(model, prefixes, n, pad_id, samples, temperature, top_p, greedy, logprobs=False)
    return ids


def greedy_batched(model, prefixes: list[list[int]], n: int, pad_id: int, batch_size: int = 32) -> list[list[int]]:
    """One greedy continuation of exactly `n` tokens per prefix, `batch_size` prefixes at a time."""
    out = []
    for i in range(0, len(prefixes), batch_size):
        out += [rows[0] for rows in generate(model, prefixes[i : i + batch_size], n, pad_id, greedy=True)]
    return out


def sample_rollouts(model, prefixes: list[list[int]], n: int, pad_id: int, *, samples: int = 1,
                    temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> list[list[Rollout]]:
    """As `generate`, with each token's log-probability under the model (before temperature and top-p)."""
    ids, logprobs = _generate(model, prefixes, n, pad_id, samples, temperature, top_p, greedy, logprobs=True)
    return [[Rollout(i, lp) for i, lp in zip(rows, lps)] for rows, lps in zip(ids, logprobs)]


@torch.no_grad()
def _generate(model, prefixes, n, pad_id, samples, temperature, top_p, greedy, logprobs):
    """A lean decoding loop: one prefill of the distinct prefixes (its KV cache then repeated for the
    samples), then exactly `n` single-token forwards. It decides each token as transformers'
    `generate` does with min_new_tokens=n (end-of-text never chosen), temperature and top-p (no top-k),
    without its per-token bookkeeping; greedy outputs are the same (tests/unit/test_policy.py)."""
    from transformers import DynamicCache

    width = max(len(p) for p in prefixes)
    input_ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, prefix in enumerate(prefixes):
        input_ids[i, width - len(prefix):] = torch.tensor(prefix)
        attention[i, width - len(prefix):] = 1
    device = model.device
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    if samples > 1:
        cache.batch_repeat_interleave(samples)
        logits, attention = logits.repeat_interleave(samples, 0), attention.repeat_interleave(samples, 0)
    position = positions[:, -1:].repeat_interleave(samples, 0)
    never = _end_of_text_ids(model)
    tokens, token_logprobs = [], []
    for step in range(n):
        raw = logits.float()
        scores = raw.clone()
        scores[:, never] = -float("inf")
        if greedy:
            token = scores.argmax(-1)
        else:
            token = torch.multinomial(_top_p(scores / temperature, top_p).softmax(-1), 1).squeeze(1)
        tokens.append(token)
        if logprobs:  # under the model itself, before end-of-text suppression, temperature and top-p
            token_logprobs.append(raw.log_softmax(-1).gather(-1, token[:, None]).squeeze(1))
        if step == n - 1:
            break
        attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=position, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    new = torch.stack(tokens, 1).tolist()
    lps = torch.stack(token_logprobs, 1).tolist() if logprobs else None
    return _per_prefix(new, samples), _per_prefix(lps, samples) if logprobs else None


def _end_of_text_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = model.config.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the fewest most likely tokens whose probability reaches `top_p` (the most likely always)."""
    if top_p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, descending=False)
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))


def _per_prefix(rows: list, samples: int) -> list[list]:
    return [rows[i * samples:(i + 1) * samples] for i in range(len(rows) // samples)]
