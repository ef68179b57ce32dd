"""Losses on continuation tokens only: the prefix is context, never a target."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F


def pack(prefixes: list[list[int]], targets: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-padded `prefix + target` rows, so every row's target ends at the last column: their attention
    mask, their position ids (counted from each row's first real token), and a mask of target positions."""
    rows = [p + t for p, t in zip(prefixes, targets, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (target, row) in enumerate(zip(targets, rows)):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention[i, width - len(row) :] = 1
        target_mask[i, width - len(target) :] = True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention, positions, target_mask


@functools.cache
def _forward_takes(model_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_type.forward).parameters)


def target_logprobs(model, prefixes: list[list[int]], targets: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(target token | everything before it) per row, and the number of target tokens.

    Logits are computed only for the columns that predict a target token (the last longest-target + 1,
    through `logits_to_keep` where the model takes it): the prefix is context, and on a real vocabulary
    the output layer and its log-softmax over every prefix position cost about a fifth of the step."""
    device = next(model.parameters()).device
    input_ids, attention, positions, target_mask = (t.to(device) for t in pack(prefixes, targets, pad_id))
    width = input_ids.shape[1]
    keep = min(max(len(t) for t in targets) + 1, width)
    takes = _forward_takes(type(model))
    kwargs = {"position_ids": positions} if "position_ids" in takes else {}
    if "logits_to_keep" in takes:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, attention_mask=attention, **kwargs).logits[:, -keep:-1].float()
    predicted = slice(width - keep + 1, None)
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, predicted].unsqueeze(-1)).squeeze(-1)
    mask = target_mask[:, predicted]
    return (token_logps * mask).sum(-1), mask.sum(-1)


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
