"""The cluster a run lives on: joining or starting it, checking it can hold the run, and the judge
and rewriter apps.

- `cluster_session` is what `sip train` runs inside: it joins `RAY_ADDRESS` / `run.ray_address`
  or starts a local cluster, fails at once if the run's actors cannot all be placed, deploys the
  run's own judge and rewriter apps (their names carry a run id, so runs on one cluster never
  share or delete each other's) or attaches to the long-lived ones `sip serve` runs, and on the
  way out deletes only the apps it deployed.
- `deploy_apps` is `sip serve`: what `serve deploy` does, from the run's own config, through
  Serve's REST API on the cluster's dashboard; it returns once every replica asked for runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from sip.config import SipConfig
from sip.resources import ClusterError, resource_report

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
SERVE_API = "/api/serve/applications/"
OWNER_NAMESPACE = "sip"  # where each run's owner actor lives: alive exactly as long as the run's driver
RUN_APP = re.compile(r"^(?P<app>.+)-(?P<run_id>[0-9a-z]{4,32})$")


def init_ray(cfg: SipConfig) -> bool:
    """Join RAY_ADDRESS / run.ray_address, or start a local cluster. Returns True if we started it.

    Only a cluster sip starts itself runs without token auth (when the user has not chosen): a
    cluster it joins keeps whatever RAY_AUTH_MODE its user set. A local cluster gets a watchdog
    (train/watchdog.py) that stops its processes when this process ends, even by SIGKILL.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    context = ray.init(address="local", num_cpus=cfg.run.num_cpus, include_dashboard=False, log_to_driver=False)
    subprocess.Popen([sys.executable, "-m", "sip.train.watchdog", str(os.getpid()), context.address_info["session_dir"]],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return True


def check_resources(cfg: SipConfig) -> None:
    """Fail before deploying anything if what is free now cannot hold the run's actors (Ray and Serve would wait)."""
    import ray

    from sip.serve.apps import replica_range

    r, t = cfg.rollout, cfg.train
    need = {"CPU": t.num_learners * t.num_cpus + r.num_generators * r.num_cpus,
            "GPU": t.num_learners * t.num_gpus + r.num_generators * r.num_gpus}
    for section in ("judge", "rewriter"):
        dcfg = getattr(cfg, section)
        if dcfg.attach or (section == "rewriter" and not cfg.needs_rewriter):
            continue
        need["CPU"] += replica_range(dcfg)[0] * dcfg.num_cpus
        need["GPU"] += replica_range(dcfg)[0] * dcfg.num_gpus
    total, free = ray.cluster_resources(), ray.available_resources()
    for kind, amount in need.items():
        if amount > total.get(kind, 0):
            raise ClusterError(
                f"the run needs {amount:g} {kind}s (train.num_learners x train.num_{kind.lower()}s, rollout.num_generators x "
                f"rollout.num_{kind.lower()}s, judge/rewriter replicas x num_{kind.lower()}s) but the cluster has "
                f"{total.get(kind, 0):g}: lower those" + (" or raise run.num_cpus" if kind == "CPU" else "")
            )
        if amount > free.get(kind, 0) + 1e-9:
            raise ClusterError(f"the run needs {amount:g} {kind}s but only {free.get(kind, 0):g} are free now: "
                               f"{resource_report()}. Wait for those to finish, or lower what this run asks for")


def start_owner(run_id: str):
    """A zero-CPU actor that lives exactly as long as this run's driver: its absence tells a later run
    (`remove_orphan_apps`) that the apps named after `run_id` were left by a driver that died."""
    import ray

    @ray.remote(num_cpus=0)
    class RunOwner:
        def ping(self) -> bool:
            return True

    owner = RunOwner.options(name=f"sip-run-{run_id}", namespace=OWNER_NAMESPACE).remote()
    ray.get(owner.ping.remote(), timeout=60)
    return owner


def remove_orphan_apps() -> list[str]:
    """Delete the Serve apps of runs whose driver is gone (killed before it could delete them)."""
    import ray
    from ray import serve

    from sip.serve.apps import SECTIONS

    removed = []
    for name in serve.status().applications:
        match = RUN_APP.match(name)
        if not match or match["app"] not in SECTIONS:
            continue
        try:
            ray.get_actor(f"sip-run-{match['run_id']}", namespace=OWNER_NAMESPACE)
        except ValueError:
            serve.delete(name)
            removed.append(name)
    if removed:
        logging.getLogger(__name__).warning("removed Serve apps left by runs that died: %s", ", ".join(removed))
    return removed


def deploy_teachers(cfg: SipConfig, run_id: str, started: list[str], wait: bool = True) -> dict[str, str]:
    """The run's judge (always: evaluation uses it) and, when rewrites are candidates, its rewriter.

    A section that sets `attach` uses the long-lived app of the plain name (`sip serve`), after
    checking it runs with the same settings. Returns the app name per role; each app it deploys is
    added to `started` first, so one that fails half-way is deleted too. Waits at most
    `pipeline.timeout_s` for the replicas, then says what holds the cluster's resources; with
    `wait=False` the caller waits later (`wait_for_teachers`), starting other roles meanwhile.
    """
    from ray import serve

    from sip.serve.apps import SECTIONS, app_names, attach_problems
    from sip.serve.judge import judge_app
    from sip.serve.rewriter import rewriter_app

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    builders = {"judge": lambda: judge_app(cfg.judge, cfg.data), "rewriter": lambda: rewriter_app(cfg.rewriter, cfg.data)}
    names = {}
    for name in app_names(cfg):
        role = SECTIONS[name]
        if getattr(cfg, role).attach:
            problems = attach_problems(name, cfg, cfg.pipeline.timeout_s)
            if problems:
                raise ClusterError("\n  ".join(problems))
            names[role] = name
            continue
        if not started:
            serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
        names[role] = f"{name}-{run_id}"
        started.append(names[role])
        serve.run_many([serve.RunTarget(builders[role](), name=names[role], route_prefix=None,
                                        logging_config={"enable_access_log": False})],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    if wait:
        wait_for_teachers(cfg, names)
    return names


def wait_for_teachers(cfg: SipConfig, names: dict[str, str]) -> None:
    """Until the replicas of the apps this run deployed are running (at most `pipeline.timeout_s`)."""
    from sip.serve.apps import SECTIONS, app_names

    wait_for_apps([names[SECTIONS[n]] for n in app_names(cfg) if not getattr(cfg, SECTIONS[n]).attach], cfg.pipeline.timeout_s)


def replica_error(message: str | None) -> str:
    """What a deployment's replicas raised at start: the last line of the traceback in Serve's status
    message (the rest, and the colours, are for the controller's log)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", message or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def wait_for_apps(names: list[str], timeout: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        apps = serve.status().applications
        waiting = []
        for name in names:
            app = apps.get(name)
            status = app.status if app else "NOT_STARTED"
            if status == "DEPLOY_FAILED":
                errors = [replica_error(d.message) for d in app.deployments.values() if d.status == "DEPLOY_FAILED"]
                raise ClusterError(f"Serve app {name} failed to deploy: {app.message} {'; '.join(filter(None, errors))}")
            if status != "RUNNING":
                waiting.append(f"{name} ({status})")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"the Serve apps {', '.join(waiting)} did not start within pipeline.timeout_s={timeout:g}s; "
                               f"{resource_report()}")
        time.sleep(0.5)


@contextmanager
def cluster_session(cfg: SipConfig, run_id: str, mark=lambda phase: None):
    """Ray up, orphaned apps removed, resources checked, the run's judge and rewriter deploying; yields their
    app names at once (the caller waits for them with `wait_for_teachers`, after starting its other roles).
    `mark(phase)` is called as each phase ends."""
    import ray

    started_cluster = init_ray(cfg)
    mark("ray_ready")
    started: list[str] = []
    owner = None
    try:
        owner = start_owner(run_id)
        remove_orphan_apps()
        check_resources(cfg)
        apps = deploy_teachers(cfg, run_id, started, wait=False)
        mark("deployments_started")
        yield apps
    finally:
        if started:
            from ray import serve

            for name in started:
                try:
                    serve.delete(name)
                except Exception as err:  # noqa: BLE001 — cleanup must not hide the run's own error
                    logging.getLogger(__name__).warning("could not delete Serve app %s: %s", name, err)
        if owner is not None:
            ray.kill(owner)
        if started_cluster:
            ray.shutdown()


def dashboard_address(explicit: str | None = None) -> str:
    """--address, else RAY_DASHBOARD_ADDRESS, else RAY_ADDRESS when it is an http(s) URL, else localhost."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    for candidate in (explicit, os.environ.get("RAY_DASHBOARD_ADDRESS"), ray_address if ray_address.startswith("http") else None):
        if candidate:
            return candidate.rstrip("/")
    return DEFAULT_DASHBOARD


def auth_headers() -> dict[str, str]:
    """The Ray auth token as a bearer header, from where Ray itself reads it: RAY_AUTH_TOKEN, the file in
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token when RAY_AUTH_MODE=token. Empty when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as err:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({err})") from None
    default = Path.home() / ".ray" / "auth_token"
    if not token and os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and default.is_file():
        token = default.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _request(address: str, method: str, body: dict | None = None, timeout: float = 30) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(address + SERVE_API, data=data, method=method,
                                     headers={"Content-Type": "application/json", **auth_headers()})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ClusterError(
                f"the Ray dashboard at {address} refused the request ({err.code}): the cluster has token auth on. "
                "Give sip its token with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or RAY_AUTH_MODE=token and "
                "~/.ray/auth_token (`ray get-auth-token` prints it)") from None
        raise ClusterError(f"{method} {address}{SERVE_API} failed ({err.code}): {err.read().decode()[:2000]}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ClusterError(f"cannot reach the Ray dashboard at {address} ({err}); set --address or RAY_DASHBOARD_ADDRESS") from None
    return json.loads(text) if text.strip() else {}


def serve_details(address: str) -> dict:
    """Serve's view of the cluster: applications, their deployments and replicas."""
    return _request(address, "GET")


def deploy_apps(cfg: SipConfig, address: str, timeout: float) -> dict[str, int]:
    """Declare the judge (and rewriter) apps and wait until their replicas run; returns replicas per app."""
    from sip.serve.apps import DEPLOYMENTS, SECTIONS, app_names, replica_range, serve_config

    config = serve_config(cfg)
    ours = {app["name"] for app in config["applications"]}
    current = serve_details(address).get("applications", {})
    for name, app in current.items():
        if name not in ours and app.get("deployed_app_config") and name not in SECTIONS:
            config["applications"].append(app["deployed_app_config"])
    _request(address, "PUT", config)

    wanted = {name: replica_range(getattr(cfg, SECTIONS[name])) for name in app_names(cfg)}
    deadline = time.monotonic() + timeout
    while True:
        apps = serve_details(address).get("applications", {})
        running, waiting = {}, []
        for name, (low, high) in wanted.items():
            app = apps.get(name) or {}
            if app.get("status") == "DEPLOY_FAILED":
                errors = [replica_error(d.get("message")) for d in app.get("deployments", {}).values()
                          if d.get("status") == "DEPLOY_FAILED"]
                raise ClusterError(f"Serve app '{name}' failed to deploy: {app.get('message')} {'; '.join(filter(None, errors))}")
            deployment = app.get("deployments", {}).get(DEPLOYMENTS[name], {})
            up = sum(r.get("state") == "RUNNING" for r in deployment.get("replicas", []))
            if app.get("status") == "RUNNING" and low <= up <= high and deployment.get("target_num_replicas") == up:
                running[name] = up
            else:
                waiting.append(f"{name}: {app.get('status', 'not deployed')}, {up} replicas running, {low}-{high} wanted")
        if not waiting:
            return running
        if time.monotonic() > deadline:
            raise ClusterError(f"Serve apps not ready within {timeout:g}s: " + "; ".join(waiting))
        time.sleep(1)
