"""A real `ray start --head` cluster on 127.0.0.1 for tests that use sip as a cluster user would:
`ray job submit`, `sip serve`, `sip train` joining through RAY_ADDRESS. With `token=True` the
cluster runs with RAY_AUTH_MODE=token, and every command the tests run carries the token."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import psutil

from sip.train.watchdog import stop

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, dashboard: str, gcs: str, metrics: str, env: dict):
        self.dashboard, self.gcs, self.metrics, self.env = dashboard, gcs, metrics, env

    def get_json(self, path: str) -> dict:
        headers = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"} if self.env.get("RAY_AUTH_TOKEN") else {}
        with urllib.request.urlopen(urllib.request.Request(self.dashboard + path, headers=headers), timeout=10) as response:
            return json.loads(response.read())

    def run(self, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        """A command as a user of this cluster runs it (RAY_ADDRESS and, with auth on, the token set)."""
        return subprocess.run(args, cwd=REPO, env={**self.env, "RAY_ADDRESS": self.gcs, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(args[:3])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def submit(self, overrides: list[str]) -> str:
        """`ray job submit` a `sip train` run with the recipe in deploy/runtime_env.yaml; returns its id."""
        job_id = f"sip-test-{uuid.uuid4().hex[:8]}"
        self.cli("ray", "job", "submit", "--address", self.dashboard, "--submission-id", job_id, "--no-wait",
                 "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml", "--", "sip", "train", *overrides)
        return job_id

    def job(self, job_id: str) -> dict:
        return self.get_json(f"/api/jobs/{job_id}")

    def wait_job(self, job_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["status"] not in TERMINAL:
            assert time.monotonic() < deadline, f"job {job_id} still {info['status']} after {timeout}s"
            time.sleep(1)
        return info

    def logs(self, job_id: str) -> str:
        return self.get_json(f"/api/jobs/{job_id}/logs")["logs"]

    def sip_serve(self, overrides: list[str]) -> None:
        self.cli("sip", "serve", "--address", self.dashboard, *overrides)

    def serve_apps(self) -> dict:
        return self.get_json("/api/serve/applications/").get("applications", {})

    def judge_replicas(self) -> dict[str, str]:
        app = self.serve_apps()["sip-judge"]
        return {r["replica_id"]: r["state"] for r in app["deployments"]["Judge"]["replicas"]}


def stop_tree(head: psutil.Process) -> None:
    """Stop the cluster this test started, and nothing else (`ray stop` would stop every Ray process
    on the machine). `ray start --block` drains for 30 s on SIGTERM, so it is killed after its children."""
    try:
        children = head.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop(children)
    stop([head], grace_s=0)


@contextmanager
def start_head(token: bool = False, num_cpus: int = 8):
    temp = tempfile.mkdtemp(prefix="sipray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard_port, metrics_port, gcs_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token" if token else "disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_metrics_report_interval_ms="1000", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if token:
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--temp-dir", temp, "--num-cpus", str(num_cpus),
         "--port", str(gcs_port), "--ray-client-server-port", str(free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(metrics_port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    cluster = Cluster(f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}",
                      f"http://127.0.0.1:{metrics_port}/metrics", env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start exited:\n{(Path(temp) / 'head.log').read_text()[-3000:]}"
            try:
                cluster.get_json("/api/jobs/")
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not come up within 120s"
                time.sleep(1)
        yield cluster
    finally:
        stop_tree(psutil.Process(head.pid))
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
