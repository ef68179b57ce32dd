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


@torch.no_grad()
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


@torch.no_grad()
def sample_rollouts(model, prefixes: list[list[int]], n: int, pad_id: int, *, samples: int = 1,
                    temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> list[list[Rollout]]:
    """As `generate`, with each token's log-probability under the model (before temperature and top-p)."""
    ids, logprobs = _generate(model, prefixes, n, pad_id, samples, temperature, top_p, greedy, logprobs=True)
    return [[Rollout(i, lp) for i, lp in zip(rows, lps)] for rows, lps in zip(ids, logprobs)]


def _generate(model, prefixes, n, pad_id, samples, temperature, top_p, greedy, logprobs):
    width = max(len(p) for p in prefixes)
    input_ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, prefix in enumerate(prefixes):
        input_ids[i, width - len(prefix):] = torch.tensor(prefix)
        attention[i, width - len(prefix):] = 1
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention.to(model.device),
        max_new_tokens=n,
        min_new_tokens=n,
        num_return_sequences=samples,
        do_sample=not greedy,
        pad_token_id=pad_id,
        output_logits=logprobs,
        return_dict_in_generate=True,
        **sampling,
    )
    new = out.sequences[:, width:]
    token_logprobs = None
    if logprobs:  # out.logits: the raw logits of each step, before any logits processor
        steps = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        token_logprobs = steps.gather(-1, new.unsqueeze(-1)).squeeze(-1).tolist()
    return _per_prefix(new.tolist(), samples), _per_prefix(token_logprobs, samples) if logprobs else None


def _per_prefix(rows: list, samples: int) -> list[list]:
    return [rows[i * samples:(i + 1) * samples] for i in range(len(rows) // samples)]
