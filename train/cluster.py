"""`sip serve`: deploy the long-lived judge and rewriter through Serve's REST API on a running cluster.

This is what `serve deploy` does, from the run's own config: the request goes to the cluster's
dashboard, the apps are declared (see `sip.serve.apps`), and the command returns once every
replica asked for is running. Other apps deployed from a config stay as they are.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from sip.train.config import SipConfig

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
SERVE_API = "/api/serve/applications/"


class ClusterError(RuntimeError):
    """The cluster refused or did not finish a request; the message says which and why."""


def dashboard_address(explicit: str | None = None) -> str:
    """--address, else RAY_DASHBOARD_ADDRESS, else RAY_ADDRESS when it is an http(s) URL, else localhost."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    for candidate in (explicit, os.environ.get("RAY_DASHBOARD_ADDRESS"), ray_address if ray_address.startswith("http") else None):
        if candidate:
            return candidate.rstrip("/")
    return DEFAULT_DASHBOARD


def _request(address: str, method: str, body: dict | None = None, timeout: float = 30) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(address + SERVE_API, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as err:
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
                raise ClusterError(f"Serve app '{name}' failed to deploy: {app.get('message')}")
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
