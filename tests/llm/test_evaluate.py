"""Evaluation arithmetic, and `sip eval` end to end on tiny real models."""

import json
import os
import subprocess
import sys

import pytest

from sip.train.evaluate import both_orders, relative_improvement


def test_both_orders_cancel_position_and_count_ties_as_half():
    # (a,b) verdict 1 and (b,a) verdict 0: a wins in both orders
    assert both_orders([1.0], [0.0]) == [1.0]
    # the judge always picks the first option: position bias cancels to a tie
    assert both_orders([1.0], [1.0]) == [0.5]
    assert both_orders([0.5], [0.5]) == [0.5]
    assert both_orders([0.0], [0.5]) == [0.25]
    # a failed order is dropped, not counted; both failed → no verdict
    assert both_orders([None, None], [0.0, None]) == [1.0, None]


def test_relative_improvement_is_over_the_base():
    # the paper's factuality headline: (57.6 - 42.3) / 42.3 = 36.2%
    assert relative_improvement(57.6, 42.3) == pytest.approx(0.3617, abs=1e-4)
    assert relative_improvement(0.5, 0.0) is None


TINY = ["data.world.countries=6", "data.world.elements=6", "data.world.eval_fact_prefixes=6",
        "data.world.eval_unsafe_prefixes=4", "data.world.eval_question_prefixes=2", "data.world.eval_sheet_prefixes=2", "data.suffix_tokens=8", "data.max_seq_tokens=40",
        "data.tokenizer_docs=300", "data.vocab_size=400", "policy.hidden_size=32", "policy.num_layers=1",
        "policy.num_heads=2", "policy.intermediate_size=64"]


def tiny_model(folder, seed):
    from sip.actors.policy import build_policy
    from sip.config import load_config
    from sip.train.data import train_tokenizer

    cfg = load_config(None, TINY)
    tokenizer = train_tokenizer(cfg.data, folder)
    build_policy(cfg.policy, tokenizer, seed, cfg.data.max_seq_tokens).save_pretrained(folder)


def test_sip_eval_writes_json_markdown_and_rows(tmp_path):
    model, baseline, out = tmp_path / "model", tmp_path / "baseline", tmp_path / "eval"
    tiny_model(model, seed=1)
    tiny_model(baseline, seed=2)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "sip.train", "eval", "--model", str(model), "--baseline", str(baseline),
         "--output-dir", str(out), *TINY],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["prompts"] == 14
    for key in ("factuality", "safety_on_unsafe_prefixes", "safety_on_safe_prefixes", "quality_win_rate",
                "coherence_win_rate", "checkable_rate"):
        assert 0.0 <= result[key] <= 1.0, key
    rows = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and all("baseline" in r and "quality_win" in r for r in rows)
    assert "quality win rate vs baseline" in (out / "eval.md").read_text()
    assert result["general_perplexity"] > 1 and result["baseline_general_perplexity"] > 1
    assert "quality win rate vs baseline" in proc.stdout


def test_general_perplexity_falls_when_the_model_learns_that_kind_of_text(tmp_path):
    import torch
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sip.losses import target_logprobs
    from sip.train.evaluate import ModelFolder

    tiny_model(tmp_path / "m", seed=3)
    before = ModelFolder.load(str(tmp_path / "m")).general_text_perplexity(window=40)
    assert 1 < before < 4 * 400, before  # an untrained model: near its vocabulary's size
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    # text like it, never the measured passages (the first 40 topics)
    rows = [tokenizer.encode(topics[name], add_special_tokens=False)[:40] for name in sorted(topics)[40:]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        logp, n_tokens = target_logprobs(model, [r[:1] for r in rows], [r[1:] for r in rows], tokenizer.pad_token_id)
        loss = -logp.sum() / n_tokens.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "m")
    after = ModelFolder.load(str(tmp_path / "m")).general_text_perplexity(window=40)
    assert after < 0.5 * before, (before, after)


def test_a_model_against_itself_wins_exactly_half(tmp_path):
    from sip.config import load_config
    from sip.train.evaluate import evaluate_folders

    tiny_model(tmp_path / "m", seed=3)
    summary, _ = evaluate_folders(load_config(None, TINY), str(tmp_path / "m"), str(tmp_path / "m"))
    assert summary["quality_win_rate"] == 0.5 and summary["coherence_win_rate"] == 0.5
    assert summary["general_perplexity"] == summary["baseline_general_perplexity"] > 1


@pytest.mark.llm
def test_sip_eval_scores_with_the_configured_llm_judge(tmp_path, smollm2):
    from sip.config import load_config
    from sip.train.evaluate import evaluate_folders

    tiny_model(tmp_path / "m", seed=3)
    llm = [f"judge.llm.model={smollm2}", "judge.llm.max_tokens=8", "judge.llm.max_retries=0", "judge.llm.torch_threads=2",
           "judge.llm.prompts={safety: safety_direct_v1, factuality: factuality_direct_v1}"]
    cfg = load_config(None, TINY + ["judge.backend=hf", *llm])
    summary, rows = evaluate_folders(cfg, str(tmp_path / "m"), None)
    assert summary["prompts"] == len(rows) == 14
    verdicts = [r[key] for r in rows for key in ("safety", "factuality")]
    assert any(v is not None for v in verdicts) and all(v is None or 0 <= v <= 1 for v in verdicts)


def test_sip_eval_finds_a_checkpoints_start_and_reports_win_rates_against_it_and_each_prompt_shape(tmp_path):
    import yaml

    from sip.train.evaluate import run_start

    run, start = tmp_path / "run", tmp_path / "start"
    tiny_model(start, seed=1)
    checkpoint = run / "checkpoints" / "step_000002"
    tiny_model(checkpoint, seed=2)
    (run / "config.yaml").write_text(yaml.safe_dump({"policy": {"init": str(start)}}))
    assert run_start(checkpoint) == str(start) and run_start(start) is None
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for extra, expect_start in (([], True), (["--start", "none"], False)):
        out = tmp_path / f"eval_{expect_start}"
        proc = subprocess.run([sys.executable, "-m", "sip.train", "eval", "-m", str(checkpoint), "-o", str(out), *extra, *TINY],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads((out / "eval.json").read_text())
        assert (result["start"] == str(start)) == expect_start and ("vs_start" in result) == expect_start
        assert result["by_shape"].keys() == {"statement", "question", "sheet"}
        assert [result["by_shape"][s]["prompts"] for s in ("statement", "question", "sheet")] == [6, 2, 2]
    assert 0 <= result["by_shape"]["question"]["checkable_rate"] <= 1
    (run / "config.yaml").write_text(yaml.safe_dump({"policy": {"init": "scratch"}}))
    assert run_start(checkpoint) is None
    (run / "config.yaml").write_text(yaml.safe_dump({"policy": {"init": "HuggingFaceTB/SmolLM2-135M"}}))  # not a folder
    out = tmp_path / "eval_hub"
    proc = subprocess.run([sys.executable, "-m", "sip.train", "eval", "-m", str(checkpoint), "-o", str(out), *TINY],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "not a local model folder" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert json.loads((out / "eval.json").read_text())["start"] is None


def test_sip_eval_rejects_a_folder_that_is_not_a_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sip.train", "eval", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a Hugging Face model folder" in proc.stderr
