"""Watching a learned judge while it teaches: how often its verdicts on the current candidates agree
with a reference judge.

Every `judge.audit_every` steps the driver takes the first `judge.audit_samples` judged samples of
the step and has the reference (the world teacher, which knows the truth of the built-in world)
score the same candidates with the same protocol and weights (serve/judge.py `score_tasks`, in
process). It reports:

- `pair_agreement`: over candidate pairs the reference tells apart (by more than `MARGIN`), the
  share the judge orders the same way;
- `best_agreement`: the share of samples whose judge-best candidate is also reference-best;
- `judge_rollout_reward` / `reference_rollout_reward`: the mean reward of the rollouts under each.

A policy that learns to fool its judge shows as falling agreement while the judge's rollout reward
rises and the reference's does not.
"""

from __future__ import annotations

import asyncio
from itertools import combinations
from statistics import mean

from sip.config import SipConfig
from sip.records import JudgedBatch

MARGIN = 0.05  # reward gap under which the reference counts two candidates as a tie


class JudgeAudit:
    def __init__(self, cfg: SipConfig):
        from sip.serve.world_teacher import WorldTeacher

        self.every, self.samples, self.judge_cfg = cfg.judge.audit_every, cfg.judge.audit_samples, cfg.judge
        self.reference = WorldTeacher.from_config(cfg.data)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def measure(self, judged: JudgedBatch) -> dict[str, float]:
        from sip.records import Passage
        from sip.records import JudgeTask
        from sip.serve.judge import score_tasks

        chosen = judged.judged[: self.samples]
        tasks = [JudgeTask(Passage(js.sample.prefix, js.sample.suffix, js.sample.truth), [c.text for c in js.candidates])
                 for js in chosen]
        reference = asyncio.run(score_tasks(self.reference, tasks, self.judge_cfg))
        pairs, best, judge_rollouts, reference_rollouts = [], [], [], []
        for js, ref in zip(chosen, reference):
            for a, b in combinations(range(len(js.candidates)), 2):
                if abs(ref.reward[a] - ref.reward[b]) > MARGIN:
                    pairs.append((js.reward[a] - js.reward[b]) * (ref.reward[a] - ref.reward[b]) > 0)
            judge_best = max(range(len(js.reward)), key=js.reward.__getitem__)
            best.append(ref.reward[judge_best] >= max(ref.reward) - MARGIN)
            for c, candidate in enumerate(js.candidates):
                if candidate.source == "rollout":
                    judge_rollouts.append(js.reward[c])
                    reference_rollouts.append(ref.reward[c])
        report = {"samples": len(chosen), "pair_agreement": mean(pairs) if pairs else None,
                  "best_agreement": mean(best) if best else None}
        if judge_rollouts:
            report.update(judge_rollout_reward=mean(judge_rollouts), reference_rollout_reward=mean(reference_rollouts))
        return report
