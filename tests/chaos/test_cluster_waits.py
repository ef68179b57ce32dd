"""Every wait on the cluster has a bound: a learner placement group or a Serve app that cannot start
ends in a ClusterError, within pipeline.timeout_s, that says what waited and what is free; and the
local cluster's watchdog stops the cluster's processes once the driver is gone."""

import subprocess
import sys
import time

import psutil
import pytest
import ray
from helpers import TINY

from sip.resources import ClusterError
from sip.train.cluster import deploy_teachers
from sip.config import load_config

RAY_CPUS = 2  # a cluster too small for the run, on purpose
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.filterwarnings("ignore")]

SHORT = TINY + ["pipeline.timeout_s=4", "pipeline.request_retries=0"]


def test_a_learner_placement_group_that_cannot_be_placed_is_a_clear_error(tmp_path):
    from sip.actors.learner_group import LearnerGroup

    cfg = load_config(None, SHORT + ["train.num_cpus=3"])
    start = time.monotonic()
    with pytest.raises(ClusterError) as err:
        LearnerGroup(cfg, str(tmp_path))
    assert time.monotonic() - start < 30
    assert "placement group of 1 learner ranks" in str(err.value) and "free:" in str(err.value)
    assert ray.available_resources().get("CPU") == 2, "the pending placement group must be removed"


def test_a_serve_app_that_cannot_start_is_a_clear_error():
    cfg = load_config(None, SHORT + ["judge.num_cpus=3"])
    started: list[str] = []
    start = time.monotonic()
    try:
        with pytest.raises(ClusterError) as err:
            deploy_teachers(cfg, "wait0001", started)
        assert time.monotonic() - start < 30
        assert "sip-judge-wait0001" in str(err.value) and "did not start within pipeline.timeout_s=4s" in str(err.value)
    finally:
        from ray import serve

        for name in started:
            serve.delete(name)


WATCHED = """
import os, sys, time
from sip.train.cluster import init_ray
from sip.config import load_config
init_ray(load_config(None, ["run.num_cpus=2"]))
import ray
@ray.remote
def pid():
    return os.getpid()
print(ray.get(pid.remote()), flush=True)
time.sleep(600)
"""


@pytest.mark.chaos
def test_a_killed_driver_leaves_no_process_of_its_local_cluster_behind(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", WATCHED], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    worker = psutil.Process(int(driver.stdout.readline()))
    time.sleep(3)  # the agents start a moment after the workers
    cluster = psutil.Process(driver.pid).children(recursive=True)
    watchdogs = [p for p in cluster if "sip.train.watchdog" in " ".join(p.cmdline())]
    assert len(watchdogs) == 1 and worker in cluster
    cluster = [p for p in cluster if p not in watchdogs]
    driver.kill()
    driver.wait()
    _, alive = psutil.wait_procs(cluster + watchdogs, timeout=60)
    assert not alive, f"still running a minute after the driver died: {[p.name() for p in alive]}"
