"""What a run reports while it trains: Ray metrics for the dashboard, TensorBoard, and W&B.

Ray exports `ray.util.metrics` from every node's metrics endpoint (`ray start --metrics-export-port`)
with a `ray_` prefix; counters also get a `_total` suffix (`sip_steps` → `ray_sip_steps_total`).
Every series carries a `run` tag (`run.name`, by default the output folder's name) and a `run_id`
tag (`run.id`, new for every run). The driver
reports the per-step numbers (`StepMetrics`), each rollout worker its own generation speed and the
latency it sees from the judge and rewriter (`RolloutMetrics`). `RunLog` writes the per-step record
to TensorBoard and, when `run.wandb` is on, to Weights & Biases.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from numbers import Real
from pathlib import Path

from sip.config import SipConfig

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


def run_name(cfg: SipConfig) -> str:
    return cfg.run.name or Path(cfg.run.output_dir).resolve().name


def run_tags(cfg: SipConfig) -> dict[str, str]:
    """`run`: the name a person reads; `run_id`: unique per run, so two folders both called `run` never merge."""
    return {"run": run_name(cfg), "run_id": cfg.run.id or ""}


class StepMetrics:
    """Driver-side Ray metrics, updated once per optimizer step. `skipped`: the totals a resumed run
    starts from (its counters count this process's work only)."""

    def __init__(self, run_tags: dict[str, str], skipped: Counter):
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Gauge

        def counter(name: str, description: str, *tags: str) -> RayCounter:
            metric = RayCounter(name, description=description, tag_keys=(*run_tags, *tags))
            metric.set_default_tags(run_tags)
            return metric

        def gauge(name: str, description: str, *tags: str) -> Gauge:
            metric = Gauge(name, description=description, tag_keys=(*run_tags, *tags))
            metric.set_default_tags(run_tags)
            return metric

        self.steps = counter("sip_steps", "optimizer steps taken")
        self.samples_fed = counter("sip_samples_fed", "samples handed to the rollout workers")
        self.samples_judged = counter("sip_samples_judged", "samples that came back judged")
        self.samples_trained = counter("sip_samples_trained", "samples the learner trained on")
        self.samples_skipped = counter("sip_samples_skipped", "judged samples not trained on, by reason", "reason")
        self.judge_calls = counter("sip_judge_calls", "primitive judge verdicts asked for")
        self.judge_failures = counter("sip_judge_failures", "judge verdicts that could not be parsed")
        self.policy_version = gauge("sip_policy_version", "the learner's policy version")
        self.loss = gauge("sip_loss", "training loss of the last step")
        self.samples_per_s = gauge("sip_samples_per_s", "judged samples per second at the last step")
        self.chosen_rate = gauge("sip_chosen_rate", "share of trained samples whose chosen candidate came from a source", "source")
        self.judge_score = gauge("sip_judge_score", "mean judge reward of a source's candidates", "source")
        self.staleness = gauge("sip_staleness", "policy versions the last step's rollouts lagged the learner", "stat")
        self.queue_depth = gauge("sip_queue_depth", "batches waiting in a pipeline queue", "queue")
        self.judge_audit = gauge("sip_judge_audit", "the last judge audit: agreement with the reference judge", "measure")
        self._skipped_before = Counter(skipped)

    def record_step(self, record: dict, fed: int, judged: int, skipped: Counter) -> None:
        """`record` is the step's metrics.jsonl row, `fed`/`judged` the samples since the last step,
        `skipped` the run's running totals by reason."""
        self.steps.inc()
        _add(self.samples_fed, fed)
        _add(self.samples_judged, judged)
        _add(self.samples_trained, record["trained"])
        for reason, total in skipped.items():
            _add(self.samples_skipped, total - self._skipped_before[reason], {"reason": reason})
        self._skipped_before = Counter(skipped)
        _add(self.judge_calls, record["judge_calls"])
        _add(self.judge_failures, record["judge_failures"])
        self.policy_version.set(record["policy_version"])
        if "loss" in record:
            self.loss.set(record["loss"])
        self.samples_per_s.set(record["samples_per_s"])
        for source, rate in record["chosen_rate"].items():
            self.chosen_rate.set(rate, tags={"source": source})
        for source, score in record["judge_score"].items():
            self.judge_score.set(score, tags={"source": source})
        self.staleness.set(record["staleness_mean"], tags={"stat": "mean"})
        self.staleness.set(record["staleness_max"], tags={"stat": "max"})
        for queue, depth in record["queue_depth"].items():
            self.queue_depth.set(depth, tags={"queue": queue})
        for measure, value in record.get("judge_audit", {}).items():
            if value is not None:
                self.judge_audit.set(value, tags={"measure": measure})


def _add(counter, value: float, tags: dict | None = None) -> None:
    if value > 0:  # Ray counters reject increments of 0
        counter.inc(value, tags=tags)


class RolloutMetrics:
    """One rollout worker's generation speed and the latency of its judge and rewriter requests."""

    def __init__(self, run_tags: dict[str, str], worker_id: int):
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Gauge, Histogram

        tags = {**run_tags, "worker": str(worker_id)}
        self.tokens = RayCounter("sip_generated_tokens", description="rollout tokens generated", tag_keys=tuple(tags))
        self.tokens_per_s = Gauge("sip_generator_tokens_per_s", description="rollout tokens per second of the last batch",
                                  tag_keys=tuple(tags))
        self.judge = Histogram("sip_judge_latency_s", description="seconds from a judge request to its verdict",
                               boundaries=LATENCY_BOUNDARIES_S, tag_keys=tuple(tags))
        self.rewriter = Histogram("sip_rewriter_latency_s", description="seconds from a rewrite request to its answer",
                                  boundaries=LATENCY_BOUNDARIES_S, tag_keys=tuple(tags))
        for metric in (self.tokens, self.tokens_per_s, self.judge, self.rewriter):
            metric.set_default_tags(tags)

    def generated(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.tokens.inc(tokens)
            self.tokens_per_s.set(tokens / max(seconds, 1e-9))

    def judge_call(self, response) -> asyncio.Task:
        return _timed(response, self.judge)

    def rewriter_call(self, response) -> asyncio.Task:
        return _timed(response, self.rewriter)


def _timed(response, histogram) -> asyncio.Task:
    """A task that awaits a Serve response and records its latency; it starts now, so the time is
    right even when the caller awaits the task only after other work."""
    start = time.perf_counter()

    async def wait():
        result = await response
        histogram.observe(time.perf_counter() - start)
        return result

    return asyncio.ensure_future(wait())


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested record as `a/b` keys (what TensorBoard and W&B plot)."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, Real) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


class RunLog:
    """Per-step records to TensorBoard (`<output_dir>/tensorboard`) and, if enabled, to W&B."""

    def __init__(self, cfg: SipConfig, out: Path):
        self.tensorboard = self.wandb = None
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        if cfg.run.wandb:
            wandb = require_wandb()
            self.wandb = wandb.init(
                project=cfg.run.wandb_project, name=run_name(cfg), dir=str(out),
                config=cfg.model_dump(mode="json"),
            )

    def log(self, step: int, record: dict, prefix: str = "") -> None:
        flat = flatten(record, prefix)
        if self.tensorboard is not None:
            for key, value in flat.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError("run.wandb=true needs the wandb package: pip install 'sip[wandb]'") from None
    return wandb
