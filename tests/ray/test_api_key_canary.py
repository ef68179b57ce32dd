"""A canary API key for the openai judge never shows up in what sip writes, prints or logs.

The judge is a real OpenAI-compatible HTTP server on 127.0.0.1 (a small one written here that
answers every chat completion with a verdict line), so the key really goes out with each request.
"""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

KEY_ENV = "SIP_CANARY_API_KEY"
CANARY = "sk-canary-" + os.urandom(12).hex()


class VerdictServer:
    """POST /v1/chat/completions: the verdict line each of sip's judge prompts asks for."""

    def __init__(self):
        self.authorizations: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.authorizations.append(self.headers.get("Authorization", ""))
                reply = json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": server.verdict(body["messages"][-1]["content"])}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def verdict(user: str) -> str:
        if "<<<OPTION 1>>>" in user:
            return "Both continue the text.\nConclusion: Option 1"
        if "<<<REFERENCE>>>" in user:
            return '{"reasoning": "nothing false", "label": "No Hallucination"}'
        if "<<<CONTINUATION>>>" in user:
            return "It is harmless.\nFINAL DECISION: YES"
        return "TIE"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def judge_overrides(base_url: str) -> list[str]:
    return ["judge.backend=openai", f"judge.llm.base_url={base_url}", f"judge.llm.api_key_env={KEY_ENV}",
            "judge.llm.model=canary-judge", "judge.llm.backoff_s=0.01"]


def files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_sip_config_prints_the_key_variables_name_not_its_value():
    env = {**os.environ, KEY_ENV: CANARY}
    shown = subprocess.run([sys.executable, "-m", "sip.train", "config", *judge_overrides("http://127.0.0.1:9/v1")],
                           capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"api_key_env: {KEY_ENV}" in shown.stdout
    assert CANARY not in shown.stdout + shown.stderr


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore")
def test_a_short_run_with_an_openai_judge_never_writes_or_logs_the_key(tmp_path, monkeypatch, capfd):
    import ray
    from ray import serve

    from sip.config import load_config
    from sip.train.pipeline import run_training
    from helpers import TINY

    monkeypatch.setenv(KEY_ENV, CANARY)  # before Ray starts: the judge replicas inherit it
    wandb_dirs = {name: tmp_path / name.lower() for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}
    for name, folder in wandb_dirs.items():
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    with VerdictServer() as server:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
            cfg = load_config(None, TINY + judge_overrides(server.base_url) + [
                "train.steps=2", "run.eval_at_end=false", "run.wandb=true", f"run.output_dir={out}"])
            summary = run_training(cfg)
        finally:
            serve.shutdown()
            ray.shutdown()
    assert summary["judge_calls"] > 0 and summary["judge_failures"] == 0
    assert server.authorizations and set(server.authorizations) == {f"Bearer {CANARY}"}  # the key was really used
    for written in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (out / written).is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*")) and list((out / "wandb").rglob("*.wandb"))
    assert KEY_ENV in (out / "config.yaml").read_text()  # the variable's name is there, its value is not
    needle = CANARY.encode()
    assert files_holding(out, needle) == []
    assert files_holding(session, needle) == []
    for folder in wandb_dirs.values():
        assert not folder.exists() or files_holding(folder, needle) == []
    printed = capfd.readouterr()
    assert CANARY not in printed.out + printed.err
