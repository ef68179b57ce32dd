"""Stops a local Ray cluster's processes once the driver that started it is gone.

`ray.init(address="local")` starts the cluster as children of the driver. If the driver is killed
(SIGKILL, OOM), Ray's head processes notice late and their agents outlive them for minutes. `init_ray`
starts this watchdog in its own session: `python -m sip.train.watchdog DRIVER_PID SESSION_DIR`. It
follows the processes whose command line names the cluster's session folder (GCS, raylet, dashboard,
monitors) and everything they start (workers, agents), and when the driver has exited, or the head
processes have stopped by themselves, it stops whatever of them is left: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 1.0
GRACE_S = 5.0  # after the head processes stop by themselves (ray.shutdown), what is left gets this long


def _heads(session_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and any(session_dir in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def stop(procs: list[psutil.Process], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL for whatever still runs `grace_s` later."""
    for proc in procs:
        try:
            proc.terminate() if grace_s else proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s or 5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _alive(proc: psutil.Process | None) -> bool:
    try:
        return proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(driver_pid: int, session_dir: str) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        driver = None
    tracked: dict[int, psutil.Process] = {}  # psutil.Process compares by pid and start time: a reused pid is not ours
    heads_seen = False
    while True:
        heads = _heads(session_dir)
        heads_seen = heads_seen or bool(heads)
        for head in heads:
            tracked[head.pid] = head
            try:
                for child in head.children(recursive=True):
                    tracked[child.pid] = child
            except psutil.Error:
                pass
        driver_alive = _alive(driver)
        if not driver_alive or (heads_seen and not heads):
            if driver_alive:
                time.sleep(GRACE_S)
            stop([p for p in tracked.values() if p.is_running()])
            return
        time.sleep(POLL_S)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
