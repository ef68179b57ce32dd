"""From judged candidates to training examples: chosen = best, rejected = worst.

Only a fully judged candidate (every judgment of it gave a verdict) can be chosen; any candidate,
fully judged or not, can be rejected. A sample without a fully judged candidate is skipped as
`judge_failed`. Ties are broken at random with a generator seeded by the sample id, so a run is
repeatable and no source wins a tie by its position in the list. DPO skips a sample whose chosen
candidate scores no higher than its worst one (`tie`).
"""

from __future__ import annotations

import random
from typing import Literal

from sip.train.records import JudgedSample, TrainExample

SkipReason = Literal["no_candidate", "judge_failed", "tie"]


def _choosable(judged: JudgedSample) -> list[int]:
    complete = judged.complete if judged.complete is not None else [True] * len(judged.candidates)
    return [i for i, ok in enumerate(complete) if ok]


def skip_reason(judged: JudgedSample, objective: str) -> SkipReason | None:
    """Why `select` gives no training example for this sample, or None when it gives one."""
    if not judged.candidates:
        return "no_candidate"
    if objective == "nll":
        return None
    choosable = _choosable(judged)
    if not choosable:
        return "judge_failed"
    if objective == "dpo" and max(judged.reward[i] for i in choosable) <= min(judged.reward):
        return "tie"
    return None


def select(judged: JudgedSample, objective: str, seed: int) -> TrainExample | None:
    """The training example for one judged sample, or None (`skip_reason` says why)."""
    if skip_reason(judged, objective) is not None:
        return None
    sample, candidates, reward = judged.sample, judged.candidates, judged.reward
    if objective == "nll":
        (target,) = candidates
        return TrainExample(sample.id, sample.prefix_ids, target.ids, target.source)
    rng = random.Random(f"{seed}:{sample.id}")
    choosable = _choosable(judged)
    best = max(reward[i] for i in choosable)
    chosen = candidates[rng.choice([i for i in choosable if reward[i] == best])]
    if objective == "rf_nll":
        return TrainExample(sample.id, sample.prefix_ids, chosen.ids, chosen.source)
    worst = min(reward)
    rejected = candidates[rng.choice([i for i, r in enumerate(reward) if r == worst])]
    return TrainExample(sample.id, sample.prefix_ids, chosen.ids, chosen.source, rejected.ids, rejected.source)
