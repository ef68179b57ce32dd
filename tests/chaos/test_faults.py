"""Real faults in real runs: processes killed with SIGKILL by their PID, a replica frozen with SIGSTOP,
and a run stopped with SIGTERM and resumed. Each run must finish with every sample accounted for."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from sip.config import load_config
from sip.train.pipeline import run_training
from helpers import TINY

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.chaos, pytest.mark.filterwarnings("ignore")]

REPO = Path(__file__).resolve().parents[2]
# rollouts long enough that a worker nearly always holds a batch when it is killed
BUSY = TINY + ["rollout.k=4", "data.suffix_tokens=16", "run.eval_at_end=false", "run.checkpoint_every=3"]


def role_processes(title: str) -> list[psutil.Process]:
    """This test's Ray worker processes whose title starts with `ray::<title>` (all are our descendants)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith(f"ray::{title}"):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def steps_written(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def run_with_fault(out: Path, overrides: list[str], after_step: int, fault) -> dict:
    """Train in a thread; once `after_step` steps are written, call `fault()`; return the summary."""
    result: dict = {}

    def train():
        try:
            result["summary"] = run_training(load_config(None, BUSY + overrides + [f"run.output_dir={out}"]))
        except BaseException as err:  # noqa: BLE001 — reported by the assertion below
            result["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 180
    while len(steps_written(out)) < after_step:
        assert thread.is_alive(), f"the run ended before the fault: {result.get('error')!r}"
        assert time.monotonic() < deadline, "the run did not reach the fault step"
        time.sleep(0.1)
    fault()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not finish after the fault"
    assert "error" not in result, f"the run failed: {result['error']!r}"
    return result["summary"]


def assert_accounted(summary: dict, steps: int, batch: int = 4) -> None:
    counts = summary["samples"]
    assert summary["steps"] == steps
    assert counts["lost"] == 0 and counts["in_flight"] == 0
    assert counts["fed"] == steps * batch == counts["trained"] + sum(counts["skipped"].values())


def kill(title: str) -> None:
    victims = role_processes(title)
    assert victims, f"no running ray::{title} process"
    os.kill(victims[0].pid, signal.SIGKILL)


@pytest.mark.parametrize("generators", [1, 2])
def test_a_killed_rollout_worker_is_replaced_and_its_batches_fed_again(tmp_path, generators):
    out = tmp_path / "run"
    summary = run_with_fault(out, ["train.steps=10", f"rollout.num_generators={generators}"], 3,
                             lambda: kill("RolloutWorker"))
    assert_accounted(summary, 10)
    assert summary["restarts"] == {"learner": 0, "rollout": 1}
    assert summary["samples"]["refed"] >= 4, "the batch the worker held was fed again"
    assert summary["faults"]["rollout_batches_lost"] >= 1
    assert steps_written(out) == list(range(1, 11))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["staleness_max"] <= 1 for r in rows), "a re-fed batch stays within the staleness bound"


@pytest.mark.parametrize("learners", [1, pytest.param(2, marks=pytest.mark.multirank)])
def test_a_killed_learner_rank_restarts_the_group_from_the_newest_checkpoint(tmp_path, learners):
    out = tmp_path / "run"
    summary = run_with_fault(out, ["train.steps=9", f"train.num_learners={learners}"], 4, lambda: kill("LearnerRank"))
    assert_accounted(summary, 9)
    assert summary["restarts"]["learner"] == 1
    assert summary["samples"]["refed"] >= 4, "the batches after the checkpoint were fed again"
    assert steps_written(out) == list(range(1, 10)), "metrics.jsonl was cut back to the checkpoint: no step twice"


@pytest.mark.parametrize("checkpoint_every", [1, 0], ids=["periodic", "final"])
def test_a_learner_rank_killed_while_it_writes_a_checkpoint_is_restarted(tmp_path, checkpoint_every):
    out, steps = tmp_path / "run", 8

    def writing() -> bool:
        folder = out / "checkpoints"
        return folder.exists() and any(folder.glob(".step_*.partial"))

    def kill_mid_checkpoint():
        deadline = time.monotonic() + 120
        while not writing():
            assert time.monotonic() < deadline, "no checkpoint was being written"
            time.sleep(0.002)
        kill("LearnerRank")

    after = 2 if checkpoint_every else steps - 1
    summary = run_with_fault(out, [f"train.steps={steps}", f"run.checkpoint_every={checkpoint_every}"], after,
                             kill_mid_checkpoint)
    assert_accounted(summary, steps)
    assert summary["restarts"]["learner"] == 1
    assert steps_written(out) == list(range(1, steps + 1)), "no step written twice"
    assert not list((out / "checkpoints").glob(".*.partial")), "the interrupted checkpoint's folder is removed"


def test_a_judge_replica_killed_mid_run_is_survived_by_retrying(tmp_path):
    out = tmp_path / "run"
    summary = run_with_fault(out, ["train.steps=10", "pipeline.request_retries=6", "pipeline.retry_backoff_s=0.5"], 3,
                             lambda: kill("ServeReplica:sip-judge"))
    assert_accounted(summary, 10)
    assert summary["restarts"] == {"learner": 0, "rollout": 0}


def test_a_hung_judge_replica_is_cut_by_the_request_timeout(tmp_path):
    out = tmp_path / "run"
    frozen: list[psutil.Process] = []

    def freeze():
        frozen.extend(role_processes("ServeReplica:sip-judge")[:1])
        frozen[0].suspend()  # SIGSTOP: alive, holding its requests, answering nothing

    try:
        summary = run_with_fault(out, ["train.steps=8", "judge.num_replicas=2", "pipeline.request_timeout_s=3",
                                       "pipeline.request_retries=4", "pipeline.retry_backoff_s=0.5"], 3, freeze)
    finally:
        for proc in frozen:
            try:
                proc.resume()
            except psutil.NoSuchProcess:
                pass
    assert_accounted(summary, 8)
    assert summary["request_retries"].get("judge", 0) >= 1


def sip_train(args: list[str], out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "sip.train", "train", *args, f"--output-dir={out}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


KEYS = ("step", "loss", "nll", "reward_margin", "preference_accuracy", "chosen_rate", "judge_score", "trained", "lr", "grad_norm")


def test_sigterm_leaves_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    args = TINY + ["train.steps=8", "pipeline.mode=sync", "run.eval_at_end=false", "run.checkpoint_every=0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    stopped = sip_train(args, parts)
    deadline = time.monotonic() + 180
    while len(steps_written(parts)) < 3:
        assert stopped.poll() is None, stopped.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 143, err[-3000:]
    assert "run.resume_from=" in err and "Traceback" not in err
    stopped_at = steps_written(parts)[-1]
    assert 3 <= stopped_at < 8

    resumed = sip_train(args + ["run.resume_from=latest"], parts)
    run_training(load_config(None, args + [f"run.output_dir={whole}"]))  # meanwhile, here: the same run uninterrupted
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]

    def rows(out):
        return [{k: r.get(k) for k in KEYS} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    assert rows(parts) == rows(whole), "the stopped-and-resumed run differs from the uninterrupted one"
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["samples"]["fed"] == 8 * 4 and summary["samples"]["lost"] == 0
