"""The training loop: stream → generators (rollouts, rewrite, judge) → selection → learner.

The driver feeds numbered sample batches into a bounded queue, rollout workers put judged batches
into a second one, and the driver trains on them strictly in feeding order. Batch i is fed only
once the learner has reached version i - max_staleness, and carries the newest weights, so every
rollout trained at step i was written by a policy at most `max_staleness` versions old. Sync mode
is the same code with max_staleness = 0: each batch is generated, judged and trained alone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from statistics import mean

from sip.train.config import SipConfig, dump_config
from sip.train.records import SOURCES, Batch, JudgedBatch, TrainExample
from sip.train.selection import select


class PipelineError(RuntimeError):
    """A stage failed or stopped answering; the message names it."""


def prepare_ray_env() -> None:
    """Local clusters here run without token auth or usage reporting (no outside network)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def init_ray(cfg: SipConfig) -> bool:
    """Join RAY_ADDRESS / run.ray_address, or start a local cluster. Returns True if we started it."""
    prepare_ray_env()
    import ray

    if ray.is_initialized():
        return False
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(address="local", num_cpus=cfg.run.num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def check_resources(cfg: SipConfig) -> None:
    """Fail before deploying anything if the actors cannot all be placed (Serve would wait forever)."""
    import ray

    from sip.serve.apps import replica_range

    need = cfg.train.num_cpus + cfg.rollout.num_generators * cfg.rollout.num_cpus
    if not cfg.judge.attach:
        need += replica_range(cfg.judge)[0] * cfg.judge.num_cpus
    if cfg.needs_rewriter and not cfg.rewriter.attach:
        need += replica_range(cfg.rewriter)[0] * cfg.rewriter.num_cpus
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise PipelineError(
            f"the run needs {need:g} CPUs (train.num_cpus, rollout.num_generators x rollout.num_cpus, "
            f"judge/rewriter replicas x num_cpus) but the cluster has {have:g}: lower those or raise run.num_cpus"
        )


def deploy_teachers(cfg: SipConfig) -> list[str]:
    """Start the judge (always: evaluation uses it) and, when rewrites are candidates, the rewriter.

    An app whose section sets `attach` is not started: the run checks that the long-lived app of
    that name (`sip serve`) runs with the same settings, and uses it. Returns the apps it started.
    """
    from ray import serve

    from sip.serve.apps import SECTIONS, app_names, attach_problems
    from sip.serve.judge import JUDGE_APP, judge_app
    from sip.serve.rewriter import REWRITER_APP, rewriter_app

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    builders = {JUDGE_APP: lambda: judge_app(cfg.judge, cfg.data), REWRITER_APP: lambda: rewriter_app(cfg.rewriter, cfg.data)}
    started = []
    for name in app_names(cfg):
        if getattr(cfg, SECTIONS[name]).attach:
            problems = attach_problems(name, cfg, cfg.pipeline.timeout_s)
            if problems:
                raise PipelineError("\n  ".join(problems))
            continue
        if not started:
            serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
        serve.run(builders[name](), name=name, route_prefix=None)
        started.append(name)
    return started


class Tally:
    """Where every judged sample went: trained, or skipped (and why). The sampler counts the rest."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.skipped = Counter(state.get("skipped", {}))
        self.counts = Counter(state.get("counts", {}))

    def state(self) -> dict:
        return {"skipped": dict(self.skipped), "counts": dict(self.counts)}


def run_training(cfg: SipConfig) -> dict:
    import ray
    from ray.util.queue import Empty, Queue
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoTokenizer

    from sip.actors.generator import RolloutWorker
    from sip.actors.learner import Learner
    from sip.train.base import ensure_base
    from sip.train.data import Sampler, load_or_train_tokenizer
    from sip.train.evaluate import evaluate
    from sip.train.metrics import RunLog, StepMetrics, run_name
    from sip.train.plots import plot_run

    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    try:
        run_log = RunLog(cfg, out)
    except ImportError as err:
        raise PipelineError(str(err)) from None
    started_cluster = init_ray(cfg)
    apps: list[str] = []
    try:
        check_resources(cfg)
        base_info = None
        if cfg.policy.init == "scratch" and cfg.base.steps > 0:
            base_folder, base_info = ensure_base(cfg)
            cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"init": str(base_folder)})})
        tokenizer_dir = out / "tokenizer"
        if cfg.run.resume_from is not None:
            tokenizer = AutoTokenizer.from_pretrained(cfg.run.resume_from)
            tokenizer.save_pretrained(tokenizer_dir)
        else:
            tokenizer = load_or_train_tokenizer(cfg.data, cfg.policy, tokenizer_dir)
        apps = deploy_teachers(cfg)
        timeout = cfg.pipeline.timeout_s
        learner = (
            ray.remote(Learner).options(num_cpus=cfg.train.num_cpus, num_gpus=cfg.train.num_gpus).remote(cfg, str(tokenizer_dir))
        )
        step, resumed = ray.get(learner.resumed_state.remote(), timeout=timeout)
        tally = Tally(resumed.get("tally"))
        initial_eval = evaluate(cfg, learner, tokenizer) if cfg.run.eval_at_end and cfg.run.resume_from is None else None
        sampler = Sampler(cfg.data, tokenizer, resumed.get("sampler") or (base_info or {}).get("sampler"))
        staleness_bound = 0 if cfg.pipeline.mode == "sync" else cfg.pipeline.max_staleness
        queue_options = {"num_cpus": 0}
        samples_q = Queue(maxsize=cfg.pipeline.queue_size, actor_options=queue_options)
        judged_q = Queue(maxsize=cfg.pipeline.queue_size + staleness_bound + 1, actor_options=queue_options)
        workers = [
            ray.remote(RolloutWorker)
            .options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus)
            .remote(cfg, str(tokenizer_dir), i)
            for i in range(cfg.rollout.num_generators)
        ]
        if cfg.rollout.weight_sync == "nccl":
            ray.get(learner.connect_generators.remote(workers), timeout=timeout)

        def publish_weights() -> list:
            """The weights batches will carry: an object-store reference, or none after an NCCL broadcast."""
            if cfg.rollout.weight_sync == "nccl":
                ray.get(learner.broadcast_weights.remote(), timeout=timeout)
                return []
            return [learner.weights.remote()]

        worker_runs = [w.run.remote(samples_q, judged_q) for w in workers]
        weights = publish_weights()
        weights_version = step
        fed = step
        sampler_states: dict[int, dict] = {step - 1: sampler.state()}
        pending: dict[int, JudgedBatch] = {}
        train_start = last = time.perf_counter()
        judged_before = tally.counts["samples_judged"]
        step_metrics = StepMetrics(run_name(cfg), tally.skipped)

        samples_fed = fed_reported = 0

        def feed() -> None:
            nonlocal fed, samples_fed
            while fed < cfg.train.steps and fed <= step + staleness_bound:
                samples = sampler.take(cfg.train.batch_size)
                if not samples:
                    raise PipelineError(f"the data stream ended after {sampler.read} documents")
                sampler_states[fed] = sampler.state()
                samples_fed += len(samples)
                samples_q.put(Batch(fed, samples, weights_version, weights), timeout=timeout)
                fed += 1

        def next_judged(index: int) -> JudgedBatch:
            while index not in pending:
                try:
                    batch: JudgedBatch = judged_q.get(timeout=timeout)
                except Empty:
                    finished, _ = ray.wait(worker_runs, timeout=0)
                    ray.get(finished)  # a worker that stopped early raises its error here
                    raise PipelineError(f"no judged batch within pipeline.timeout_s={timeout:g}s") from None
                if batch.error:
                    raise PipelineError(f"rollout worker failed on batch {batch.index}: {batch.error}")
                pending[batch.index] = batch
            return pending.pop(index)

        progress = Progress(
            TextColumn("[bold]sip train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), disable=not cfg.run.progress,
        )
        with progress, open(out / "metrics.jsonl", "a" if cfg.run.resume_from else "w") as metrics_file:
            bar = progress.add_task("train", total=cfg.train.steps, completed=step, status="")
            while step < cfg.train.steps:
                feed()
                judged = next_judged(step)
                depths = {"samples": _queue_depth(samples_q, timeout), "judged": _queue_depth(judged_q, timeout), "reorder": len(pending)}
                examples, record = _examples_and_stats(cfg, judged, step, tally)
                metrics = ray.get(learner.train_step.remote(examples), timeout=timeout)
                step += 1
                weights, weights_version = publish_weights(), step
                now = time.perf_counter()
                record.update(metrics)
                record.update(step=step, samples_per_s=len(judged.judged) / max(now - last, 1e-9), time_s=now - train_start,
                              queue_depth=depths)
                last = now
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                step_metrics.record_step(record, samples_fed - fed_reported, len(judged.judged), tally.skipped)
                fed_reported = samples_fed
                run_log.log(step, record)
                progress.update(bar, completed=step, status=_status(record))
                if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 and step < cfg.train.steps:
                    _checkpoint(learner, out, step, sampler_states.pop(step - 1), tally, timeout)
        for _ in workers:
            samples_q.put(None, timeout=timeout)
        ray.get(worker_runs, timeout=timeout)
        train_seconds = time.perf_counter() - train_start
        checkpoint = _checkpoint(learner, out, step, sampler.state(), tally, timeout)
        summary = {
            "steps": step,
            "policy_version": step,
            "objective": cfg.train.objective,
            "mode": cfg.pipeline.mode,
            "train_seconds": round(train_seconds, 2),
            "samples_per_s": round((tally.counts["samples_judged"] - judged_before) / train_seconds, 3),
            "samples": {
                "documents_read": sampler.read,
                "documents_skipped": dict(sampler.skipped),
                "judged": tally.counts["samples_judged"],
                "trained": tally.counts["trained"],
                "skipped": dict(tally.skipped),
                "in_flight": samples_fed - (tally.counts["samples_judged"] - judged_before),
            },
            "judge_calls": tally.counts["judge_calls"],
            "judge_failures": tally.counts["judge_failures"],
            "final": _final_metrics(out / "metrics.jsonl"),
            "checkpoint": checkpoint,
        }
        plot_run(out / "metrics.jsonl", out / "curves.png")
        if base_info is not None:
            summary["base"] = {"folder": cfg.policy.init, **{k: v for k, v in base_info.items() if k != "sampler"}}
        if cfg.run.eval_at_end:
            summary["eval"] = evaluate(cfg, learner, tokenizer, out)
            run_log.log(step, summary["eval"], prefix="eval/")
            if initial_eval is not None:
                summary["eval_initial"] = initial_eval
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        run_log.close()
        if apps:
            from ray import serve

            for name in apps:
                serve.delete(name)
        if started_cluster:
            ray.shutdown()


def _examples_and_stats(cfg: SipConfig, judged: JudgedBatch, step: int, tally: Tally) -> tuple[list[TrainExample], dict]:
    """Selection for one batch, and the per-step metrics that describe it."""
    examples: list[TrainExample] = []
    ties = empty = 0
    scores: dict[str, list[float]] = {s: [] for s in SOURCES}
    staleness: list[int] = []
    rollout_logprobs: list[float] = []
    for js in judged.judged:
        for cand, reward in zip(js.candidates, js.reward):
            scores[cand.source].append(reward)
            if cand.version is not None:
                staleness.append(step - cand.version)
            if cand.logprobs:
                rollout_logprobs.extend(cand.logprobs)
        if not js.candidates:
            empty += 1
            continue
        example = select(js, cfg.train.objective, cfg.run.seed)
        if example is None:
            ties += 1
        else:
            examples.append(example)
    chosen = Counter(e.chosen_source for e in examples)
    tally.counts["samples_judged"] += len(judged.judged)
    tally.counts["trained"] += len(examples)
    tally.counts["judge_calls"] += judged.judge_calls
    tally.counts["judge_failures"] += judged.judge_failures
    tally.skipped["tie"] += ties
    tally.skipped["no_candidate"] += empty
    tally.skipped["rewrite_failed"] += judged.rewrite_failures
    record = {
        "trained": len(examples),
        "chosen_rate": {s: chosen[s] / len(examples) if examples else 0.0 for s in SOURCES},
        "judge_score": {s: mean(v) for s, v in scores.items() if v},
        "staleness_mean": mean(staleness) if staleness else 0.0,
        "staleness_max": max(staleness, default=0),
        # mean log-probability of a rollout token under the policy that sampled it (falls as the policy sharpens)
        "rollout_logprob": mean(rollout_logprobs) if rollout_logprobs else None,
        "judge_calls": judged.judge_calls,
        "judge_failures": judged.judge_failures,
        "judge_parse_failures": judged.judge_failures,  # judgments dropped: no parseable verdict after retries
        "skipped_ties": ties,
        "worker_seconds": judged.worker_seconds,
    }
    return examples, record


def _queue_depth(queue, timeout: float) -> int:
    import ray

    return ray.get(queue.actor.qsize.remote(), timeout=timeout)


def _status(record: dict) -> str:
    parts = [f"loss {record.get('loss', float('nan')):.3f}"]
    if "reward_margin" in record:
        parts.append(f"margin {record['reward_margin']:.2f}")
    parts.append(f"rollout chosen {record['chosen_rate']['rollout']:.2f}")
    parts.append(f"{record['samples_per_s']:.1f} samples/s")
    return " | ".join(parts)


def _checkpoint(learner, out: Path, step: int, sampler_state: dict, tally: Tally, timeout: float) -> str:
    """Policy, optimizer, version, and the stream position after the last trained batch (never queues)."""
    import ray

    path = out / "checkpoints" / f"step_{step:06d}"
    extra = {"sampler": sampler_state, "tally": tally.state()}
    return ray.get(learner.save.remote(str(path), extra), timeout=timeout)


def _final_metrics(path: Path, window: int = 20) -> dict:
    """Means over the last `window` steps of the scalar metrics and chosen rates."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][-window:]
    if not rows:
        return {}
    final: dict = {}
    for key in ("loss", "nll", "reward_margin", "preference_accuracy", "staleness_mean", "samples_per_s"):
        values = [r[key] for r in rows if key in r]
        if values:
            final[key] = round(mean(values), 4)
    final["chosen_rate"] = {s: round(mean(r["chosen_rate"][s] for r in rows), 4) for s in SOURCES}
    return final
