"""What the policy is trained toward: one object per `train.objective`.

An objective says what it needs (a judge, a frozen reference policy, a rejected candidate), how it
turns one judged sample into a training example, and what loss and metrics a micro-batch of examples
gives. The config, the driver's selection and the learner ask it; nothing else branches on its name.
Adding one is a new class here, its entry in OBJECTIVES, and its tests.

Selection rules shared by the judged objectives: only a fully judged candidate (every judgment of
it gave a verdict) can be chosen; any candidate, fully judged or not, can be rejected. A sample
without a fully judged candidate is skipped as `judge_failed`. Ties are broken at random with a
generator seeded by the sample id, so a run is repeatable and no source wins a tie by its position.

Losses are on continuation tokens only (sip/losses.py), as sums over the micro-batch divided by the
global batch's totals, so micro-batches and ranks add up to the loss of the whole batch.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, ClassVar, Literal

from sip.records import JudgedSample, TrainExample

if TYPE_CHECKING:
    import torch

SkipReason = Literal["no_candidate", "judge_failed", "tie"]
# What a micro-batch adds up, in this order, summed over micro-batches and ranks before `metrics`.
SUMS = ("nll_sum", "chosen_tokens", "dpo_sum", "margin_sum", "preferred")


def _choosable(judged: JudgedSample) -> list[int]:
    complete = judged.complete if judged.complete is not None else [True] * len(judged.candidates)
    return [i for i, ok in enumerate(complete) if ok]


class Objective:
    name: ClassVar[str]
    needs_judge: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False  # a frozen copy of the starting policy, kept in checkpoints
    needs_rejected: ClassVar[bool] = False  # trains against the judge's worst candidate too, not only its best

    def config_problem(self, candidates: list[str], rollout_k: int) -> str | None:
        """Why this objective cannot train on these candidate sources, or None."""
        return None

    def skip_reason(self, judged: JudgedSample) -> SkipReason | None:
        """Why `select` gives no training example for this sample, or None when it gives one."""
        if not judged.candidates:
            return "no_candidate"
        if not _choosable(judged):
            return "judge_failed"
        return None

    def select(self, judged: JudgedSample, seed: int) -> TrainExample | None:
        """The training example for one judged sample, or None (`skip_reason` says why)."""
        if self.skip_reason(judged) is not None:
            return None
        chosen_at, rejected_at = self.pair(judged, seed)
        chosen = judged.candidates[chosen_at]
        rejected = judged.candidates[rejected_at] if rejected_at is not None else None
        return TrainExample(judged.sample.id, judged.sample.prefix_ids, chosen.ids, chosen.source,
                            rejected.ids if rejected else None, rejected.source if rejected else None,
                            chosen.reference_logprob, rejected.reference_logprob if rejected else None)

    def pair(self, judged: JudgedSample, seed: int) -> tuple[int, int | None]:
        """The chosen candidate's index and the rejected one's (None when the objective has none), for a
        sample `skip_reason` lets through; the same on the driver and on a rollout worker."""
        return self._pick(judged, random.Random(f"{seed}:{judged.sample.id}"), best=True), None

    @staticmethod
    def _pick(judged: JudgedSample, rng: random.Random, best: bool) -> int:
        """A random one of the best fully judged candidates, or of the worst of all candidates."""
        pool = _choosable(judged) if best else range(len(judged.candidates))
        target = (max if best else min)(judged.reward[i] for i in pool)
        return rng.choice([i for i in pool if judged.reward[i] == target])

    def micro_batch(self, model, reference, chunk: list[TrainExample], totals: dict, beta: float, nll_coef: float,
                    pad_id: int) -> tuple[torch.Tensor, list[float]]:
        """The loss of one micro-batch (to call backward on) and its SUMS."""
        from sip.losses import target_logprobs

        logp, n_tokens = target_logprobs(model, [e.prefix_ids for e in chunk], [e.chosen_ids for e in chunk], pad_id)
        nll_sum = -logp.sum()
        return nll_sum / totals["chosen_tokens"], [nll_sum.item(), n_tokens.sum().item(), 0.0, 0.0, 0.0]

    def metrics(self, sums: list[float], totals: dict, nll_coef: float) -> dict[str, float]:
        nll = sums[0] / max(sums[1], 1)
        return {"loss": nll, "nll": nll}


class NLL(Objective):
    """The pretraining baseline: next-token loss on one data source, no judge."""

    name = "nll"
    needs_judge = False

    def config_problem(self, candidates: list[str], rollout_k: int) -> str | None:
        if len(candidates) != 1:
            return "objective=nll trains on one source: set train.candidates to [suffix] or [rewrite]"
        if candidates == ["rollout"] and rollout_k != 1:
            return "objective=nll on rollouts trains on one own rollout: set rollout.k=1"
        return None

    def skip_reason(self, judged: JudgedSample) -> SkipReason | None:
        return None if judged.candidates else "no_candidate"

    def pair(self, judged: JudgedSample, seed: int) -> tuple[int, int | None]:
        return 0, None  # its one candidate


class RewardFilteredNLL(Objective):
    """Next-token loss on the judge's best candidate."""

    name = "rf_nll"


class DPO(Objective):
    """Online DPO, best against worst, against the frozen starting policy, plus `nll_coef` x NLL on the best."""

    name = "dpo"
    needs_reference = True
    needs_rejected = True

    def skip_reason(self, judged: JudgedSample) -> SkipReason | None:
        reason = super().skip_reason(judged)
        if reason is None and max(judged.reward[i] for i in _choosable(judged)) <= min(judged.reward):
            return "tie"
        return reason

    def pair(self, judged: JudgedSample, seed: int) -> tuple[int, int | None]:
        rng = random.Random(f"{seed}:{judged.sample.id}")
        return self._pick(judged, rng, best=True), self._pick(judged, rng, best=False)

    def micro_batch(self, model, reference, chunk: list[TrainExample], totals: dict, beta: float, nll_coef: float,
                    pad_id: int) -> tuple[torch.Tensor, list[float]]:
        import torch

        from sip.losses import dpo_terms, target_logprobs

        prefixes = [e.prefix_ids for e in chunk] * 2
        targets = [e.chosen_ids for e in chunk] + [e.rejected_ids for e in chunk]
        logp, n_tokens = target_logprobs(model, prefixes, targets, pad_id)
        given = [e.chosen_reference_logprob for e in chunk] + [e.rejected_reference_logprob for e in chunk]
        if None not in given:  # computed by the rollout worker (train.reference_logprobs=rollout_worker)
            ref_logp = torch.tensor(given, dtype=logp.dtype, device=logp.device)
        else:
            with torch.no_grad():
                ref_logp, _ = target_logprobs(reference, prefixes, targets, pad_id)
        b = len(chunk)
        dpo, margin = dpo_terms(logp[:b], logp[b:], ref_logp[:b], ref_logp[b:], beta)
        nll_sum = -logp[:b].sum()
        loss = dpo.sum() / totals["examples"] + nll_coef * nll_sum / totals["chosen_tokens"]
        return loss, [nll_sum.item(), n_tokens[:b].sum().item(), dpo.sum().item(), margin.sum().item(),
                      (margin > 0).sum().item()]

    def metrics(self, sums: list[float], totals: dict, nll_coef: float) -> dict[str, float]:
        nll_sum, tokens, dpo_sum, margin_sum, preferred = sums
        nll, n = nll_sum / max(tokens, 1), totals["examples"]
        return {"loss": dpo_sum / n + nll_coef * nll, "dpo_loss": dpo_sum / n, "nll": nll,
                "reward_margin": margin_sum / n, "preference_accuracy": preferred / n}


class RewriteOverRollout(DPO):
    """No judge: online DPO with the rewrite chosen over one of the policy's own rollouts, at random when
    there are several (the paper's SPIN-like row of Table 6)."""

    name = "dpo_rewrite_chosen"
    needs_judge = False

    def config_problem(self, candidates: list[str], rollout_k: int) -> str | None:
        if sorted(candidates) != ["rewrite", "rollout"]:
            return "objective=dpo_rewrite_chosen prefers the rewrite to a rollout: set train.candidates to [rewrite, rollout]"
        return None

    def skip_reason(self, judged: JudgedSample) -> SkipReason | None:
        sources = {c.source for c in judged.candidates}
        return None if {"rewrite", "rollout"} <= sources else "no_candidate"  # an empty rewrite is left out

    def pair(self, judged: JudgedSample, seed: int) -> tuple[int, int | None]:
        rollouts = [i for i, c in enumerate(judged.candidates) if c.source == "rollout"]
        chosen = next(i for i, c in enumerate(judged.candidates) if c.source == "rewrite")
        return chosen, random.Random(f"{seed}:{judged.sample.id}").choice(rollouts)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (DPO(), RewardFilteredNLL(), NLL(), RewriteOverRollout())}
ObjectiveName = Literal["dpo", "rf_nll", "nll", "dpo_rewrite_chosen"]
