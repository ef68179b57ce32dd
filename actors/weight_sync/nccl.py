"""rollout.weight_sync=nccl (GPUs, vLLM engines, one learner rank): rank 0 broadcasts every version.

The learner's rank 0 is rank 0 of one NCCL group; engine i joins it as rank 1 + i, once, when the
run starts (vLLM forms the group once, so a worker that dies cannot be replaced). Each `publish`
broadcasts the weights into every engine through vLLM's weight-transfer API, and each worker takes
the broadcast between two generations, under its engine's lock. Batches then carry only the version.

vLLM's trainer-side engine drives the handshake through a client with four methods; `_WorkerClient`
is that client over sip's rollout workers (`RolloutWorker.join_weight_channel` / `take_weights`).
The raw vLLM calls are in sip/vllm_adapter.py.
"""

from __future__ import annotations

from sip.config import SipConfig
from sip.records import WeightUpdate


class NcclSync:
    replaceable_workers = False  # a new engine would be outside the NCCL group, which vLLM forms once

    def __init__(self, cfg: SipConfig):
        self.timeout = cfg.pipeline.timeout_s

    def connect(self, ranks: list, workers: list) -> None:
        import ray

        ray.get(ranks[0].open_weight_sender.remote(workers), timeout=self.timeout)

    def publish(self, ranks: list, version: int) -> WeightUpdate:
        import ray

        ray.get(ranks[0].push_weights.remote(), timeout=self.timeout)
        return WeightUpdate(version)

    def open_sender(self, model, workers: list) -> NcclSender:
        return NcclSender(model, workers, self.timeout)

    async def apply(self, engine, update: WeightUpdate) -> None:
        if engine.version < update.version:
            raise RuntimeError(f"the engine holds policy version {engine.version} but the batch needs "
                               f"{update.version}: it missed an NCCL broadcast")

    def join(self, engine, info: dict) -> None:
        engine.join_weight_group(info)

    def receive(self, engine, info: dict, version: int) -> None:
        engine.receive_weights(info, version)


class _WorkerClient:
    """vLLM's `VLLMWeightSyncClient` over sip's rollout workers."""

    def __init__(self, workers: list, timeout_s: float):
        self.workers, self.timeout_s, self.version = workers, timeout_s, -1

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        import ray

        joins = [w.join_weight_channel.remote({**init_info, "rank_offset": 1 + i}) for i, w in enumerate(self.workers)]
        ray.get(joins, timeout=self.timeout_s)

    def start_weight_update(self) -> None:  # each worker starts inside take_weights, once its engine lock is held
        pass

    def update_weights(self, update_info: dict) -> None:
        import ray

        ray.get([w.take_weights.remote(update_info, self.version) for w in self.workers], timeout=self.timeout_s)

    def finish_weight_update(self, weight_version: str | None = None) -> None:  # done inside take_weights
        pass


class NcclSender:
    """Rank 0's end: one NCCL group with every worker's engine, one broadcast per version."""

    def __init__(self, model, workers: list, timeout_s: float):
        import socket

        import ray

        from sip.vllm_adapter import nccl_trainer_engine

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        self.client = _WorkerClient(workers, timeout_s)
        self.engine = nccl_trainer_engine(model, self.client, ray.util.get_node_ip_address(), port, 1 + len(workers))

    def send(self, version: int) -> None:
        self.client.version = version
        self.engine.send_weights()
