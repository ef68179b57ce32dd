"""Weights from the learner group to the rollout engines: one interface, one module per transport.

After each optimizer step the learner group `publish`es the new policy version. Every batch the
driver feeds carries the resulting `WeightUpdate`, and a rollout worker `apply`s it to its engine
(under the engine's lock) before it samples, so the engine holds at least that version. The driver,
the learner and the workers never branch on the transport (but a vLLM engine that is to take NCCL
broadcasts is built for it), and only the transport's module knows how the bytes move:

- `object_store.py` (default): the ranks gather the full state dict once per version; rank 0 returns
  it as numpy in the engines' dtype, so it lands in the object store, and each engine loads it in
  place when a batch needs a newer version than it holds.
- `nccl.py` (GPUs, vLLM engines, one learner rank): rank 0 broadcasts each version into every engine
  through vLLM's weight-transfer API; batches then carry only the version.
"""

from __future__ import annotations

from typing import Protocol

from sip.config import SipConfig
from sip.records import WeightUpdate


class WeightSync(Protocol):
    # A worker that died can be replaced by a new one: the new engine can be reached by this transport.
    replaceable_workers: bool

    # ---- the driver ----
    def connect(self, ranks: list, workers: list) -> None:
        """Once the rollout workers exist: whatever the transport needs to reach them."""

    def publish(self, ranks: list, version: int) -> WeightUpdate:
        """Make `version` (the ranks' current weights) reachable for the engines."""

    # ---- the sending rank (inside rank 0's actor) ----
    def open_sender(self, model, workers: list):
        """A transport that pushes: its sending end, with `send(version)`. None for one that does not."""

    # ---- a rollout worker (inside its actor) ----
    async def apply(self, engine, update: WeightUpdate) -> None:
        """Bring `engine` (a GenerationBackend) to `update.version` or newer."""

    def join(self, engine, info: dict) -> None:
        """A transport that pushes: `engine` joins the sender's channel."""

    def receive(self, engine, info: dict, version: int) -> None:
        """A transport that pushes: `engine` takes one push of `version`."""


def wire_dtype(cfg: SipConfig) -> str:
    """The dtype weights travel in: what the engines compute in (vLLM may run bfloat16; HF runs float32)."""
    return cfg.rollout.vllm.dtype if cfg.rollout.backend == "vllm" else "float32"


def make_weight_sync(cfg: SipConfig) -> WeightSync:
    if cfg.rollout.weight_sync == "nccl":
        from sip.actors.weight_sync.nccl import NcclSync

        return NcclSync(cfg)
    from sip.actors.weight_sync.object_store import ObjectStoreSync

    return ObjectStoreSync(cfg)
