"""The learner as the driver sees it: N FSDP2 ranks (actors/learner.py) behind one handle.

The ranks run in one placement group, one bundle each (`train.num_cpus`, `train.num_gpus`), and
join one process group. The driver calls `train_step`, `publish_weights`, `greedy` and `save`
exactly as it would on a single learner; the group splits each batch over the ranks, runs the
collective on all of them, and returns rank 0's answer. When any rank dies, every call raises
`LearnerDied`; `restart` replaces all ranks from a checkpoint (a process group cannot lose a member).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from sip.actors.weight_sync import make_weight_sync
from sip.checkpoint import CheckpointError, partial_dir
from sip.config import SipConfig
from sip.records import TrainExample, WeightUpdate


class LearnerDied(RuntimeError):
    """A learner rank's process died; the message names it."""


class LearnerGroup:
    def __init__(self, cfg: SipConfig, tokenizer_dir: str, resume_from: Path | None = None):
        self.cfg = cfg
        self.tokenizer_dir = tokenizer_dir
        self.timeout = cfg.pipeline.timeout_s
        self.weight_sync = make_weight_sync(cfg)
        self.ranks: list = []
        self._placement = None
        self.version, self.extra = self._start(resume_from)

    def _start(self, resume_from: Path | None) -> tuple[int, dict]:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from sip.actors.learner import LearnerRank

        t, n = self.cfg.train, self.cfg.train.num_learners
        bundle = {"CPU": t.num_cpus, **({"GPU": t.num_gpus} if t.num_gpus else {})}
        self._placement = placement_group([bundle] * n, strategy="PACK")
        try:
            ray.get(self._placement.ready(), timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            from sip.resources import ClusterError, resource_report

            report = resource_report()
            self.shutdown()
            raise ClusterError(f"the placement group of {n} learner ranks ({bundle} each) was not placed within "
                               f"pipeline.timeout_s={self.timeout:g}s; {report}") from None
        actor = ray.remote(LearnerRank)
        self.ranks = [
            actor.options(num_cpus=t.num_cpus, num_gpus=t.num_gpus,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, placement_group_bundle_index=i))
            .remote(self.cfg, self.tokenizer_dir, i, n)
            for i in range(n)
        ]
        init_method = self._get([self.ranks[0].rendezvous.remote()], "rendezvous")[0]
        resume = str(resume_from) if resume_from else None
        return self._get([r.setup.remote(init_method, resume) for r in self.ranks], "setup")[0]

    def _get(self, refs: list, what: str) -> list:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=self.timeout)
        except RayTaskError as err:
            if isinstance(err.cause, CheckpointError):  # e.g. a full disk: the rank says where and how much
                raise CheckpointError(str(err.cause)) from None
            raise
        except RayActorError as err:
            raise LearnerDied(f"a learner rank died during {what}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
        except GetTimeoutError:
            raise LearnerDied(f"the learner ranks did not finish {what} within pipeline.timeout_s={self.timeout:g}s") from None

    def train_step(self, examples: list[TrainExample]) -> dict[str, float]:
        """One optimizer step on `examples`, split over the ranks; an empty batch still bumps the version."""
        shares = shard_by_length(examples, len(self.ranks))
        largest = max(len(s) for s in shares)
        size = self.cfg.train.micro_batch_size or largest or 1
        totals = {
            "examples": len(examples),
            "chosen_tokens": sum(len(e.chosen_ids) for e in examples),
            "micro_batches": math.ceil(largest / size),
            "micro_batch_size": size,
            "filler": shares[0][0] if examples else None,  # the shortest
        }
        metrics = self._get([r.train_step.remote(s, totals) for r, s in zip(self.ranks, shares)], "train_step")[0]
        self.version = int(metrics["policy_version"])
        return metrics

    def check_alive(self) -> None:
        """LearnerDied if any rank's process is gone (the ranks are idle whenever the driver asks)."""
        self._get([r.ping.remote() for r in self.ranks], "a liveness check")

    def publish_weights(self) -> WeightUpdate:
        return self.weight_sync.publish(self.ranks, self.version)

    def publish_reference(self) -> tuple | None:
        """train.reference_logprobs=rollout_worker (DPO): the reference's weights in the object store, once,
        for the rollout workers; None otherwise. The driver owns the object, so it outlives a learner restart."""
        if self.cfg.train.reference_logprobs != "rollout_worker" or not self.cfg.objective.needs_reference:
            return None
        refs = [rank.reference_weights.remote() for rank in self.ranks]
        return (refs[0],)

    def connect_generators(self, workers: list) -> None:
        """Whatever the weight transport needs to reach the rollout workers (nccl: they join rank 0's group)."""
        self.weight_sync.connect(self.ranks, workers)

    def greedy(self, prefixes: list[list[int]], n: int) -> list[list[int]]:
        return self._get([r.greedy.remote(prefixes, n) for r in self.ranks], "greedy")[0]

    def save(self, final: Path, extra: dict) -> str:
        """A complete checkpoint at `final` (see sip/checkpoint.py), written by all ranks."""
        partial = partial_dir(Path(final))
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-write
        partial.parent.mkdir(parents=True, exist_ok=True)
        return self._get([r.save.remote(str(partial), str(final), extra) for r in self.ranks], "save")[0]

    def save_pretrained(self, folder: Path) -> None:
        """The policy alone as a Hugging Face folder (the base stage's output)."""
        self._get([r.save_pretrained.remote(str(folder)) for r in self.ranks], "save_pretrained")

    def restart(self, resume_from: Path | None) -> None:
        """Replace every rank, continuing from `resume_from` (or from the run's start when None)."""
        self.shutdown()
        self.version, self.extra = self._start(resume_from)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
        if self._placement is not None:
            remove_placement_group(self._placement)
            self._placement = None


def shard_by_length(examples: list[TrainExample], n: int) -> list[list[TrainExample]]:
    """Each rank's share, in order of length, dealt round-robin from the examples sorted by length: a
    micro-batch then pads only to its own longest, and the ranks get equal work. The step's gradient
    does not depend on the order."""
    ordered = sorted(examples, key=lambda e: len(e.prefix_ids) + max(len(e.chosen_ids), len(e.rejected_ids or ())))
    return [ordered[r::n] for r in range(n)]
