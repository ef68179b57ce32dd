"""Rollout generators: each worker turns a batch of samples into judged candidates.

One episode per batch: ask the rewriter (it does not depend on the policy, so it runs while the
rollouts are sampled), sample K rollouts at the batch's policy version, then ask the judge to score
every candidate. Episodes of different batches overlap; generation and weight loads never do.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from sip.actors.policy import build_policy, load_numpy, sample_rollouts
from sip.serve.backends import Passage
from sip.serve.judge import JUDGE_APP, JudgeResult, JudgeTask
from sip.serve.rewriter import REWRITER_APP
from sip.train.config import SipConfig
from sip.train.metrics import RolloutMetrics, run_name
from sip.train.records import Batch, Candidate, JudgedBatch, JudgedSample, Rollout, Sample


class GenerationBackend(Protocol):
    """What a rollout engine must do; `version` is the policy version of its loaded weights."""

    version: int

    def load_weights(self, version: int, weights: dict) -> None: ...

    def generate(self, prefixes: list[list[int]], k: int, n: int, greedy: bool = False) -> list[list[Rollout]]:
        """K samples of exactly `n` new tokens per prefix, with per-token log-probabilities."""


class HFGenerator:
    """transformers `generate` on the CPU (or wherever torch puts the model)."""

    def __init__(self, cfg: SipConfig, tokenizer, worker_id: int = 0):
        self.cfg = cfg.rollout
        self.pad_id = tokenizer.pad_token_id
        self.model = build_policy(cfg.policy, tokenizer, cfg.run.seed, cfg.data.max_seq_tokens).eval()
        self.version = -1

    def load_weights(self, version: int, weights: dict) -> None:
        load_numpy(self.model, weights)
        self.version = version

    def generate(self, prefixes: list[list[int]], k: int, n: int, greedy: bool = False) -> list[list[Rollout]]:
        return sample_rollouts(self.model, prefixes, n, self.pad_id, samples=k, temperature=self.cfg.temperature,
                               top_p=self.cfg.top_p, greedy=greedy)


class VLLMGenerator:
    """A vLLM engine inside the generator actor, its weights replaced in place at each new version."""

    def __init__(self, cfg: SipConfig, tokenizer, worker_id: int = 0):
        from sip.actors import vllm_adapter

        self.cfg = cfg.rollout
        self._vllm = vllm_adapter
        # vLLM's CPU kernels keep per-thread OpenMP state: every engine call runs on this one thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm")
        # the engine starts from the same initial policy as the learner (version -1), saved as an HF folder
        self._folder = tempfile.TemporaryDirectory(prefix="sip-vllm-policy-")
        build_policy(cfg.policy, tokenizer, cfg.run.seed, cfg.data.max_seq_tokens).save_pretrained(self._folder.name)
        v = cfg.rollout.vllm
        self.llm = self._thread.submit(
            vllm_adapter.policy_engine, self._folder.name, dtype=v.dtype, max_model_len=cfg.data.max_seq_tokens,
            seed=cfg.run.seed * 1000 + worker_id, enforce_eager=v.enforce_eager,
            gpu_memory_utilization=v.gpu_memory_utilization, cpu_kv_cache_gib=v.cpu_kv_cache_gib,
            nccl_weight_sync=cfg.rollout.weight_sync == "nccl",
        ).result()
        self.version = -1

    def load_weights(self, version: int, weights: dict) -> None:
        self._thread.submit(self._vllm.reload_weights, self.llm, weights).result()
        self.version = version

    def join_weight_group(self, init_info: dict) -> None:
        self._thread.submit(self._vllm.join_weight_group, self.llm, init_info).result()

    def receive_weights(self, update_info: dict, version: int) -> None:
        self._thread.submit(self._vllm.receive_weights, self.llm, update_info).result()
        self.version = version

    def generate(self, prefixes: list[list[int]], k: int, n: int, greedy: bool = False) -> list[list[Rollout]]:
        return self._thread.submit(self._vllm.sample, self.llm, prefixes, k, n, temperature=self.cfg.temperature,
                                   top_p=self.cfg.top_p, greedy=greedy).result()


GENERATORS = {"hf": HFGenerator, "vllm": VLLMGenerator}


class RolloutWorker:
    def __init__(self, cfg: SipConfig, tokenizer_dir: str, worker_id: int):
        from transformers import AutoTokenizer

        torch.set_num_threads(cfg.policy.torch_threads)
        torch.manual_seed(cfg.run.seed * 1000 + worker_id)
        self.cfg = cfg
        self.sources = cfg.train.candidates
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.engine: GenerationBackend | None = None
        if "rollouts" in self.sources:
            self.engine = GENERATORS[cfg.rollout.backend](cfg, self.tokenizer, worker_id)
        self._engine_lock = asyncio.Lock()
        self.judge = self.rewriter = None
        self.metrics = RolloutMetrics(run_name(cfg), worker_id)

    def _handles(self):
        from ray import serve

        if self.judge is None and self.cfg.needs_judge:
            self.judge = serve.get_app_handle(JUDGE_APP)
        if self.rewriter is None and self.cfg.needs_rewriter:
            self.rewriter = serve.get_app_handle(REWRITER_APP)

    async def join_weight_group(self, init_info: dict) -> None:
        """rollout.weight_sync=nccl: join the learner's NCCL group (it waits here for every engine)."""
        await asyncio.get_running_loop().run_in_executor(None, self.engine.join_weight_group, init_info)

    async def receive_weights(self, update_info: dict, version: int) -> None:
        """rollout.weight_sync=nccl: take the learner's broadcast of `version`, between two generations."""
        async with self._engine_lock:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.receive_weights, update_info, version)

    async def run(self, samples_q, judged_q) -> int:
        """Work until a None arrives on `samples_q`; returns the number of batches judged."""
        self._handles()
        timeout = self.cfg.pipeline.timeout_s
        episodes: set[asyncio.Task] = set()
        done = 0
        while True:
            batch = await samples_q.get_async(timeout=timeout)
            if batch is None:
                break
            episodes.add(asyncio.create_task(self.episode(batch, judged_q)))
            finished = {t for t in episodes if t.done()}
            done += len(finished)
            episodes -= finished
        await asyncio.gather(*episodes)
        return done + len(episodes)

    async def episode(self, batch: Batch, judged_q) -> None:
        try:
            result = await self._judged(batch)
        except Exception as err:  # the driver must hear of it now, not at its queue timeout
            result = JudgedBatch(index=batch.index, judged=[], error=f"{type(err).__name__}: {err}")
        await judged_q.put_async(result, timeout=self.cfg.pipeline.timeout_s)

    async def _judged(self, batch: Batch) -> JudgedBatch:
        start = time.perf_counter()
        timeout = self.cfg.pipeline.timeout_s
        samples = batch.samples
        passages = [Passage(s.prefix, s.suffix, s.truth) for s in samples]
        rewrites = [self.metrics.rewriter_call(self.rewriter.rewrite.remote(p)) for p in passages] if self.rewriter else []
        rollouts, version = await self._rollouts(batch) if self.engine else ([[] for _ in samples], None)
        rewrite_texts = await asyncio.wait_for(asyncio.gather(*rewrites), timeout) if rewrites else []

        candidates, rewrite_failures = self._candidates(samples, rollouts, version, rewrite_texts)
        result = JudgedBatch(index=batch.index, judged=[], rewrite_failures=rewrite_failures)
        if self.judge is None:
            result.judged = [JudgedSample(s, c, reward=[1.0] * len(c)) for s, c in zip(samples, candidates)]
        else:
            pivot_source = "rewrite" if self.cfg.judge.pivot == "rewrite" else "suffix"
            tasks = [
                JudgeTask(p, [c.text for c in cands], pivot=next((i for i, c in enumerate(cands) if c.source == pivot_source), None))
                for p, cands in zip(passages, candidates)
            ]
            verdicts: list[JudgeResult] = await asyncio.wait_for(
                asyncio.gather(*(self.metrics.judge_call(self.judge.score.remote(t)) for t in tasks)), timeout
            )
            for sample, cands, v in zip(samples, candidates, verdicts):
                result.judged.append(JudgedSample(sample, cands, reward=v.reward, scores=v.scores))
                result.judge_calls += v.calls
                result.judge_failures += v.failures
        result.worker_seconds = time.perf_counter() - start
        return result

    async def _rollouts(self, batch: Batch) -> tuple[list[list[Rollout]], int]:
        """The batch's rollouts and the policy version that wrote them."""
        async with self._engine_lock:
            loop = asyncio.get_running_loop()
            if batch.weights and batch.weights_version > self.engine.version:
                weights = await asyncio.wait_for(batch.weights[0], self.cfg.pipeline.timeout_s)
                await loop.run_in_executor(None, self.engine.load_weights, batch.weights_version, weights)
            if self.engine.version < batch.weights_version:  # the batch's staleness bound assumes at least this version
                raise RuntimeError(f"batch {batch.index} needs policy version {batch.weights_version}, "
                                   f"the engine holds {self.engine.version} and the batch carries no newer weights")
            prefixes = [s.prefix_ids for s in batch.samples]
            n, k = self.cfg.data.suffix_tokens, self.cfg.rollout.k
            start = time.perf_counter()
            rollouts = await loop.run_in_executor(None, self.engine.generate, prefixes, k, n)
            self.metrics.generated(sum(len(r.ids) for group in rollouts for r in group), time.perf_counter() - start)
            return rollouts, self.engine.version

    def _candidates(self, samples: list[Sample], rollouts, version, rewrite_texts) -> tuple[list[list[Candidate]], int]:
        n = self.cfg.data.suffix_tokens
        failures = 0
        out = []
        for i, sample in enumerate(samples):
            cands = []
            if "suffix" in self.sources:
                cands.append(Candidate("suffix", sample.suffix_ids, sample.suffix))
            if "rewrite" in self.sources:
                ids = self.tokenizer.encode(rewrite_texts[i], add_special_tokens=False)[:n]
                if ids:
                    cands.append(Candidate("rewrite", ids, self.tokenizer.decode(ids)))
                else:
                    failures += 1
            for r in rollouts[i]:
                cands.append(Candidate("rollout", r.ids, self.tokenizer.decode(r.ids), version, r.logprobs))
            out.append(cands)
        return out, failures
