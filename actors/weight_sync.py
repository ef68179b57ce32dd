"""Weights from the learner group to the rollout engines: one interface, two transports.

After each optimizer step the learner group `publish`es the new policy version. Every batch the
driver feeds carries the resulting `WeightUpdate`, and a rollout worker `apply`s it to its engine
(under the engine's lock) before it samples, so the engine holds at least that version. The driver
and the records never branch on the transport.

- `object_store`: the ranks gather the full state dict once per version (a collective); rank 0
  returns it as numpy in the engines' dtype, so it lands in the object store, and each engine
  loads it in place when a batch needs a newer version than it holds.
- `nccl` (GPUs, vLLM engines, one learner rank): rank 0 broadcasts each version into every engine
  through vLLM's weight-transfer API; batches then carry only the version.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from sip.config import SipConfig


@dataclass(frozen=True)
class WeightUpdate:
    """What a batch carries so its rollouts come from policy `version` or newer."""

    version: int
    # object_store: (ObjectRef of the full state dict,). Inside a tuple, so Ray does not resolve it on the way.
    refs: tuple[Any, ...] = ()


class WeightSync(Protocol):
    # A worker that died can be replaced by a new one: the new engine can be reached by this transport.
    replaceable_workers: bool

    def connect(self, ranks: list, workers: list) -> None:
        """Once the rollout workers exist: whatever the transport needs to reach them."""

    def publish(self, ranks: list, version: int) -> WeightUpdate:
        """Learner side: make `version` (the ranks' current weights) reachable for the engines."""

    async def apply(self, engine, update: WeightUpdate) -> None:
        """Generator side: bring `engine` (a GenerationBackend) to `update.version` or newer."""


def wire_dtype(cfg: SipConfig) -> str:
    """The dtype weights travel in: what the engines compute in (vLLM may run bfloat16; HF runs float32)."""
    return cfg.rollout.vllm.dtype if cfg.rollout.backend == "vllm" else "float32"


class ObjectStoreSync:
    replaceable_workers = True  # every batch carries its weights to whichever worker takes it

    def __init__(self, cfg: SipConfig):
        self.dtype = wire_dtype(cfg)

    def connect(self, ranks: list, workers: list) -> None:
        pass  # batches carry the weights to whichever worker takes them

    def publish(self, ranks: list, version: int) -> WeightUpdate:
        # Every rank takes part in the gather; only rank 0's result holds the weights. The ranks' next
        # calls queue behind it, so nobody needs to wait for it here.
        refs = [rank.full_weights.remote(self.dtype) for rank in ranks]
        return WeightUpdate(version, (refs[0],))

    async def apply(self, engine, update: WeightUpdate) -> None:
        if update.version <= engine.version:
            return
        weights = await update.refs[0]
        await asyncio.get_running_loop().run_in_executor(None, engine.load_weights, update.version, weights)


class NcclSync:
    replaceable_workers = False  # a new engine would be outside the NCCL group, which vLLM forms once

    def __init__(self, cfg: SipConfig):
        self.timeout = cfg.pipeline.timeout_s

    def connect(self, ranks: list, workers: list) -> None:
        import ray

        ray.get(ranks[0].connect_generators.remote(workers), timeout=self.timeout)

    def publish(self, ranks: list, version: int) -> WeightUpdate:
        import ray

        ray.get(ranks[0].broadcast_weights.remote(), timeout=self.timeout)
        return WeightUpdate(version)

    async def apply(self, engine, update: WeightUpdate) -> None:
        if engine.version < update.version:
            raise RuntimeError(f"the engine holds policy version {engine.version} but the batch needs "
                               f"{update.version}: it missed an NCCL broadcast")


def make_weight_sync(cfg: SipConfig) -> WeightSync:
    return NcclSync(cfg) if cfg.rollout.weight_sync == "nccl" else ObjectStoreSync(cfg)
