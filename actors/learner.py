"""One rank of the policy learner: an FSDP2 shard of the policy and of the frozen DPO reference,
AdamW, and the LR schedule.

The learner group (`actors/learner_group.py`) starts N ranks in a placement group and joins them
in one process group (gloo on CPU, NCCL on GPUs); a single learner is the same code with N = 1.
Each decoder layer is its own FSDP2 unit. Every method that touches the model is a collective:
all ranks call it, each on its own share. One `train_step` is one optimizer step and one new
policy version, whatever the micro-batch size: gradients accumulate over micro-batches, and each
contribution is normalised by the *global* batch's totals, so 1 rank and N ranks, one pass or
many, take the same step.
"""

from __future__ import annotations

import base64
import copy
import math
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from sip.actors.policy import build_policy, greedy_batched
from sip.actors.weight_sync import make_weight_sync
from sip.weights import to_wire
from sip.checkpoint import (REFERENCE_DIR, CheckpointWriteError, complete, fingerprint, link_or_copy_tree, load_sharded,
                                  read_state, save_sharded, space_shortage, write_state, writing)
from sip.config import SipConfig
from sip.objectives import SUMS
from sip.records import TrainExample


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def compute_dtype(cfg: SipConfig) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if cfg.train.num_gpus > 0 else torch.float32
    return getattr(torch, cfg.train.dtype)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (Llama-style `model.layers`, GPT-2-style `transformer.h`)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        node = model
        for name in path.split("."):
            node = getattr(node, name, None)
        if isinstance(node, torch.nn.ModuleList):
            return list(node)
    return []


class LearnerRank:
    def __init__(self, cfg: SipConfig, tokenizer_dir: str, rank: int = 0, world_size: int = 1):
        from transformers import AutoTokenizer

        torch.set_num_threads(cfg.policy.torch_threads)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.pad_id = self.tokenizer.pad_token_id
        self.device = torch.device("cuda", 0) if cfg.train.num_gpus > 0 else torch.device("cpu")
        self.version = 0
        self.extra: dict = {}
        self._reference_saved: Path | None = None  # a checkpoint's reference folder to link to instead of writing it again
        self._sender = None  # a pushing transport's sending end (rank 0)

    # ---- start-up -------------------------------------------------------------------------------

    def ping(self) -> int:
        return self.rank

    def rendezvous(self) -> str:
        """Rank 0: the address where every rank joins the process group."""
        import socket

        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, init_method: str, resume_from: str | None = None) -> tuple[int, dict]:
        """Join the process group, build and shard the policy (and the reference), restore a checkpoint."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=self.cfg.pipeline.timeout_s))
        policy = self._load(resume_from or self.cfg.policy.init)
        reference = None
        if self.cfg.objective.needs_reference:
            # the reference is the policy the run started from; a checkpoint keeps it beside the policy
            reference = self._load(str(Path(resume_from) / REFERENCE_DIR)) if resume_from else copy.deepcopy(policy)
            reference.requires_grad_(False).eval()
            if resume_from:
                self._reference_saved = Path(resume_from) / REFERENCE_DIR
        if self.cfg.train.activation_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self._shard(policy).train()
        self.reference = self._shard(reference) if reference is not None else None
        t = self.cfg.train
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, t.warmup_steps, t.steps, t.min_lr_ratio)
        )
        if resume_from:
            self._restore(Path(resume_from))
        return self.version, self.extra

    def _load(self, source: str):
        if source == "scratch":
            return build_policy(self.cfg.policy, self.tokenizer, self.cfg.run.seed, self.cfg.data.max_seq_tokens)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)

    def _shard(self, model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(self.device)
        if self.world_size == 1 and compute_dtype(self.cfg) == torch.float32:
            return model  # nothing to shard and no mixed precision: FSDP's hooks would only cost time (~10% a step)
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype(self.cfg), reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)

    def _restore(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        load_sharded(state, folder)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        trainer = read_state(folder)
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.version = trainer["version"]
        self.extra = trainer["extra"]
        rng = trainer["rng"]
        if self.rank < len(rng):
            torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng[self.rank])), dtype=torch.uint8))

    # ---- training -------------------------------------------------------------------------------

    def train_step(self, share: list[TrainExample], totals: dict) -> dict[str, float]:
        """One optimizer step on the global batch, of which this rank computes `share`.

        `totals` (the same on every rank): `examples` and `chosen_tokens` of the global batch, the
        number of `micro_batches` every rank runs and their `micro_batch_size`, and a `filler`
        example that a rank with fewer examples runs at zero weight (every rank must take part in
        every collective of FSDP's forward and backward).
        """
        metrics: dict[str, float] = {"lr": self.scheduler.get_last_lr()[0]}
        if totals["examples"]:
            sums = torch.zeros(len(SUMS), dtype=torch.float64)
            size = totals["micro_batch_size"]
            for i in range(totals["micro_batches"]):
                chunk = share[i * size : (i + 1) * size]
                weight = 1.0 if chunk else 0.0
                self._accumulate(chunk or [totals["filler"]], weight, totals, sums)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            metrics.update(self._global_metrics(sums, totals), grad_norm=_local(grad_norm).item())
        self.scheduler.step()
        self.version += 1
        metrics["policy_version"] = self.version
        return metrics

    def _accumulate(self, chunk: list[TrainExample], weight: float, totals: dict, sums: torch.Tensor) -> None:
        """Forward and backward of one micro-batch. FSDP averages gradients over the ranks, so each
        contribution is scaled by the world size: the reduced gradient is that of the global loss."""
        t = self.cfg.train
        loss, chunk_sums = self.cfg.objective.micro_batch(self.model, self.reference, chunk, totals, t.beta, t.nll_coef,
                                                          self.pad_id)
        (loss * weight * self.world_size).backward()
        sums += weight * torch.tensor(chunk_sums, dtype=torch.float64)

    def _global_metrics(self, sums: torch.Tensor, totals: dict) -> dict[str, float]:
        reduced = sums.to(self.device)
        dist.all_reduce(reduced)
        return self.cfg.objective.metrics(reduced.tolist(), totals, self.cfg.train.nll_coef)

    # ---- weights, generation, checkpoints -------------------------------------------------------

    def _full_state(self, model) -> dict[str, torch.Tensor]:
        """The whole state dict on rank 0 (on the CPU), empty elsewhere: a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_weights(self, dtype: str = "float32") -> dict | None:
        """The policy for the rollout engines (rank 0; None elsewhere), as numpy in `dtype`."""
        state = self._full_state(self.model)
        return to_wire(state, dtype) if self.rank == 0 else None

    def reference_weights(self, dtype: str = "float32") -> dict | None:
        """The DPO reference for the rollout workers (rank 0; None elsewhere), as numpy in `dtype`."""
        state = self._full_state(self.reference)
        return to_wire(state, dtype) if self.rank == 0 else None

    def greedy(self, prefixes: list[list[int]], n: int, batch_size: int = 32) -> list[list[int]]:
        """Greedy continuations of exactly `n` tokens, the prefixes split over the ranks."""
        per_rank = math.ceil(len(prefixes) / self.world_size)
        mine = prefixes[self.rank * per_rank : (self.rank + 1) * per_rank]
        padded = mine + [prefixes[0]] * (per_rank - len(mine))  # every rank makes the same forward calls
        self.model.eval()
        try:
            out = greedy_batched(self.model, padded, n, self.pad_id, batch_size)[: len(mine)]
        finally:
            self.model.train()
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, out)
        return [row for part in parts for row in part]

    def save_pretrained(self, folder: str) -> None:
        """The policy as a Hugging Face folder, written by rank 0 (a collective)."""
        policy = self._full_state(self.model)
        if self.rank == 0:
            self.model.save_pretrained(folder, state_dict=policy)

    def save(self, partial: str, final: str, extra: dict) -> str:
        """Write a checkpoint into `partial` and, once whole, move it to `final` (rank 0).

        A failure raises on every rank and removes `partial`; a full disk, checked before writing
        and met while writing, is a CheckpointWriteError naming the folder and the space needed."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        folder = Path(partial)
        policy = self._full_state(self.model)
        reference = self._full_state(self.reference) if self.reference is not None and self._reference_saved is None else None
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        sharded = {"model": model_state, "optimizer": optimizer_state}
        need = _nbytes(policy) + _nbytes(reference) + _nbytes(sharded)
        # rank 0 judges the free space, so that every rank starts writing or none does
        rng_and_space: list = [None] * self.world_size
        dist.all_gather_object(rng_and_space, (base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
                                               space_shortage(folder, need) if self.rank == 0 else None))
        rng, shortage = [r for r, _ in rng_and_space], rng_and_space[0][1]
        if shortage:
            raise CheckpointWriteError(shortage)
        with writing(folder, need):
            save_sharded(sharded, folder)  # a failure on any rank raises on every rank
            failure = None
            if self.rank == 0:
                try:
                    self.model.save_pretrained(folder, state_dict=policy)
                    self.tokenizer.save_pretrained(folder)
                    if self.reference is not None:
                        if self._reference_saved is not None:
                            link_or_copy_tree(self._reference_saved, folder / REFERENCE_DIR)
                        else:
                            self.reference.save_pretrained(folder / REFERENCE_DIR, state_dict=reference)
                    write_state(folder, {"version": self.version, "scheduler": self.scheduler.state_dict(), "rng": rng,
                                         "fingerprint": fingerprint(self.cfg), "extra": extra})
                    complete(folder, Path(final))
                except Exception as err:
                    failure = err
            failures: list = [None] * self.world_size  # the other ranks learn that rank 0 failed instead of waiting
            dist.all_gather_object(failures, None if failure is None else str(failure))
            if failure is not None:
                raise failure
            if failures[0] is not None:
                raise CheckpointWriteError(f"rank 0 could not write the checkpoint {folder}: {failures[0]}")
        if self.reference is not None:
            self._reference_saved = Path(final) / REFERENCE_DIR
        return final

    # ---- a weight transport that pushes (rollout.weight_sync=nccl) -------------------------------

    def open_weight_sender(self, workers: list) -> None:
        """Rank 0: open the transport's channel to every rollout worker."""
        self._sender = make_weight_sync(self.cfg).open_sender(self.model, workers)

    def push_weights(self) -> int:
        """Rank 0: push the current weights to every engine; returns the version they now hold."""
        self._sender.send(self.version)
        return self.version

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _nbytes(state) -> int:
    """The bytes of the tensors in a nested state dict (a DTensor counts whole)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        state = list(state.values())
    return sum(_nbytes(item) for item in state) if isinstance(state, (list, tuple)) else 0


def _local(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (the gradient norm of a sharded model is one), or the tensor itself."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value
