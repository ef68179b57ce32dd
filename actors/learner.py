"""The policy learner: holds the policy, a frozen reference copy, AdamW and the LR schedule.

One `train_step` = one optimizer step = one new policy version. Plain class; the pipeline wraps
it with `ray.remote`, tests can use it directly.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from sip.actors.policy import build_policy, greedy_batched, load_numpy, to_numpy
from sip.train.config import SipConfig
from sip.train.losses import dpo_loss, nll_loss, target_logprobs
from sip.train.records import TrainExample

STATE_FILE = "trainer_state.pt"
REFERENCE_DIR = "reference"


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Learner:
    def __init__(self, cfg: SipConfig, tokenizer_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(cfg.policy.torch_threads)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.pad_id = self.tokenizer.pad_token_id
        resume = cfg.run.resume_from
        if resume is not None:
            self.model = AutoModelForCausalLM.from_pretrained(resume, dtype=torch.float32)
        else:
            self.model = build_policy(cfg.policy, self.tokenizer, cfg.run.seed, cfg.data.max_seq_tokens)
        self.model.to("cuda" if cfg.train.num_gpus > 0 else "cpu").train()
        self.reference = None
        if cfg.train.objective == "dpo":
            if resume is not None:
                self.reference = AutoModelForCausalLM.from_pretrained(Path(resume) / REFERENCE_DIR, dtype=torch.float32)
                self.reference.to(self.model.device)
            else:
                self.reference = copy.deepcopy(self.model)
            self.reference.eval().requires_grad_(False)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, t.warmup_steps, t.steps, t.min_lr_ratio)
        )
        self.version = 0
        self.extra_state: dict = {}
        self._nccl = None
        if resume is not None:
            state = torch.load(Path(resume) / STATE_FILE, weights_only=False, map_location=self.model.device)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.version = state["version"]
            self.extra_state = state["extra"]

    def train_step(self, examples: list[TrainExample]) -> dict[str, float]:
        """One optimizer step on the examples; an empty list still advances the version."""
        metrics: dict[str, float] = {"lr": self.scheduler.get_last_lr()[0]}
        if examples:
            loss = self._loss(examples, metrics)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
            metrics.update(loss=loss.item(), grad_norm=grad_norm.item())
        self.scheduler.step()
        self.version += 1
        metrics["policy_version"] = self.version
        return metrics

    def _loss(self, examples: list[TrainExample], metrics: dict[str, float]) -> torch.Tensor:
        prefixes = [e.prefix_ids for e in examples]
        chosen = [e.chosen_ids for e in examples]
        if self.cfg.train.objective != "dpo":
            logp, n_tokens = target_logprobs(self.model, prefixes, chosen, self.pad_id)
            loss = nll_loss(logp, n_tokens)
            metrics["nll"] = loss.item()
            return loss
        rejected = [e.rejected_ids for e in examples]
        both_prefixes = prefixes + prefixes
        logp, n_tokens = target_logprobs(self.model, both_prefixes, chosen + rejected, self.pad_id)
        with torch.no_grad():
            ref_logp, _ = target_logprobs(self.reference, both_prefixes, chosen + rejected, self.pad_id)
        b = len(examples)
        loss, margin, accuracy = dpo_loss(logp[:b], logp[b:], ref_logp[:b], ref_logp[b:], self.cfg.train.beta)
        nll = nll_loss(logp[:b], n_tokens[:b])
        metrics.update(dpo_loss=loss.item(), nll=nll.item(), reward_margin=margin.item(), preference_accuracy=accuracy.item())
        return loss + self.cfg.train.nll_coef * nll

    def weights(self):
        return to_numpy(self.model)

    def load_weights(self, weights) -> None:
        load_numpy(self.model, weights)

    def connect_generators(self, workers: list) -> None:
        """rollout.weight_sync=nccl: open the NCCL group with every generator's engine (GPU only)."""
        from sip.actors.vllm_adapter import NcclWeightSender

        self._nccl = NcclWeightSender(self.model, workers, self.cfg.pipeline.timeout_s)

    def broadcast_weights(self) -> int:
        """Send the current weights to every engine over NCCL; returns the version they now hold."""
        self._nccl.send(self.version)
        return self.version

    def greedy(self, prefixes: list[list[int]], n: int, batch_size: int = 32) -> list[list[int]]:
        self.model.eval()
        try:
            return greedy_batched(self.model, prefixes, n, self.pad_id, batch_size)
        finally:
            self.model.train()

    def save(self, path: str, extra: dict) -> str:
        """An HF folder (`from_pretrained` loads it) plus optimizer, schedule, version and `extra`."""
        out = Path(path)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        if self.reference is not None:
            self.reference.save_pretrained(out / REFERENCE_DIR)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "version": self.version,
                "extra": extra,
            },
            out / STATE_FILE,
        )
        return str(out)

    def resumed_state(self) -> tuple[int, dict]:
        return self.version, self.extra_state
