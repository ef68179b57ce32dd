"""On a real `ray start --head` cluster: a run submitted with `ray job submit` reports its metrics on
the cluster's metrics endpoint, and a run attached to a long-lived judge survives rescaling it."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_e2e import TINY

from sip.train.cluster import serve_details

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore")]

REPO = Path(__file__).resolve().parents[1]
BATCH = 4  # train.batch_size in TINY
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Cluster:
    def __init__(self, dashboard: str, metrics: str, env: dict):
        self.dashboard, self.metrics, self.env = dashboard, metrics, env

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(args[:3])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def submit(self, overrides: list[str]) -> str:
        """`ray job submit` a `sip train` run with the recipe in deploy/runtime_env.yaml; returns its id."""
        job_id = f"sip-test-{uuid.uuid4().hex[:8]}"
        self.cli("ray", "job", "submit", "--address", self.dashboard, "--submission-id", job_id, "--no-wait",
                 "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml", "--", "sip", "train", *overrides)
        return job_id

    def job(self, job_id: str) -> dict:
        return get_json(f"{self.dashboard}/api/jobs/{job_id}")

    def wait_job(self, job_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["status"] not in TERMINAL:
            assert time.monotonic() < deadline, f"job {job_id} still {info['status']} after {timeout}s"
            time.sleep(1)
        return info

    def logs(self, job_id: str) -> str:
        return get_json(f"{self.dashboard}/api/jobs/{job_id}/logs")["logs"]

    def sip_serve(self, overrides: list[str]) -> None:
        self.cli("sip", "serve", "--address", self.dashboard, *overrides)

    def judge_replicas(self) -> dict[str, str]:
        app = serve_details(self.dashboard)["applications"]["sip-judge"]
        return {r["replica_id"]: r["state"] for r in app["deployments"]["Judge"]["replicas"]}


def stop_tree(head: psutil.Process) -> None:
    """Stop the cluster this test started, and nothing else (`ray stop` would stop every Ray process
    on the machine). `ray start --block` drains for 30 s on SIGTERM, so it is killed after its children."""
    try:
        children = head.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for proc in children:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=3)
    for proc in [*alive, head]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs([*alive, head], timeout=5)


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="sipray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_metrics_report_interval_ms="1000",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--temp-dir", temp, "--num-cpus", "8",
         "--port", str(free_port()), "--ray-client-server-port", str(free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(metrics_port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start exited:\n{(Path(temp) / 'head.log').read_text()[-3000:]}"
            try:
                get_json(f"{dashboard}/api/jobs/")
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not come up within 120s"
                time.sleep(1)
        yield Cluster(dashboard, f"http://127.0.0.1:{metrics_port}/metrics", env)
    finally:
        stop_tree(psutil.Process(head.pid))
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def run_total(samples: dict, name: str, run: str) -> float:
    return sum(value for labels, value in samples.get(name, []) if labels.get("run") == run)


def test_submitted_job_succeeds_and_reports_metrics(cluster, tmp_path):
    out, steps, run = tmp_path / "job", 3, f"job-{uuid.uuid4().hex[:6]}"
    job_id = cluster.submit(TINY + [f"train.steps={steps}", "run.eval_at_end=false", f"run.output_dir={out}", f"run.name={run}"])
    info = cluster.wait_job(job_id)
    assert info["status"] == "SUCCEEDED", cluster.logs(job_id)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["samples"]["in_flight"] == 0

    expected = {
        "ray_sip_steps_total": steps,
        "ray_sip_samples_judged_total": steps * BATCH,
        "ray_sip_samples_trained_total": summary["samples"]["trained"],
        "ray_sip_samples_fed_total": steps * BATCH,
    }
    deadline = time.monotonic() + 30  # the last values reach the endpoint within a report interval or two
    while True:
        samples = scrape(cluster.metrics)
        found = {name: run_total(samples, name, run) for name in expected}
        workers_reported = all(run_total(samples, name, run) > 0 for name in (
            "ray_sip_generated_tokens_total", "ray_sip_judge_latency_s_count", "ray_sip_rewriter_latency_s_count"))
        if found == expected and workers_reported:
            break
        assert time.monotonic() < deadline, f"metrics on {cluster.metrics}: {found}, expected {expected}"
        time.sleep(1)
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())


def test_attached_judge_rescales_while_a_job_runs(cluster, tmp_path):
    teacher = [o for o in TINY if o.startswith("data.")]
    cluster.sip_serve(teacher)
    first = cluster.judge_replicas()
    assert list(first.values()) == ["RUNNING"]

    # Sync mode keeps the job's CPU load low enough on 2 cores for the new replica to start mid-run.
    attach = TINY + ["judge.attach=true", "rewriter.attach=true", "run.eval_at_end=false", "pipeline.mode=sync"]
    out, steps = tmp_path / "attached", 100
    job_id = cluster.submit(attach + [f"train.steps={steps}", f"run.output_dir={out}"])
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert cluster.job(job_id)["status"] not in TERMINAL, cluster.logs(job_id)[-4000:]
        assert time.monotonic() < deadline, "the attached job trained no step within 240s"
        time.sleep(0.5)

    cluster.sip_serve(teacher + ["judge.num_replicas=2"])
    trained_when_scaled = len((out / "metrics.jsonl").read_text().splitlines())
    assert trained_when_scaled < steps, "the job ended before the judge was rescaled; raise its steps"
    scaled = cluster.judge_replicas()
    assert list(scaled.values()) == ["RUNNING", "RUNNING"]
    assert set(first) < set(scaled), "rescaling restarted the running replica"

    info = cluster.wait_job(job_id)
    assert info["status"] == "SUCCEEDED", cluster.logs(job_id)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["samples"]["in_flight"] == 0 and summary["samples"]["lost"] == 0
    assert summary["samples"]["fed"] == steps * BATCH
    assert cluster.judge_replicas() == scaled, "the job must leave the long-lived judge running"



def test_concurrent_runs_each_use_their_own_judge_and_leave_the_served_one_alone(cluster, tmp_path):
    teacher = [o for o in TINY if o.startswith("data.")]
    cluster.sip_serve(teacher)
    served = cluster.judge_replicas()
    quality_only = ["judge.weights={quality: 1, factuality: 0, safety: 0}"]
    common = TINY + ["train.steps=4", "run.eval_at_end=false", "pipeline.mode=sync"]
    outs = {"quality": tmp_path / "quality", "all": tmp_path / "all"}
    jobs = {
        "quality": cluster.submit(common + quality_only + [f"run.output_dir={outs['quality']}"]),
        "all": cluster.submit(common + [f"run.output_dir={outs['all']}"]),
    }
    for name, job_id in jobs.items():
        info = cluster.wait_job(job_id)
        assert info["status"] == "SUCCEEDED", f"{name}: {cluster.logs(job_id)[-4000:]}"
    summaries = {name: json.loads((out / "summary.json").read_text()) for name, out in outs.items()}
    apps = {name: s["apps"]["judge"] for name, s in summaries.items()}
    assert len(set(apps.values())) == 2 and "sip-judge" not in apps.values(), apps
    # each run was judged with its own settings: quality alone asks only pairwise questions
    pairs = 4 * 6  # 4 prefixes x C(4, 2) pairs of (suffix, rewrite, 2 rollouts)
    assert summaries["quality"]["judge_calls"] <= 4 * pairs < summaries["all"]["judge_calls"]
    running = serve_details(cluster.dashboard)["applications"]
    assert not any(app in running for app in apps.values()), "each run deletes the apps it deployed"
    assert cluster.judge_replicas() == served, "the long-lived judge must outlive runs that did not attach to it"
