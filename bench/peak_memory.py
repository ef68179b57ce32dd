"""Run a command and report its wall time and peak memory summed over its whole process tree.

Memory is PSS (shared pages split between the processes that share them), read from /proc, so
Ray's workers, raylet and GCS all count and shared libraries are not counted twice. Also each
process's own peak, named by its title (`ray::LearnerRank`, `ray::ServeReplica:...`), largest first.

    python bench/peak_memory.py -- sip train
    python bench/peak_memory.py --per-process 8 -- sip train
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


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return "?"


def main(argv: list[str]) -> int:
    options, command = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else ([], argv)
    shown = int(options[options.index("--per-process") + 1]) if "--per-process" in options else 0
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = 0
    per_process: dict[int, tuple[int, str]] = {}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            sizes = {p: pss_bytes(p) for p in children(proc.pid)}
            peak = max(peak, sum(sizes.values()))
            for p, size in sizes.items():
                if size > per_process.get(p, (0, ""))[0]:
                    per_process[p] = (size, title(p))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    done.set()
    sampler.join()
    print(f"wall_s={time.perf_counter() - start:.1f} peak_memory_gb={peak / 2**30:.2f} exit={code}")
    for pid, (size, name) in sorted(per_process.items(), key=lambda item: -item[1][0])[:shown]:
        print(f"  peak_gb={size / 2**30:.2f} pid={pid} {name}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
