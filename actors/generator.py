"""Rollout generators: each worker turns a batch of samples into judged candidates.

One episode per batch: ask the rewriter (it does not depend on the policy, so it runs while the
rollouts are sampled), bring the engine to the batch's policy version, sample K rollouts, then ask
the judge to score every candidate. Episodes of different batches overlap; generation and weight
loads never do. Every judge and rewriter request has a timeout and is retried with backoff (a
replica that died or hung is replaced by Serve meanwhile); an episode that still fails comes back
with its error, and the driver feeds the batch again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from sip.actors.policy import build_policy, load_wire, sample_rollouts
from sip.actors.weight_sync import make_weight_sync
from sip.records import Passage
from sip.records import JudgeResult, JudgeTask
from sip.config import SipConfig
from sip.metrics import RolloutMetrics, run_tags
from sip.records import Batch, Candidate, JudgedBatch, JudgedSample, Rollout, Sample


class GenerationBackend(Protocol):
    """What a rollout engine must do; `version` is the policy version of its loaded weights."""

    version: int

    def load_weights(self, version: int, weights: dict) -> None: ...

    def generate(self, prefixes: list[list[int]], k: int, n: int, greedy: bool = False,
                 seed: int | None = None) -> list[list[Rollout]]:
        """K samples of exactly `n` new tokens per prefix, with per-token log-probabilities; `seed`
        makes them a function of the weights and the batch alone."""


class HFGenerator:
    """transformers `generate` on the CPU (or wherever torch puts the model)."""

    def __init__(self, cfg: SipConfig, tokenizer, worker_id: int = 0):
        self.cfg = cfg.rollout
        self.pad_id = tokenizer.pad_token_id
        self.model = build_policy(cfg.policy, tokenizer, cfg.run.seed, cfg.data.max_seq_tokens).eval()
        self.version = -1

    def load_weights(self, version: int, weights: dict) -> None:
        load_wire(self.model, weights)
        self.version = version

    def generate(self, prefixes: list[list[int]], k: int, n: int, greedy: bool = False,
                 seed: int | None = None) -> list[list[Rollout]]:
        if seed is not None:
            torch.manual_seed(seed)
        return sample_rollouts(self.model, prefixes, n, self.pad_id, samples=k, temperature=self.cfg.temperature,
                               top_p=self.cfg.top_p, greedy=greedy)


class VLLMGenerator:
    """A vLLM engine inside the generator actor, its weights replaced in place at each new version."""

    def __init__(self, cfg: SipConfig, tokenizer, worker_id: int = 0):
        from sip import vllm_adapter

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

    def close(self) -> None:
        self._thread.submit(self._vllm.shutdown, self.llm).result()

    def join_weight_group(self, init_info: dict) -> None:
        self._thread.submit(self._vllm.join_weight_group, self.llm, init_info).result()

    def receive_weights(self, update_info: dict, version: int) -> None:
        self._thread.submit(self._vllm.receive_weights, self.llm, update_info).result()
        self.version = version

    def generate(self, prefixes: list[list[int]], k: int, n: int, greedy: bool = False,
                 seed: int | None = None) -> list[list[Rollout]]:
        return self._thread.submit(self._vllm.sample, self.llm, prefixes, k, n, temperature=self.cfg.temperature,
                                   top_p=self.cfg.top_p, greedy=greedy, seed=seed).result()


GENERATORS = {"hf": HFGenerator, "vllm": VLLMGenerator}


class RequestFailed(RuntimeError):
    """A judge or rewriter request failed on every try; the message names the deployment."""


class RolloutWorker:
    def __init__(self, cfg: SipConfig, tokenizer_dir: str, worker_id: int, apps: dict[str, str]):
        """`apps`: the Serve app names of this run's judge and rewriter ("judge", "rewriter" keys)."""
        from transformers import AutoTokenizer

        torch.set_num_threads(cfg.policy.torch_threads)
        self.cfg = cfg
        self.sources = cfg.train.candidates
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.engine: GenerationBackend | None = None
        if "rollout" in self.sources:
            self.engine = GENERATORS[cfg.rollout.backend](cfg, self.tokenizer, worker_id)
        self.weight_sync = make_weight_sync(cfg)
        self._engine_lock = asyncio.Lock()
        self.apps = apps
        self.judge = self.rewriter = None
        self.reference = None  # train.reference_logprobs=rollout_worker: the DPO reference, loaded from the first batch
        self.metrics = RolloutMetrics(run_tags(cfg), worker_id)

    def _handles(self) -> None:
        from ray import serve

        if self.judge is None and self.cfg.needs_judge:
            self.judge = serve.get_app_handle(self.apps["judge"])
        if self.rewriter is None and self.cfg.needs_rewriter:
            self.rewriter = serve.get_app_handle(self.apps["rewriter"])

    async def join_weight_channel(self, info: dict) -> None:
        """A weight transport that pushes: join the learner's channel (the learner waits for every worker)."""
        await asyncio.get_running_loop().run_in_executor(None, self.weight_sync.join, self.engine, info)

    async def take_weights(self, info: dict, version: int) -> None:
        """A weight transport that pushes: take the learner's push of `version`, between two generations."""
        async with self._engine_lock:
            await asyncio.get_running_loop().run_in_executor(None, self.weight_sync.receive, self.engine, info, version)

    async def episode(self, batch: Batch) -> JudgedBatch:
        """The batch's candidates, judged; an episode that fails returns its error instead of raising."""
        self._handles()
        try:
            return await self._judged(batch)
        except Exception as err:  # noqa: BLE001 — the driver decides: it feeds the batch again
            return JudgedBatch(index=batch.index, attempt=batch.attempt, judged=[], error=f"{type(err).__name__}: {err}")

    async def _request(self, app: str, make_call, retries: Counter):
        """One Serve request with a timeout, tried again with doubling backoff after a failure or a hang."""
        p = self.cfg.pipeline
        problem = ""
        for attempt in range(p.request_retries + 1):
            if attempt:
                retries[app] += 1
                await asyncio.sleep(p.retry_backoff_s * 2 ** (attempt - 1))
            try:
                return await asyncio.wait_for(make_call(), p.request_timeout_s)
            except asyncio.TimeoutError:
                problem = f"no answer within pipeline.request_timeout_s={p.request_timeout_s:g}s"
            except Exception as err:  # noqa: BLE001 — a replica that died mid-request, an overloaded one, ...
                problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise RequestFailed(f"the {app} deployment ({self.apps[app]}) failed {p.request_retries + 1} tries; last: {problem}")

    async def _judged(self, batch: Batch) -> JudgedBatch:
        start = time.perf_counter()
        samples = batch.samples
        passages = [Passage(s.prefix, s.suffix, s.truth) for s in samples]
        retries: Counter = Counter()
        stages: dict[str, float] = {}
        rewrites = asyncio.ensure_future(self._rewrites(passages, retries, stages)) if self.rewriter else None
        rollouts, version = await self._rollouts(batch, stages) if self.engine else ([[] for _ in samples], None)
        rewrite_texts = await rewrites if rewrites else []

        candidates, rewrite_failures = candidates_for(self.sources, self.tokenizer, self.cfg.data.suffix_tokens, samples,
                                                      rollouts, version, rewrite_texts)
        result = JudgedBatch(index=batch.index, attempt=batch.attempt, judged=[], rewrite_failures=rewrite_failures)
        if self.judge is None:
            result.judged = [JudgedSample(s, c, reward=[1.0] * len(c)) for s, c in zip(samples, candidates)]
        else:
            judge_start = time.perf_counter()
            tasks = judge_tasks(passages, candidates, self.cfg.judge.pivot, self.cfg.objective.needs_rejected)
            verdicts: list[JudgeResult] = await asyncio.gather(*(
                self._request("judge", lambda t=t: self.metrics.judge_call(self.judge.score.remote(t)), retries) for t in tasks
            ))
            for sample, cands, v in zip(samples, candidates, verdicts):
                result.judged.append(JudgedSample(sample, cands, reward=v.reward, scores=v.scores, complete=v.complete))
                result.judge_calls += v.calls
                result.judge_comparisons += v.comparisons
                result.judge_round_robin_comparisons += v.round_robin_comparisons
                result.judge_failures += v.failures
                result.judge_failure_example = v.failure_example or result.judge_failure_example
            stages["judge"] = time.perf_counter() - judge_start
        if batch.reference is not None:
            reference_start = time.perf_counter()
            await self._reference_logprobs(batch.reference, result.judged)
            stages["reference"] = time.perf_counter() - reference_start
        result.request_retries = dict(retries)
        stages["episode"] = time.perf_counter() - start
        result.stage_seconds = stages
        return result

    async def _reference_logprobs(self, reference: tuple, judged: list[JudgedSample]) -> None:
        loop = asyncio.get_running_loop()
        if self.reference is None:
            weights = await reference[0]
            model = build_policy(self.cfg.policy, self.tokenizer, self.cfg.run.seed, self.cfg.data.max_seq_tokens).eval()
            await loop.run_in_executor(None, load_wire, model, weights)
            self.reference = model
        await loop.run_in_executor(None, attach_reference_logprobs, self.reference, judged, self.cfg.objective,
                                   self.cfg.run.seed, self.tokenizer.pad_token_id)

    async def _rewrites(self, passages: list[Passage], retries: Counter, stages: dict) -> list[str]:
        start = time.perf_counter()
        texts = await asyncio.gather(*(
            self._request("rewriter", lambda p=p: self.metrics.rewriter_call(self.rewriter.rewrite.remote(p)), retries)
            for p in passages
        ))
        stages["rewrite"] = time.perf_counter() - start
        return list(texts)

    async def _rollouts(self, batch: Batch, stages: dict) -> tuple[list[list[Rollout]], int]:
        """The batch's rollouts and the policy version that wrote them."""
        async with self._engine_lock:
            start = time.perf_counter()
            await self.weight_sync.apply(self.engine, batch.weight_update)
            stages["weights"] = time.perf_counter() - start
            if self.engine.version < batch.weight_update.version:  # the batch's staleness bound assumes at least this version
                raise RuntimeError(f"batch {batch.index} needs policy version {batch.weight_update.version}, "
                                   f"the engine holds {self.engine.version}")
            prefixes = [s.prefix_ids for s in batch.samples]
            n, k = self.cfg.data.suffix_tokens, self.cfg.rollout.k
            seed = self.cfg.run.seed * 1_000_003 + batch.index  # the same batch samples the same rollouts on any worker
            start = time.perf_counter()
            rollouts = await asyncio.get_running_loop().run_in_executor(None, self.engine.generate, prefixes, k, n, False, seed)
            stages["generate"] = time.perf_counter() - start
            self.metrics.generated(sum(len(r.ids) for group in rollouts for r in group), stages["generate"])
            return rollouts, self.engine.version


def candidates_for(sources: list[str], tokenizer, n: int, samples: list[Sample], rollouts: list[list[Rollout]],
                   version: int | None, rewrite_texts: list[str]) -> tuple[list[list[Candidate]], int]:
    """Each sample's candidates, in `sources` order (rollouts last), and how many rewrites came back
    empty (their candidate is left out)."""
    failures = 0
    out = []
    for i, sample in enumerate(samples):
        cands = []
        if "suffix" in sources:
            cands.append(Candidate("suffix", sample.suffix_ids, sample.suffix))
        if "rewrite" in sources:
            ids = tokenizer.encode(rewrite_texts[i], add_special_tokens=False)[:n]
            if ids:
                cands.append(Candidate("rewrite", ids, tokenizer.decode(ids)))
            else:
                failures += 1
        for r in rollouts[i]:
            cands.append(Candidate("rollout", r.ids, tokenizer.decode(r.ids), version, r.logprobs))
        out.append(cands)
    return out, failures


@torch.no_grad()
def attach_reference_logprobs(reference, judged: list[JudgedSample], objective, seed: int, pad_id: int) -> None:
    """Give the candidates the objective will choose and reject their summed log-probability under the
    reference, in place, so the learner's step need not compute them."""
    from sip.losses import target_logprobs

    picks = []
    for js in judged:
        if objective.skip_reason(js) is None:
            picks += [(js, i) for i in objective.pair(js, seed) if i is not None]
    if not picks:
        return
    logp, _ = target_logprobs(reference, [js.sample.prefix_ids for js, _ in picks], [js.candidates[i].ids for js, i in picks],
                              pad_id)
    for (js, i), value in zip(picks, logp.tolist()):
        js.candidates[i] = dataclasses.replace(js.candidates[i], reference_logprob=value)


def judge_tasks(passages: list[Passage], candidates: list[list[Candidate]], pivot: str,
                needs_worst: bool = True) -> list[JudgeTask]:
    """One judge request per sample; `pivot` names the candidate the pivot protocol compares against,
    `needs_worst` whether the objective rejects the worst candidate (the tournament skips its bottom playoff if not)."""
    return [JudgeTask(p, [c.text for c in cands], pivot=next((i for i, c in enumerate(cands) if c.source == pivot), None),
                      needs_worst=needs_worst)
            for p, cands in zip(passages, candidates)]
