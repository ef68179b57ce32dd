"""Run a command and report its wall time and peak memory summed over its whole process tree.

Memory is PSS (shared pages split between the processes that share them), read from /proc, so
Ray's workers, raylet and GCS all count and shared libraries are not counted twice.

    python bench/peak_memory.py -- sip train
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path


def children(pid: int) -> set[int]:
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    frontier.append(kid)
    return found


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1 :] if "--" in argv else argv
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(pss_bytes(p) for p in children(proc.pid)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    done.set()
    sampler.join()
    print(f"wall_s={time.perf_counter() - start:.1f} peak_memory_gb={peak / 2**30:.2f} exit={code}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
