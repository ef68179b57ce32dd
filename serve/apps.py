"""Long-lived judge and rewriter apps: the Serve config that runs them, and the check before attaching.

`sip serve`, `serve deploy` and a KubeRay RayService all take the config `serve_config` writes. Each
app's import path names a builder below; its `args` carry the sip config sections the replicas
need (`data`, and the `judge` or `rewriter` section without its scaling fields); its `deployments`
entry carries the scaling (replicas or autoscaling, request limit, CPUs and GPUs). Serve applies a new
replica count or autoscaling range to the running replicas, with no restart and no cold start, so
a training job attached to the app keeps going while the judge is rescaled; a change to `args`
replaces the replicas.
"""

from __future__ import annotations

from typing import Any

from sip.serve.judge import JUDGE_APP, judge_app
from sip.serve.replica import teacher_settings
from sip.serve.rewriter import REWRITER_APP, rewriter_app
from sip.config import DeploymentConfig, SipConfig

# The part of a deployment's config that goes in the Serve config's `deployments` entry, not in `args`.
SCALING_FIELDS = {"num_replicas", "autoscaling", "max_ongoing_requests", "num_cpus", "num_gpus", "attach"}
# Settings an attaching run may set differently from the served app without changing its verdicts.
FREE_ON_ATTACH = SCALING_FIELDS | {"max_batch_size", "batch_wait_timeout_s"}
# What the teachers read from the data section (the world teacher knows the world's facts).
DATA_FIELDS = ("source", "world")

SECTIONS = {JUDGE_APP: "judge", REWRITER_APP: "rewriter"}
DEPLOYMENTS = {JUDGE_APP: "Judge", REWRITER_APP: "Rewriter"}


def judge(args: dict[str, Any]):
    """Serve app builder: `import_path: sip.serve.apps:judge`, `args: {data: {...}, judge: {...}}`."""
    cfg = SipConfig.model_validate(args)
    return judge_app(cfg.judge, cfg.data)


def rewriter(args: dict[str, Any]):
    """Serve app builder: `import_path: sip.serve.apps:rewriter`, `args: {data: {...}, rewriter: {...}}`."""
    cfg = SipConfig.model_validate(args)
    return rewriter_app(cfg.rewriter, cfg.data)


def app_names(cfg: SipConfig) -> list[str]:
    """The judge always runs (evaluation uses it); the rewriter when rewrites are candidates."""
    return [JUDGE_APP, REWRITER_APP] if cfg.needs_rewriter else [JUDGE_APP]


def check_prompts(cfg: SipConfig) -> None:
    """The prompts of each LLM-backed app, checked in the driver before anything starts: a replica would
    refuse them at start, with the reason deep in Serve's logs. ValueError says which."""
    from sip.serve.backends import LLM_BACKENDS
    from sip.serve.llm import JUDGE_KINDS, REWRITER_KINDS
    from sip.serve.llm import check_prompts as check_llm_prompts

    for name in app_names(cfg):
        section = getattr(cfg, SECTIONS[name])
        if section.backend in LLM_BACKENDS:
            check_llm_prompts(section.llm, JUDGE_KINDS if name == JUDGE_APP else REWRITER_KINDS)


def serve_config(cfg: SipConfig) -> dict:
    """A Serve multi-application config (the `serve deploy` / RayService `serveConfigV2` format)."""
    return {
        "proxy_location": "Disabled",  # the apps take no HTTP traffic; callers use handles
        "http_options": {"host": "127.0.0.1"},  # where a proxy listens if someone enables one
        "applications": [_application(name, cfg) for name in app_names(cfg)],
    }


def _application(name: str, cfg: SipConfig) -> dict:
    section = SECTIONS[name]
    dcfg: DeploymentConfig = getattr(cfg, section)
    scaling: dict[str, Any] = {
        "max_ongoing_requests": dcfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": dcfg.num_cpus, "num_gpus": dcfg.num_gpus},
    }
    if dcfg.autoscaling:
        scaling.update(num_replicas=None, autoscaling_config=dcfg.autoscaling)
    else:
        scaling["num_replicas"] = dcfg.num_replicas
    return {
        "name": name,
        "route_prefix": None,
        "import_path": f"sip.serve.apps:{section}",
        "args": {
            "data": cfg.data.model_dump(mode="json", exclude_defaults=True),
            section: dcfg.model_dump(mode="json", exclude=SCALING_FIELDS, exclude_defaults=True),
        },
        "logging_config": {"enable_access_log": False},
        "deployments": [{"name": DEPLOYMENTS[name], **scaling}],
    }


def replica_range(dcfg: DeploymentConfig) -> tuple[int, int]:
    """How many replicas a deployment may have once it has settled: fixed, or the autoscaling range."""
    if dcfg.autoscaling:
        low = dcfg.autoscaling.get("min_replicas", 1)
        return low, dcfg.autoscaling.get("max_replicas", low)
    return dcfg.num_replicas, dcfg.num_replicas


def attach_problems(name: str, cfg: SipConfig, timeout: float) -> list[str]:
    """Why a run with `cfg` cannot use the running app `name` (empty: it can)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    section = SECTIONS[name]
    hint = f"start it with `sip serve` and this run's config, or set {section}.attach=false"
    try:
        status = serve.status().applications.get(name)
    except RayServeException:
        status = None
    if status is None:
        return [f"{section}.attach is set but no Serve app '{name}' runs on this cluster: {hint}"]
    if status.status != "RUNNING":
        return [f"Serve app '{name}' is {status.status}, not RUNNING: {status.message or hint}"]
    served = serve.get_app_handle(name).settings.remote().result(timeout_s=timeout)
    problems = settings_problems(section, cfg, served)
    if problems:
        problems.append(f"the served '{name}' would work differently from this run's config: {hint}")
    return problems


def settings_problems(section: str, cfg: SipConfig, served: dict) -> list[str]:
    """Settings of a served judge or rewriter (its `settings()`) that differ from the run's own."""
    ours = teacher_settings(getattr(cfg, section), cfg.data)
    problems = []
    for key in sorted(set(ours["deployment"]) | set(served["deployment"])):
        mine, theirs = ours["deployment"].get(key), served["deployment"].get(key)
        if key not in FREE_ON_ATTACH and mine != theirs:
            problems.append(f"{section}.{key}: served {theirs!r}, this run {mine!r}")
    for key in DATA_FIELDS:
        if ours["data"].get(key) != served["data"].get(key):
            problems.append(f"data.{key}: the served app's differs from this run's")
    return problems
