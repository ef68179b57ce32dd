"""sip against one plain process doing the same work: prefixes per second on the training clock.

    python bench/single_process.py --setting overlap   # K=2, 8 prefixes a step, N=32, pure DPO on rollouts
    python bench/single_process.py --setting default   # the default config
    python bench/single_process.py --setting overlap --steps 40 --repeats 2

The baseline: the same prompts, base model, sampling function, teacher, objective, optimizer and
schedule as a `sip train` run, in one process with no Ray: generate the rollouts (HF, as sip's
workers do), ask the rewriter and judge backends in-process (the scoring code the deployments run),
select, and take the DPO step on a plain, unsharded model, with torch using every core for each
stage in turn. Then `sip train` with the same settings, as a user runs it. Both clocks start at
the first step's batch (first step included); sip's "command to first step" is measured from the
command's start to its first row in metrics.jsonl. The base must be cached: the script runs
`sip train` first, which builds it if needed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "overlap": ["rollout.k=2", "train.batch_size=8", "data.suffix_tokens=32", "train.nll_coef=0",
                "train.candidates=[rollout]"],
    "default": [],
}


def sip_run(overrides: list[str], out: Path) -> dict:
    """`sip train` as a subprocess: its summary, and seconds from the command to its first step."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "sip.train", "train", "-o", str(out), *overrides],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_step = None
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if first_step is None and metrics.exists() and metrics.stat().st_size > 0:
            first_step = time.monotonic() - start
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"sip train failed:\n{proc.stderr.read()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["command_to_first_step_s"] = first_step
    summary["command_s"] = time.monotonic() - start
    return summary


def transformers_rollouts(model, prefixes: list[list[int]], n: int, pad_id: int, k: int, temperature: float, top_p: float):
    """Plain `model.generate`: K samples of exactly n tokens per prefix, each token's log-probability
    under the model (sip's rollouts before its lean decoding loop)."""
    import torch

    from sip.records import Rollout

    width = max(len(p) for p in prefixes)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prefixes])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, num_return_sequences=k,
                         do_sample=True, temperature=temperature, top_p=top_p, top_k=0, pad_token_id=pad_id,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, width:]
    logprobs = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    rows = [Rollout(i, lp) for i, lp in zip(new.tolist(), logprobs.tolist())]
    return [rows[i * k:(i + 1) * k] for i in range(len(prefixes))]


def baseline(overrides: list[str], lean: bool) -> dict:
    """The same work in this process, each stage using every core in turn; rollouts from
    `model.generate`, or with `lean` from sip's own decoding loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sip.actors.generator import candidates_for, judge_tasks
    from sip.actors.learner import warmup_cosine
    from sip.actors.policy import sample_rollouts
    from sip.config import load_config
    from sip.records import JudgedSample, Passage
    from sip.serve.backends import make_judge_backend, make_rewriter_backend
    from sip.serve.judge import score_tasks
    from sip.train.base import INFO_FILE, base_key
    from sip.train.data import Sampler

    torch.set_num_threads(os.cpu_count())
    cfg = load_config(None, overrides)
    base = Path(cfg.base.cache_dir).expanduser() / f"base-{base_key(cfg)}"
    info = json.loads((base / INFO_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(base)
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference = copy.deepcopy(policy).requires_grad_(False).eval() if cfg.objective.needs_reference else None
    t = cfg.train
    optimizer = torch.optim.AdamW(policy.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    sampler = Sampler(cfg.data, tokenizer, info["sampler"])
    judge = make_judge_backend(cfg.judge.backend, cfg.data, cfg.judge.llm) if cfg.needs_judge else None
    rewriter = make_rewriter_backend(cfg.rewriter.backend, cfg.data, cfg.rewriter.llm) if cfg.needs_rewriter else None
    n, k, pad = cfg.data.suffix_tokens, cfg.rollout.k, tokenizer.pad_token_id
    stage = {"generate": 0.0, "rewrite": 0.0, "judge": 0.0, "learner_step": 0.0}
    judged_prefixes = 0
    start = time.perf_counter()
    for index in range(t.steps):
        samples = sampler.take(t.batch_size)
        passages = [Passage(s.prefix, s.suffix, s.truth) for s in samples]
        mark = time.perf_counter()
        rewrites = asyncio.run(rewriter.rewrite(passages)) if rewriter else []
        stage["rewrite"] += time.perf_counter() - mark
        mark = time.perf_counter()
        rollouts = [[] for _ in samples]
        if "rollout" in t.candidates:
            torch.manual_seed(cfg.run.seed * 1_000_003 + index)
            prefixes, r = [s.prefix_ids for s in samples], cfg.rollout
            rollouts = (sample_rollouts(policy.eval(), prefixes, n, pad, samples=k, temperature=r.temperature, top_p=r.top_p)
                        if lean else transformers_rollouts(policy.eval(), prefixes, n, pad, k, r.temperature, r.top_p))
        stage["generate"] += time.perf_counter() - mark
        candidates, _ = candidates_for(t.candidates, tokenizer, n, samples, rollouts, index, rewrites)
        mark = time.perf_counter()
        results = asyncio.run(score_tasks(judge, judge_tasks(passages, candidates, cfg.judge.pivot, cfg.objective.needs_rejected), cfg.judge))
        stage["judge"] += time.perf_counter() - mark
        judged = [JudgedSample(s, c, reward=r.reward, scores=r.scores, complete=r.complete)
                  for s, c, r in zip(samples, candidates, results)]
        judged_prefixes += len(judged)
        examples = [cfg.objective.select(j, cfg.run.seed) for j in judged if cfg.objective.skip_reason(j) is None]
        mark = time.perf_counter()
        policy.train()
        if examples:
            totals = {"examples": len(examples), "chosen_tokens": sum(len(e.chosen_ids) for e in examples)}
            loss, _ = cfg.objective.micro_batch(policy, reference, examples, totals, t.beta, t.nll_coef, pad)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        schedule.step()
        stage["learner_step"] += time.perf_counter() - mark
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "prefixes_per_s": judged_prefixes / seconds,
            "s_per_step": {k: round(v / t.steps, 4) for k, v in stage.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="overlap")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--keep", type=Path, help="keep sip's run folders here (run_0, run_1, ...), for bench/stage_times.py")
    parser.add_argument("overrides", nargs="*", help="more config overrides, for both")
    args = parser.parse_args()
    overrides = SETTINGS[args.setting] + [f"train.steps={args.steps}", "run.eval_at_end=false", "run.progress=false",
                                          "run.checkpoint_every=0"] + args.overrides
    rows = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="sip-bench-") as tmp:
            sip = sip_run(overrides, (args.keep or Path(tmp)) / f"run_{repeat}")
        plain = baseline(overrides, lean=False)
        lean = baseline(overrides, lean=True)
        sip_rate = sip["samples_per_s"]
        rows.append({"repeat": repeat, "sip_prefixes_per_s": round(sip_rate, 2),
                     "single_process_prefixes_per_s": round(plain["prefixes_per_s"], 2),
                     "ratio": round(sip_rate / plain["prefixes_per_s"], 2),
                     "single_process_lean_prefixes_per_s": round(lean["prefixes_per_s"], 2),
                     "ratio_to_lean": round(sip_rate / lean["prefixes_per_s"], 2),
                     "sip_train_seconds": sip["train_seconds"], "single_process_seconds": round(plain["train_seconds"], 2),
                     "sip_command_to_first_step_s": round(sip["command_to_first_step_s"] or float("nan"), 1),
                     "sip_learner_idle": sip["final"].get("learner_idle"),
                     "single_process_s_per_step": plain["s_per_step"], "single_process_lean_s_per_step": lean["s_per_step"]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"setting {args.setting}, {args.steps} steps, {os.cpu_count()} cores: sip / single process = "
          + ", ".join(str(r["ratio"]) for r in rows))


if __name__ == "__main__":
    main()
