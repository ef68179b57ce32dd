"""rollout.weight_sync=object_store: each version's full state dict rides the object store to the engines."""

from __future__ import annotations

import asyncio

from sip.actors.weight_sync import wire_dtype
from sip.config import SipConfig
from sip.records import WeightUpdate


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

    def open_sender(self, model, workers: list) -> None:
        return None  # nothing is pushed: the engines pull from the object store

    async def apply(self, engine, update: WeightUpdate) -> None:
        if update.version <= engine.version:
            return
        weights = await update.refs[0]
        await asyncio.get_running_loop().run_in_executor(None, engine.load_weights, update.version, weights)

    def join(self, engine, info: dict) -> None:
        raise RuntimeError("rollout.weight_sync=object_store has no channel to join")

    def receive(self, engine, info: dict, version: int) -> None:
        raise RuntimeError("rollout.weight_sync=object_store pushes nothing")
