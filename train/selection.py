"""From judged candidates to training examples: chosen = best, rejected = worst.

Ties are broken at random with a generator seeded by the sample id, so a run is repeatable and no
source wins a tie by its position in the list. DPO skips a sample whose best and worst tie.
"""

from __future__ import annotations

import random

from sip.train.records import JudgedSample, TrainExample


def select(judged: JudgedSample, objective: str, seed: int) -> TrainExample | None:
    """The training example for one judged sample, or None when DPO has no preference (a tie)."""
    sample, candidates, reward = judged.sample, judged.candidates, judged.reward
    if objective == "nll":
        (target,) = candidates
        return TrainExample(sample.id, sample.prefix_ids, target.ids, target.source)
    rng = random.Random(f"{seed}:{sample.id}")
    best, worst = max(reward), min(reward)
    chosen = candidates[rng.choice([i for i, r in enumerate(reward) if r == best])]
    if objective == "rf_nll":
        return TrainExample(sample.id, sample.prefix_ids, chosen.ids, chosen.source)
    if best == worst:
        return None
    rejected = candidates[rng.choice([i for i, r in enumerate(reward) if r == worst])]
    return TrainExample(sample.id, sample.prefix_ids, chosen.ids, chosen.source, rejected.ids, rejected.source)
