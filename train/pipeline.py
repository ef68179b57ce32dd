"""The training loop: stream → rollout workers (rewrite, rollouts, judge) → selection → learner group.

`run_training` reads top to bottom: check the inputs, join the cluster, start the roles, then one
step at a time until the run is done or asked to stop. A step is a chain of short parts: feed what
the staleness bound allows, collect the next judged batch in order, select, train, publish the new
weights, log, checkpoint. The scheduling rules and the sample accounting live in the ledger
(train/ledger.py); this module moves batches between the roles and decides what a fault costs:

- a rollout worker that dies is replaced, and the batches it held are fed again;
- a learner rank that dies takes the learner group with it: the group restarts from the newest
  checkpoint, every batch after it is fed again, and metrics.jsonl is cut back to it;
- after `run.max_failures` deaths of one role, or any fault the run cannot survive, it stops with
  a checkpoint where the learner can still write one, and says how to resume;
- SIGINT / SIGTERM (`ray job stop`) finish the step in hand, write a checkpoint and stop.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
import uuid
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path
from statistics import mean

from sip.actors.learner_group import LearnerDied, LearnerGroup
from sip.actors.rollout_pool import Lost, RolloutPool, RolloutWorkersExhausted
from sip.checkpoint import CheckpointError, check_resumable, resolve_resume
from sip.config import SipConfig, dump_config
from sip.train.data import DataError, check_policy_init, check_source
from sip.train.checkpoints import CheckpointManager, Tally
from sip.train.judge_audit import JudgeAudit
from sip.train.ledger import BatchLedger, Entry
from sip.records import SOURCES, Batch, JudgedBatch, TrainExample
from sip.serve.apps import check_prompts
from sip.train.run_lock import OutputLock, OutputLocked

log = logging.getLogger("sip.train")

# what a run writes into its output folder, and nothing else (run.overwrite deletes exactly these)
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "eval_samples.jsonl")
RUN_DIRS = ("checkpoints", "tensorboard", "tokenizer", "wandb")


class PipelineError(RuntimeError):
    """A stage failed or stopped answering, or an input cannot be used; the message names it."""


class RunStopped(PipelineError):
    """The run was asked to stop (SIGINT / SIGTERM) and left a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name


def run_training(cfg: SipConfig) -> dict:
    return TrainingRun(cfg).run()


class TrainingRun:
    def __init__(self, cfg: SipConfig):
        if cfg.run.id is None:
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"id": uuid.uuid4().hex[:8]})})
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.stop_signal: str | None = None
        self.resume: Path | None = None
        self.checkpoints: CheckpointManager | None = None
        self.pool: RolloutPool | None = None
        self.learner: LearnerGroup | None = None
        self.counters = Tally()  # judge calls and failures, rewrite failures, retried requests
        self.faults = Tally()  # learner restarts, rollout batches lost with their worker, failed episodes
        self.judge_window: deque[tuple[int, int]] = deque(maxlen=cfg.judge.failure_window)
        self.episode_errors: Counter = Counter()
        self.startup: dict[str, float] = {}  # seconds since the command started, at the end of each start-up phase

    def run(self) -> dict:
        from sip.resources import ClusterError
        from sip.train.cluster import cluster_session

        try:
            with OutputLock(self.out, self.cfg.run.id):
                self._check_inputs()
                self._mark("inputs_checked")
                with cluster_session(self.cfg, self.cfg.run.id, self._mark) as apps, self._stop_on_signals():
                    self.apps = apps
                    try:
                        self._prepare()
                        with self._outputs():
                            self._train()
                            return self._finish()
                    finally:
                        for role in (self.pool, self.learner):
                            if role is not None:
                                role.shutdown()
        except (ClusterError, DataError, OutputLocked) as err:
            raise PipelineError(str(err)) from None
        except (CheckpointError, LearnerDied) as err:  # a checkpoint not written (a full disk), a rank lost in setup
            raise PipelineError(f"{err}. {_resume_hint(self._last_checkpoint())}") from None

    def _mark(self, phase: str) -> None:
        import psutil

        self.startup[phase] = round(time.time() - psutil.Process().create_time(), 2)

    def _train(self) -> None:
        """Steps until the run is done or asked to stop, then the final checkpoint (a learner that dies
        while writing it is restarted from the one before, and the steps since are trained again)."""
        while True:
            while self.ledger.step < self.cfg.train.steps and not self.stop_signal:
                self._step()
            if self.stop_signal:
                self._stop()
            try:
                self.final_checkpoint = self.checkpoints.save()
                return
            except LearnerDied as err:
                self._recover_learner(err)

    # ---- before anything starts -----------------------------------------------------------------

    def _check_inputs(self) -> None:
        """Data files that exist and decode, a resume checkpoint that is whole and ours, and an output
        folder that holds no other run."""
        try:
            check_source(self.cfg.data)
            check_policy_init(self.cfg.policy)
            self.resume = resolve_resume(self.cfg)
            if self.resume:
                check_resumable(self.resume, self.cfg)
        except (CheckpointError, DataError) as err:
            raise PipelineError(str(err)) from None
        try:
            check_prompts(self.cfg)
        except ValueError as err:
            raise PipelineError(str(err)) from None
        previous = [name for name in ("config.yaml", "metrics.jsonl") if (self.out / name).exists()]
        continuing = self.resume is not None and self.out.resolve() in self.resume.resolve().parents
        if previous and not continuing:
            if not self.cfg.run.overwrite:
                raise PipelineError(
                    f"{self.out} already holds a run ({', '.join(previous)}). Continue it with run.resume_from=latest, "
                    "write this one elsewhere with --output-dir, or replace it with run.overwrite=true")
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
            for name in RUN_DIRS:
                shutil.rmtree(self.out / name, ignore_errors=True)

    # ---- starting the roles ---------------------------------------------------------------------

    def _prepare(self) -> None:
        from transformers import AutoTokenizer

        from sip.train.base import ensure_base
        from sip.train.cluster import wait_for_teachers
        from sip.train.data import Sampler, load_or_train_tokenizer
        from sip.train.evaluate import evaluate

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.base_info = None
        if self.resume is None and cfg.policy.init == "scratch" and cfg.base.steps > 0:
            base_folder, self.base_info = ensure_base(cfg)
            self._mark("base_ready")
            cfg = self.cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"init": str(base_folder)})})
        (self.out / "config.yaml").write_text(dump_config(cfg))
        self.tokenizer_dir = self.out / "tokenizer"
        if self.resume is not None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.resume)
            self.tokenizer.save_pretrained(self.tokenizer_dir)
        else:
            self.tokenizer = load_or_train_tokenizer(cfg.data, cfg.policy, self.tokenizer_dir)

        self._mark("tokenizer_ready")
        # every role starts at once: the workers' and the replicas' processes come up while the learner sets up
        self.pool = RolloutPool(cfg, str(self.tokenizer_dir), self.apps)
        self.learner = LearnerGroup(cfg, str(self.tokenizer_dir), self.resume)
        self._mark("learner_ready")
        self.learner.connect_generators(self.pool.actors)
        wait_for_teachers(cfg, self.apps)
        self._mark("deployments_ready")
        self.sampler = Sampler(cfg.data, self.tokenizer, (self.base_info or {}).get("sampler"))
        staleness = 0 if cfg.pipeline.mode == "sync" else cfg.pipeline.max_staleness
        self.ledger = BatchLedger(cfg.train.steps, staleness, self.learner.version, self.sampler.state_dict())
        self.checkpoints = CheckpointManager(cfg, self.out, self.learner, self.ledger, self.sampler, self.counters,
                                             self.faults, self.resume)
        self.checkpoints.load(self.learner.extra)
        self.initial_eval = (evaluate(cfg, self.learner, self.tokenizer, self.apps["judge"])
                             if cfg.run.eval_at_end and self.resume is None else None)
        self.weight_update = self.learner.publish_weights()
        self.reference = self.learner.publish_reference()
        self._mark("first_weights_published")
        self.samples_at_start = self.ledger.trained + sum(self.ledger.skipped.values())
        self.audit = JudgeAudit(cfg) if cfg.judge.audit_every and cfg.needs_judge else None

    @contextmanager
    def _outputs(self):
        """metrics.jsonl (cut back to the resumed step), TensorBoard / W&B, Ray metrics, the progress bar."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from sip.metrics import RunLog, StepMetrics, run_tags

        try:
            self.run_log = RunLog(self.cfg, self.out)
        except ImportError as err:
            raise PipelineError(str(err)) from None
        self.step_metrics = StepMetrics(run_tags(self.cfg), self.ledger.skipped)
        self.fed_reported = self.ledger.fed + self.ledger.refed
        self._cut_metrics(self.ledger.step)
        self.progress = Progress(
            TextColumn("[bold]sip train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), disable=not self.cfg.run.progress,
        )
        self.train_start = self.last_step_end = time.perf_counter()
        try:
            with self.progress:
                self.bar = self.progress.add_task("train", total=self.cfg.train.steps, completed=self.ledger.step, status="")
                yield
        finally:
            self.metrics_file.close()
            self.run_log.close()

    def _cut_metrics(self, step: int) -> None:
        """Keep the metrics.jsonl rows up to `step` (a resume or a learner restart continues from there)."""
        path = self.out / "metrics.jsonl"
        rows = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
        self.metrics_file = open(path, "a")

    # ---- one step -------------------------------------------------------------------------------

    def _step(self) -> None:
        self._feed()
        try:
            entry = self._collect()
        except LearnerDied as err:  # found while a batch failed: the weights it was fed died with the learner
            self._recover_learner(err)
            return
        if entry is None:  # asked to stop while waiting
            return
        examples, record = self._select(entry.result)
        try:
            step_start = time.perf_counter()
            metrics = self.learner.train_step(examples)
            record["time_s"] = {"learner_step": time.perf_counter() - step_start}
            self.ledger.mark_trained(entry, len(examples), record.pop("skipped"))
            publish_start = time.perf_counter()
            self.weight_update = self.learner.publish_weights()
            record["time_s"]["publish"] = time.perf_counter() - publish_start
        except LearnerDied as err:
            self._recover_learner(err)
            return
        self._log(entry.result, record, metrics)
        if "first_step" not in self.startup:
            self._mark("first_step")
        try:
            self.checkpoints.save_if_due()
        except LearnerDied as err:
            self._recover_learner(err)

    def _feed(self) -> None:
        """Take new batches from the stream while the staleness bound allows, and hand out every batch waiting."""
        while self.ledger.wants_new_batch():
            try:
                samples = self.sampler.take(self.cfg.train.batch_size)
            except DataError as err:
                self._fail(str(err))
            if not samples:
                self._fail(f"the data stream ended after {self.sampler.read} documents")
            self.ledger.add(samples, self.sampler.state_dict())
        for entry in self.ledger.to_feed():
            attempt = self.ledger.mark_fed(entry)
            self.pool.submit(Batch(entry.index, entry.samples, self.weight_update, attempt, self.reference))

    def _collect(self) -> Entry | None:
        """Wait for the next batch in order; lost and failed batches are fed again meanwhile."""
        timeout = self.cfg.pipeline.timeout_s
        deadline = time.monotonic() + timeout
        wait_start = time.perf_counter()
        while (entry := self.ledger.next_to_train()) is None:
            if self.stop_signal:
                return None
            try:
                outcomes = self.pool.poll(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except RolloutWorkersExhausted as err:
                self._fail(str(err))
            for outcome in outcomes:
                deadline = time.monotonic() + timeout
                if isinstance(outcome, Lost):
                    if self.ledger.lost(outcome.index, outcome.attempt):
                        self.faults["rollout_batches_lost"] += 1
                        log.warning("batch %d lost (%s): feeding it again", outcome.index, outcome.reason)
                elif outcome.error:
                    self._episode_failed(outcome)
                elif not self.ledger.judged(outcome.index, outcome.attempt, outcome):
                    mismatches = self.ledger.mismatches(outcome.index)
                    if mismatches > self.cfg.run.max_failures:
                        self._fail(f"batch {outcome.index} came back holding other samples than it was fed "
                                   f"{mismatches} times (run.max_failures={self.cfg.run.max_failures})")
            self._feed()
            if time.monotonic() > deadline:
                from sip.resources import resource_report

                self._fail(f"no judged batch within pipeline.timeout_s={timeout:g}s "
                           f"({self.ledger.in_flight_batches()} batches with the rollout workers); {resource_report()}")
        self.wait_seconds = time.perf_counter() - wait_start
        return entry

    def _episode_failed(self, outcome: JudgedBatch) -> None:
        if not self.ledger.lost(outcome.index, outcome.attempt):
            return
        # A dead learner rank takes the weights the batch was fed with: that is the learner's fault, not the
        # batch's, and feeding it again before the learner restarts would only fail again.
        self.learner.check_alive()
        self.faults["failed_episodes"] += 1
        self.episode_errors[outcome.index] += 1
        if self.episode_errors[outcome.index] > self.cfg.run.max_failures:
            self._fail(f"batch {outcome.index} failed {self.episode_errors[outcome.index]} times "
                       f"(run.max_failures={self.cfg.run.max_failures}); last: {outcome.error}")
        log.warning("batch %d failed (%s): feeding it again", outcome.index, outcome.error)

    def _select(self, judged: JudgedBatch) -> tuple[list[TrainExample], dict]:
        """Training examples for one batch, and the per-step metrics that describe it."""
        objective, step = self.cfg.objective, self.ledger.step
        examples: list[TrainExample] = []
        skipped: Counter = Counter()
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
            reason = objective.skip_reason(js)
            if reason is None:
                examples.append(objective.select(js, self.cfg.run.seed))
            else:
                skipped[reason] += 1
        chosen = Counter(e.chosen_source for e in examples)
        self.counters.update(judge_calls=judged.judge_calls, judge_comparisons=judged.judge_comparisons,
                             judge_round_robin_comparisons=judged.judge_round_robin_comparisons,
                             judge_failures=judged.judge_failures,
                             rewrite_failures=judged.rewrite_failures)
        self.counters.update({f"retries_{app}": n for app, n in judged.request_retries.items()})
        record = {
            "trained": len(examples),
            "skipped": skipped,
            "chosen_rate": {s: chosen[s] / len(examples) if examples else 0.0 for s in SOURCES},
            "judge_score": {s: mean(v) for s, v in scores.items() if v},
            "staleness_mean": mean(staleness) if staleness else 0.0,
            "staleness_max": max(staleness, default=0),
            # mean log-probability of a rollout token under the policy that sampled it (falls as the policy sharpens)
            "rollout_logprob": mean(rollout_logprobs) if rollout_logprobs else None,
            "judge_calls": judged.judge_calls,
            "judge_comparisons": judged.judge_comparisons,
            "judge_round_robin_comparisons": judged.judge_round_robin_comparisons,
            "judge_failures": judged.judge_failures,
            "skipped_ties": skipped["tie"],
            "skipped_judge_failed": skipped["judge_failed"],
            "rewrite_failures": judged.rewrite_failures,
        }
        return examples, record

    def _log(self, judged: JudgedBatch, record: dict, metrics: dict) -> None:
        now = time.perf_counter()
        step = self.ledger.step
        wall = max(now - self.last_step_end, 1e-9)
        record.update(metrics)
        if self.audit is not None and self.audit.due(step):
            record["judge_audit"] = self.audit.measure(judged)
        record["time_s"].update({f"worker_{k}": round(v, 4) for k, v in judged.stage_seconds.items()})
        record["time_s"]["wait"] = self.wait_seconds
        record.update(step=step, samples_per_s=len(judged.judged) / wall, time=now - self.train_start,
                      learner_idle=max(0.0, 1 - record["time_s"]["learner_step"] / wall),
                      queue_depth={"with_workers": self.ledger.in_flight_batches(), "reorder": self.ledger.waiting_batches()})
        self.last_step_end = now
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        fed = self.ledger.fed + self.ledger.refed
        self.step_metrics.record_step(record, fed - self.fed_reported, len(judged.judged), self.ledger.skipped)
        self.fed_reported = fed
        self.run_log.log(step, record)
        self.progress.update(self.bar, completed=step, status=_status(record))
        self._check_judge_failures(judged)

    def _check_judge_failures(self, judged: JudgedBatch) -> None:
        self.judge_window.append((judged.judge_calls, judged.judge_failures))
        calls = sum(c for c, _ in self.judge_window)
        failures = sum(f for _, f in self.judge_window)
        limit = self.cfg.judge.max_failure_rate
        if calls and failures / calls > limit and len(self.judge_window) == self.judge_window.maxlen:
            example = judged.judge_failure_example
            self._fail(f"the judge ({self.cfg.judge.backend} backend, Serve app {self.apps['judge']}) gave no verdict for "
                       f"{failures} of {calls} judgments ({failures / calls:.0%}) over the last {len(self.judge_window)} "
                       f"steps, above judge.max_failure_rate={limit:g}"
                       + (f"; its last unparseable answer: {example!r}" if example else ""))

    # ---- faults, checkpoints, the end -----------------------------------------------------------

    def _recover_learner(self, err: Exception) -> None:
        """Go back to the newest checkpoint (again, if a rank dies during the restart)."""
        checkpoints = self.checkpoints
        where = (f"the checkpoint at step {checkpoints.last_step} ({checkpoints.last_path})" if checkpoints.last_path
                 else "the start of the run")
        while True:
            self.faults["learner_restarts"] += 1
            if self.faults["learner_restarts"] > self.cfg.run.max_failures:
                raise PipelineError(f"{err}; the learner has died {self.faults['learner_restarts']} times "
                                    f"(run.max_failures={self.cfg.run.max_failures}). " + _resume_hint(checkpoints.last_path))
            log.warning("%s: restarting the learner group from %s", err, where)
            try:
                step = checkpoints.roll_back()
                self.weight_update = self.learner.publish_weights()
                break
            except LearnerDied as again:
                err = again
        self.metrics_file.close()
        self._cut_metrics(step)

    def _last_checkpoint(self) -> Path | None:
        return self.checkpoints.last_path if self.checkpoints is not None else self.resume

    def _fail(self, message: str) -> None:
        """Stop the run: with a checkpoint of the current step if the learner can still write one."""
        try:
            checkpoint = self.checkpoints.save_if_behind()
        except (LearnerDied, CheckpointError) as err:
            message += f" (and no checkpoint of step {self.ledger.step} could be written: {err})"
            checkpoint = self.checkpoints.last_path
        raise PipelineError(f"{message}. {_resume_hint(checkpoint)}")

    @contextmanager
    def _stop_on_signals(self):
        """SIGINT and SIGTERM ask the run to stop after the step in hand; a second one stops it at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def ask_to_stop(signum, _frame):
            self.stop_signal = signal.Signals(signum).name
            log.warning("%s: finishing the step in hand, then writing a checkpoint (send it again to stop at once)",
                        self.stop_signal)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        for sig in previous:
            signal.signal(sig, ask_to_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self) -> None:
        message = f"stopped by {self.stop_signal} at step {self.ledger.step} of {self.cfg.train.steps}"
        try:
            checkpoint = self.checkpoints.save()
        except (LearnerDied, CheckpointError) as err:
            message += f"; its checkpoint could not be written ({err})"
            checkpoint = self.checkpoints.last_path
        raise RunStopped(f"{message}. {_resume_hint(checkpoint)}", self.stop_signal)

    def _finish(self) -> dict:
        from sip.train.evaluate import evaluate
        from sip.train.plots import plot_run

        cfg, out = self.cfg, self.out
        train_seconds = time.perf_counter() - self.train_start
        checkpoint = self.final_checkpoint
        counts = self.ledger.counts()
        judged_now = counts["trained"] + sum(counts["skipped"].values()) - self.samples_at_start
        summary = {
            "run_id": cfg.run.id,
            "steps": self.ledger.step,
            "policy_version": self.learner.version,
            "objective": cfg.train.objective,
            "mode": cfg.pipeline.mode,
            "num_learners": cfg.train.num_learners,
            "train_seconds": round(train_seconds, 2),
            "samples_per_s": round(judged_now / train_seconds, 3),
            "samples": {"documents_read": self.sampler.read, "documents_skipped": dict(self.sampler.skipped), **counts},
            "startup_s": self.startup,
            "restarts": {"learner": self.faults["learner_restarts"], "rollout": sum(self.pool.restarts.values())},
            "faults": dict(self.faults),
            "judge_calls": self.counters["judge_calls"],
            "judge_comparisons": self.counters["judge_comparisons"],
            "judge_round_robin_comparisons": self.counters["judge_round_robin_comparisons"],
            "judge_failures": self.counters["judge_failures"],
            "rewrite_failures": self.counters["rewrite_failures"],
            "request_retries": {k.removeprefix("retries_"): v for k, v in self.counters.items() if k.startswith("retries_")},
            "apps": self.apps,
            "final": _final_metrics(out / "metrics.jsonl"),
            "checkpoint": str(checkpoint),
        }
        plot_run(out / "metrics.jsonl", out / "curves.png")
        if self.base_info is not None:
            summary["base"] = {"folder": cfg.policy.init, **{k: v for k, v in self.base_info.items() if k != "sampler"}}
        if cfg.run.eval_at_end:
            try:
                summary["eval"] = evaluate(cfg, self.learner, self.tokenizer, self.apps["judge"], out)
            except LearnerDied as err:
                raise PipelineError(f"{err} during the final evaluation. Training finished: the model is in {checkpoint}; "
                                    f"evaluate it with `sip eval --model {checkpoint}`") from None
            self.run_log.log(self.ledger.step, summary["eval"], prefix="eval/")
            if self.initial_eval is not None:
                summary["eval_initial"] = self.initial_eval
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _resume_hint(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "No checkpoint was written yet: start the run again."
    return f"Resume with the same command and run.resume_from={checkpoint}"


def _status(record: dict) -> str:
    parts = [f"loss {record.get('loss', float('nan')):.3f}"]
    if "reward_margin" in record:
        parts.append(f"margin {record['reward_margin']:.2f}")
    parts.append(f"rollout chosen {record['chosen_rate']['rollout']:.2f}")
    parts.append(f"{record['samples_per_s']:.1f} samples/s")
    return " | ".join(parts)


def _final_metrics(path: Path, window: int = 20) -> dict:
    """Means over the last `window` steps of the scalar metrics and chosen rates."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][-window:]
    if not rows:
        return {}
    final: dict = {}
    for key in ("loss", "nll", "reward_margin", "preference_accuracy", "staleness_mean", "samples_per_s", "learner_idle"):
        values = [r[key] for r in rows if key in r]
        if values:
            final[key] = round(mean(values), 4)
    final["chosen_rate"] = {s: round(mean(r["chosen_rate"][s] for r in rows), 4) for s in SOURCES}
    return final

