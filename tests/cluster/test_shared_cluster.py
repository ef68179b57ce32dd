"""The README's `sip` commands (config, serve, train, eval, experiment) through the real CLI, at a tiny
size, on a `ray start --head` cluster with token auth on; and the things a shared cluster brings: a busy output folder, CPUs another job holds,
and the Serve apps of a run whose driver was killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cluster_head import REPO, start_head
from helpers import TINY

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.filterwarnings("ignore")]

RUN = TINY + ["run.eval_at_end=false"]
TEACHER = [o for o in TINY if o.startswith("data.")]


@pytest.fixture(scope="module")
def cluster():
    with start_head(token=True) as head:
        yield head


def sip(cluster, *args, timeout=300, env=None):
    return cluster.run(sys.executable, "-m", "sip.train", *args, timeout=timeout, env=env)


def ok(done):
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    return done


def refused(done, *needles):
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in done.stderr, done.stderr[-3000:]


def test_every_readme_command_runs_on_a_token_auth_cluster(cluster, tmp_path):
    assert "objective: dpo" in ok(sip(cluster, "config")).stdout
    assert "import_path: sip.serve.apps:judge" in ok(sip(cluster, "serve", "--print-config", *TEACHER)).stdout

    ok(sip(cluster, "serve", "--address", cluster.dashboard, *TEACHER))
    assert cluster.serve_apps()["sip-judge"]["status"] == "RUNNING"
    without_token = {"RAY_AUTH_TOKEN": "", "HOME": str(tmp_path)}
    refused(sip(cluster, "serve", "--address", cluster.dashboard, *TEACHER, env=without_token),
            "refused the request (401)", "RAY_AUTH_TOKEN")

    sip_dir, nll_dir = tmp_path / "a" / "run", tmp_path / "b" / "run"  # same folder name, two runs
    ok(sip(cluster, "train", *RUN, "train.steps=2", "--output-dir", str(sip_dir)))
    ok(sip(cluster, "train", *RUN, "train.steps=2", "train.objective=nll", "train.candidates=[suffix]",
           "--output-dir", str(nll_dir)))
    summaries = [json.loads((d / "summary.json").read_text()) for d in (sip_dir, nll_dir)]
    assert summaries[0]["run_id"] != summaries[1]["run_id"], "two runs named `run` must report as two runs"

    model, baseline = summaries[0]["checkpoint"], summaries[1]["checkpoint"]
    ok(sip(cluster, "eval", "--model", model, "--baseline", baseline, *TINY, "--output-dir", str(tmp_path / "eval")))
    assert "quality_win_rate" in json.loads((tmp_path / "eval" / "eval.json").read_text())

    experiment = tmp_path / "experiment"
    ok(sip(cluster, "experiment", "--seeds", "0", "--rollouts", "1", "--output-dir", str(experiment), *TINY,
           "train.steps=2", timeout=900))
    results = json.loads((experiment / "results.json").read_text())
    assert set(results) == {"nll_baseline", "nll_rewrites", "sip_rf_nll", "sip_dpo_k1"}
    assert "| sip_dpo_k1 |" in (experiment / "results.md").read_text()
    leftover = [name for name in cluster.serve_apps() if name.startswith("sip-judge-") or name.startswith("sip-rewriter-")]
    assert not leftover, f"runs that ended left their Serve apps: {leftover}"


def test_a_busy_output_folder_is_refused_and_a_killed_runs_lock_and_apps_are_taken_over(cluster, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "sip.train", "train", *RUN, "train.steps=500", "pipeline.mode=sync",
                              "--output-dir", str(out)], cwd=REPO, env={**cluster.env, "RAY_ADDRESS": cluster.gcs},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run trained no step within 240s"
            time.sleep(0.5)
        start = time.monotonic()
        refused(sip(cluster, "train", *RUN, "train.steps=1", "--output-dir", str(out)), "is being written by another run")
        assert time.monotonic() - start < 30, "a busy folder must be refused at once, before Ray or the base stage"

        first_apps = [name for name in cluster.serve_apps() if name.startswith("sip-judge-")]
        assert len(first_apps) == 1
        os.kill(first.pid, signal.SIGKILL)  # the driver dies without deleting its apps or its lock file
        first.wait(timeout=30)
        assert first_apps[0] in cluster.serve_apps(), "the killed run's app should still be there before the next run"
    finally:
        if first.poll() is None:
            first.kill()

    second = ok(sip(cluster, "train", *RUN, "train.steps=1", "run.overwrite=true", "--output-dir", str(out)))
    assert "taking over the lock of a run that ended" in second.stderr
    assert "removed Serve apps left by runs that died" in second.stderr
    assert first_apps[0] not in cluster.serve_apps()


HOLDER = """
import time, ray
ray.init()

@ray.remote(num_cpus=7)
class Holder:
    def ready(self):
        return True

holder = Holder.remote()
ray.get(holder.ready.remote())
print("held", flush=True)
time.sleep(600)
"""


def test_cpus_another_job_holds_are_not_counted_as_free(cluster, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=tmp_path, env={**cluster.env, "RAY_ADDRESS": cluster.gcs},
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        done = sip(cluster, "train", *RUN, "train.steps=1", "--output-dir", str(tmp_path / "run"))
        refused(done, "are free now", "Holder")
        assert time.monotonic() - start < 60
    finally:
        holder.kill()
        holder.wait(timeout=30)
