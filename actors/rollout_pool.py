"""The rollout workers as the driver sees them: one handle over `rollout.num_generators` actors.

`submit` hands a batch to the live worker with the fewest batches in hand (a Ray actor call: the
batch travels to it, and its judged result comes back through the object store). `poll` returns
what has finished. A worker whose process dies is noticed at once, through its failed calls, not
at a timeout: every batch it held comes back as lost, so the driver feeds it again, and the pool
puts a fresh worker in its place (up to `run.max_failures` times per worker).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sip.actors.weight_sync import make_weight_sync
from sip.config import SipConfig
from sip.records import Batch, JudgedBatch

log = logging.getLogger(__name__)


class RolloutWorkersExhausted(RuntimeError):
    """A rollout worker died more often than `run.max_failures` allows, or cannot be replaced."""


@dataclass(frozen=True)
class Lost:
    index: int
    attempt: int
    reason: str


@dataclass
class _Slot:
    worker_id: int
    actor: Any
    generation: int = 0  # replacements so far


class RolloutPool:
    def __init__(self, cfg: SipConfig, tokenizer_dir: str, apps: dict[str, str]):
        self.cfg, self.tokenizer_dir, self.apps = cfg, tokenizer_dir, apps
        self.replaceable = make_weight_sync(cfg).replaceable_workers
        self.slots = [_Slot(i, self._spawn(i)) for i in range(cfg.rollout.num_generators)]
        self.in_flight: dict[Any, tuple[_Slot, int, int, int]] = {}  # ref -> (slot, its generation, index, attempt)
        self.restarts: Counter = Counter()

    def _spawn(self, worker_id: int):
        import ray

        from sip.actors.generator import RolloutWorker

        r = self.cfg.rollout
        return (ray.remote(RolloutWorker).options(num_cpus=r.num_cpus, num_gpus=r.num_gpus)
                .remote(self.cfg, self.tokenizer_dir, worker_id, self.apps))

    @property
    def actors(self) -> list:
        return [slot.actor for slot in self.slots]

    def submit(self, batch: Batch) -> None:
        load = Counter(slot.worker_id for slot, *_ in self.in_flight.values())
        slot = min(self.slots, key=lambda s: load[s.worker_id])
        self.in_flight[slot.actor.episode.remote(batch)] = (slot, slot.generation, batch.index, batch.attempt)

    def poll(self, timeout: float) -> list[JudgedBatch | Lost]:
        """Finished episodes (waiting up to `timeout` for the first), and the batches of workers that died."""
        import ray
        from ray.exceptions import RayActorError

        if not self.in_flight:
            return []
        ready, rest = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        out: list[JudgedBatch | Lost] = []
        for ref in ready:
            slot, generation, index, attempt = self.in_flight.pop(ref)
            try:
                out.append(ray.get(ref))
            except RayActorError as err:
                out.append(Lost(index, attempt, f"rollout worker {slot.worker_id} died ({type(err).__name__})"))
                if slot.generation == generation:  # the first of its failed calls: replace it once
                    self._replace(slot, err)
        return out

    def _replace(self, slot: _Slot, err: Exception) -> None:
        import ray

        self.restarts[slot.worker_id] += 1
        budget = self.cfg.run.max_failures
        if not self.replaceable or self.restarts[slot.worker_id] > budget:
            why = (f"rollout.weight_sync={self.cfg.rollout.weight_sync} cannot reach a new worker's engine" if not self.replaceable
                   else f"it died {self.restarts[slot.worker_id]} times (run.max_failures={budget})")
            raise RolloutWorkersExhausted(f"rollout worker {slot.worker_id} died and is not replaced: {why}")
        log.warning("rollout worker %d died (%s); starting a new one (restart %d of %d)",
                    slot.worker_id, type(err).__name__, self.restarts[slot.worker_id], budget)
        ray.kill(slot.actor)
        slot.actor = self._spawn(slot.worker_id)
        slot.generation += 1

    def shutdown(self) -> None:
        import ray

        for slot in self.slots:
            ray.kill(slot.actor)
