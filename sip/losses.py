"""Losses on continuation tokens only: the prefix is context, never a target."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack(prefixes: list[list[int]], targets: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded `prefix + target` rows, their attention mask, and a mask of target positions."""
    rows = [p + t for p, t in zip(prefixes, targets, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prefix, row) in enumerate(zip(prefixes, rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        target_mask[i, len(prefix) : len(row)] = True
    return input_ids, attention, target_mask


def target_logprobs(model, prefixes: list[list[int]], targets: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(target token | everything before it) per row, and the number of target tokens."""
    device = next(model.parameters()).device
    input_ids, attention, target_mask = (t.to(device) for t in pack(prefixes, targets, pad_id))
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    next_ids = input_ids[:, 1:]
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, next_ids.unsqueeze(-1)).squeeze(-1)
    mask = target_mask[:, 1:]
    return (token_logps * mask).sum(-1), mask.sum(-1)


def nll_loss(logp_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per target token over the batch."""
    return -logp_sum.sum() / n_tokens.sum().clamp(min=1)


def dpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO on summed sequence log-probs, per example: (loss, reward margin).

    margin = beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]; loss = -log sigmoid(margin).
    Per example, so a batch split over ranks and micro-batches sums to the same mean.
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin.detach()
