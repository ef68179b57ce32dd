"""On a real `ray start --head` cluster: a run submitted with `ray job submit` reports its metrics on
the cluster's metrics endpoint, and a run attached to a long-lived judge survives rescaling it."""

import json
import time
import urllib.request
import uuid

import pytest
from cluster_head import TERMINAL, start_head
from prometheus_client.parser import text_string_to_metric_families
from helpers import TINY

from sip.train.cluster import serve_details

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.filterwarnings("ignore")]

BATCH = 4  # train.batch_size in TINY


@pytest.fixture(scope="module")
def cluster():
    with start_head() as head:
        yield head


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def run_total(samples: dict, name: str, run: str, run_id: str) -> float:
    return sum(value for labels, value in samples.get(name, [])
               if labels.get("run") == run and labels.get("run_id") == run_id)


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
        found = {name: run_total(samples, name, run, summary["run_id"]) for name in expected}
        workers_reported = all(run_total(samples, name, run, summary["run_id"]) > 0 for name in (
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
