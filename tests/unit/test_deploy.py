"""The files in deploy/ cannot be applied here: check that they parse, match the schemas Ray ships,
and that every sip command and override in them is accepted by the CLI."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from sip.serve import apps
from sip.train.cli import app
from sip.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOKEN_SECRET = {"name": "sip-ray-auth", "key": "auth_token"}
RAY_ENV = {  # every Ray container and the job submitter: token auth, the token from the Secret
    "RAY_AUTH_MODE": {"value": "token"},
    "RAY_AUTH_TOKEN": {"valueFrom": {"secretKeyRef": TOKEN_SECRET}},
    "RAY_USAGE_STATS_ENABLED": {"value": "0"},
}


def manifests(name: str) -> dict[str, dict]:
    """The documents of one KubeRay file, by kind."""
    documents = list(yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()))
    return {d["kind"]: d for d in documents}


def container_env(container: dict) -> dict:
    return {e["name"]: {k: v for k, v in e.items() if k != "name"} for e in container.get("env", [])}


def sip_command_is_accepted(command: str) -> list[str]:
    """Run `sip train ...` / `sip serve ...` from a manifest through `sip config`; returns the overrides."""
    words = shlex.split(command)
    assert words[0] == "sip" and words[1] in ("train", "serve"), command
    overrides, rest = [], iter(words[2:])
    for word in rest:
        if word in ("--output-dir", "-o"):
            overrides.append(f"run.output_dir={next(rest)}")
        elif word != "--print-config":
            assert not word.startswith("-"), f"unexpected option {word} in {command}"
            overrides.append(word)
    result = CliRunner().invoke(app, ["config", *overrides])
    assert result.exit_code == 0, f"{command}: {result.output}"
    return overrides


def check_serve_apps(serve_config: dict) -> None:
    ServeDeploySchema.model_validate(serve_config)
    for application in serve_config["applications"]:
        module, builder = application["import_path"].split(":")
        assert module == "sip.serve.apps"
        getattr(apps, builder)(application["args"])  # the replicas' config validates
        for deployment in application["deployments"]:
            autoscaling = deployment.get("autoscaling_config")
            low = autoscaling["min_replicas"] if autoscaling else deployment["num_replicas"]
            assert low >= 1, "a run must never wait on a cold start"


def test_serve_yaml_is_what_sip_serve_prints():
    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    assert config == apps.serve_config(load_config())
    check_serve_apps(config)
    result = CliRunner().invoke(app, ["serve", "--print-config"])
    assert result.exit_code == 0 and yaml.safe_load(result.output) == config


def test_scaling_stays_out_of_the_app_args():
    """Serve restarts replicas when `args` change; a new replica count must only touch `deployments`."""
    one, two = (apps.serve_config(load_config(None, [f"judge.num_replicas={n}", "judge.num_cpus=1"])) for n in (1, 2))
    assert [a["args"] for a in one["applications"]] == [a["args"] for a in two["applications"]]
    assert two["applications"][0]["deployments"][0]["num_replicas"] == 2
    auto = apps.serve_config(load_config(None, ["judge.autoscaling={min_replicas: 1, max_replicas: 3}"]))
    assert auto["applications"][0]["deployments"][0]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
    check_serve_apps(auto)
    assert [a["name"] for a in apps.serve_config(load_config(None, ["train.candidates=[suffix,rollout]"]))["applications"]] == ["sip-judge"]


def test_attach_check_names_what_differs():
    served = {"deployment": load_config(None, ["judge.num_replicas=3", "judge.max_batch_size=8"]).judge.model_dump(mode="json"),
              "data": load_config().data.model_dump(mode="json")}
    assert apps.settings_problems("judge", load_config(None, ["judge.attach=true"]), served) == []
    problems = apps.settings_problems("judge", load_config(None, ["judge.pairwise=pivot", "data.world.countries=6"]), served)
    assert problems == ["judge.pairwise: served 'round_robin', this run 'pivot'", "data.world: the served app's differs from this run's"]


def test_runtime_env_leaves_auth_to_the_cluster():
    env = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    assert env["env_vars"] == {"RAY_USAGE_STATS_ENABLED": "0"}, "a job inherits the cluster's auth mode"
    assert {".venv", ".git", "runs"} <= set(env["excludes"])


def test_no_deploy_file_turns_auth_off():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"RAY_AUTH_MODE\W+disabled", text), f"{path} disables Ray auth"


def test_kuberay_rayjob_requests_resources_and_runs_a_valid_command():
    found = manifests("rayjob.yaml")
    job = found["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    overrides = sip_command_is_accepted(job["spec"]["entrypoint"])
    assert "RAY_AUTH_MODE" not in yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    cluster = job["spec"]["rayClusterSpec"]
    check_pods(cluster)
    submitter = job["spec"]["submitterPodTemplate"]
    assert container_env(submitter["spec"]["containers"][0]) | {"RAY_USAGE_STATS_ENABLED": {"value": "0"}} == RAY_ENV
    check_network_policy(found["NetworkPolicy"], cluster, extra_pods=[submitter])
    cpus = sum(int(g["replicas"]) * float(g["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
               for g in cluster["workerGroupSpecs"])
    cfg = load_config(None, overrides)
    need = cfg.train.num_cpus + cfg.rollout.num_generators * cfg.rollout.num_cpus
    need += cfg.judge.num_replicas * cfg.judge.num_cpus + cfg.rewriter.num_replicas * cfg.rewriter.num_cpus
    assert need <= cpus, "the workers must hold every actor and replica the run asks for"


def test_kuberay_rayservice_serves_the_sip_serve_config():
    text = (DEPLOY / "kuberay" / "rayservice.yaml").read_text()
    found = manifests("rayservice.yaml")
    service = found["RayService"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    check_serve_apps(serve_config)
    printed = re.search(r"^#\s+(sip serve --print-config .*)$", text, re.M).group(1)
    expected = apps.serve_config(load_config(None, sip_command_is_accepted(printed)))
    assert serve_config["applications"] == expected["applications"]
    submits = re.findall(r"-- (sip train .*)$", text, re.M)
    assert submits
    for submit in submits:
        assert {"judge.attach=true", "rewriter.attach=true"} <= set(sip_command_is_accepted(submit))
    check_pods(service["spec"]["rayClusterConfig"])
    check_network_policy(found["NetworkPolicy"], service["spec"]["rayClusterConfig"])


def check_pods(cluster: dict) -> None:
    assert cluster["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET["name"]}, \
        "the operator authenticates its dashboard calls with the same Secret"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        assert container_env(container) == RAY_ENV
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["requests"]
               for g in cluster["workerGroupSpecs"]), "generators and learner get GPU pods"


def check_network_policy(policy: dict, cluster: dict, extra_pods: tuple = ()) -> None:
    """The policy selects every Ray pod, lets each reach the others on any port, and opens only the
    dashboard (to the operator's pods) and the metrics port (to a monitoring namespace) beyond them."""
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["spec"]["policyTypes"] == ["Ingress"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    head = cluster["headGroupSpec"]["template"]
    for pod in [head, *(g["template"] for g in cluster["workerGroupSpecs"]), *extra_pods]:
        assert selector.items() <= pod["metadata"]["labels"].items(), "the policy selects every Ray pod"
    own, *others = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": selector}}]}
    opened = {}
    for rule in others:
        for peer in rule["from"]:
            assert peer["namespaceSelector"]["matchLabels"], "only labelled namespaces, never all of them"
        for port in rule["ports"]:
            opened.setdefault(port["port"], []).extend(rule["from"])
    assert set(opened) == {8265, 8080}, "GCS, Serve and Ray's other ports stay inside the cluster"
    assert [peer["podSelector"]["matchLabels"] for peer in opened[8265]] == [{"app.kubernetes.io/name": "kuberay-operator"}]
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert head_ports["dashboard"] == 8265 and head_ports["metrics"] == 8080, "the ports the policy opens"


def test_cluster_launcher_config_matches_rays_schema():
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command and "RAY_USAGE_STATS_ENABLED=0" in command
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}, "every node gets the token"
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]
    text = (DEPLOY / "cluster.yaml").read_text()
    commands = re.findall(r"(sip (?:serve|train) .*)$", text, re.M)
    assert len(commands) == 2
    for command in commands:
        sip_command_is_accepted(command)

