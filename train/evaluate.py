"""Held-out evaluation, the paper's way (method notes §5.1), with whichever judge is configured.

Greedy N-token continuations of held-out prefixes are scored for factuality (pointwise, the
original continuation as reference), safety (on safe and on unsafe-inviting prefixes separately),
and, against a baseline model's continuations, quality and coherence win rates (pairwise, both
orders, ties count ½). World runs use the world's held-out prefixes; other sources use the
held-out head of their stream.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from sip.records import Passage, Verdict
from sip.serve.backends import JudgeBackend
from sip.config import SipConfig

FACT_KINDS = ("fact", "text")


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    kind: str  # "fact" | "unsafe" | "text"
    passage: Passage  # prefix text, reference continuation, truth
    contested: bool = False  # "fact" prompts: the asked fact is contested (raw text mostly misstates it)
    shape: str = ""  # "fact" prompts: statement, question or sheet (sip/world.py EvalPrefix.shape)


def eval_prompts(cfg: SipConfig, tokenizer) -> list[EvalPrompt]:
    """The held-out prompts; `tokenizer` cuts plain-text documents the way training does."""
    if cfg.data.source == "world":
        from sip.world import World

        return [
            EvalPrompt(p.id, p.kind, Passage(p.text, p.reference, {"subject": p.subject}), p.contested, p.shape)
            for p in World.from_config(cfg.data.world).eval_prefixes()
        ]
    from sip.train.data import cut_sample, iter_eval_documents, skip_reason

    prompts = []
    for index, text, truth in iter_eval_documents(cfg.data):
        sample = None if skip_reason(text) else cut_sample(cfg.data, tokenizer, f"eval:{index}", text, truth)
        if sample is not None:
            prompts.append(EvalPrompt(sample.id, "text", Passage(sample.prefix, sample.suffix, truth)))
    return prompts


def prompt_ids(cfg: SipConfig, tokenizer, prompts: list[EvalPrompt]) -> list[list[int]]:
    keep = cfg.data.max_seq_tokens - cfg.data.suffix_tokens
    return [tokenizer.encode(p.passage.prefix, add_special_tokens=False)[-keep:] for p in prompts]


def both_orders(first: list[Verdict], swapped: list[Verdict]) -> list[Verdict]:
    """Win of a over b from verdicts on (a, b) and on (b, a); one missing order uses the other."""
    wins = []
    for ab, ba in zip(first, swapped, strict=True):
        orders = [v for v in (ab, None if ba is None else 1 - ba) if v is not None]
        wins.append(sum(orders) / len(orders) if orders else None)
    return wins


def relative_improvement(value: float, base: float) -> float | None:
    """(value − base) / base, as the paper reports gains over its base model."""
    return (value - base) / base if base else None


def _checkable(rows: list[dict]) -> float | None:
    """The share of continuations that state a checkable fact (a verdict other than 0.5)."""
    return _avg(float(r["factuality"] != 0.5) for r in rows if r["factuality"] is not None)


def _avg(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(mean(values), 4) if values else None


async def score(judge: JudgeBackend, prompts: list[EvalPrompt], texts: list[str],
                baseline_texts: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Summary metrics and one row per prompt. `judge` is a backend or a deployment's adapter."""
    single = [(p.passage, t) for p, t in zip(prompts, texts)]
    safety, factuality = await asyncio.gather(judge.safety(single), judge.factuality(single))
    rows = [
        {"id": p.id, "kind": p.kind, "shape": p.shape, "contested": p.contested, "prefix": p.passage.prefix,
         "continuation": t, "safety": s, "factuality": f}
        for p, t, s, f in zip(prompts, texts, safety, factuality)
    ]
    facts = [r for r in rows if r["kind"] in FACT_KINDS]
    summary = {
        "prompts": len(rows),
        "factuality": _avg(r["factuality"] for r in facts),
        "checkable_rate": _checkable(facts),
        "factuality_contested": _avg(r["factuality"] for r in facts if r["kind"] == "fact" and r["contested"]),
        "factuality_uncontested": _avg(r["factuality"] for r in facts if r["kind"] == "fact" and not r["contested"]),
        "safety": _avg(r["safety"] for r in rows),
        "safety_on_unsafe_prefixes": _avg(r["safety"] for r in rows if r["kind"] == "unsafe"),
        "safety_on_safe_prefixes": _avg(r["safety"] for r in facts),
    }
    shapes = dict.fromkeys(r["shape"] for r in facts if r["shape"])
    if shapes:  # per shape, so a model that answers one way of asking and dodges another shows it
        summary["by_shape"] = {
            shape: {"prompts": len(of), "factuality": _avg(r["factuality"] for r in of), "checkable_rate": _checkable(of),
                    "factuality_contested": _avg(r["factuality"] for r in of if r["contested"])}
            for shape in shapes
            if (of := [r for r in facts if r["shape"] == shape])
        }
    if baseline_texts is not None:
        wins, per_prompt = await win_rates(judge, prompts, texts, baseline_texts)
        summary.update(wins)
        for row, b, (q, c) in zip(rows, baseline_texts, per_prompt):
            row.update(baseline=b, quality_win=q, coherence_win=c)
    return summary, rows


async def win_rates(judge: JudgeBackend, prompts: list[EvalPrompt], texts: list[str],
                    other_texts: list[str]) -> tuple[dict, list[tuple[Verdict, Verdict]]]:
    """Quality and coherence win rates of `texts` over `other_texts` (both orders, ties ½), and each
    prompt's (quality, coherence) win."""
    pairs = [(p.passage, t, b) for p, t, b in zip(prompts, texts, other_texts)]
    swapped = [(p, b, t) for p, t, b in pairs]
    quality = both_orders(*await asyncio.gather(judge.compare(pairs), judge.compare(swapped)))
    coherence = both_orders(*await asyncio.gather(judge.coherence(pairs), judge.coherence(swapped)))
    summary = {
        "quality_win_rate": _avg(quality),
        "quality_win_rate_unsafe_prefixes": _avg(q for p, q in zip(prompts, quality) if p.kind == "unsafe"),
        "coherence_win_rate": _avg(coherence),
    }
    return summary, list(zip(quality, coherence))


class DeploymentJudge:
    """The judge Serve deployment behind the backend interface, for evaluation inside a run."""

    def __init__(self, handle, timeout: float):
        self.handle, self.timeout = handle, timeout

    async def _call(self, method: str, *args):
        return await asyncio.wait_for(getattr(self.handle, method).remote(*args), self.timeout)

    async def safety(self, queries):
        return await self._call("pointwise", "safety", queries)

    async def factuality(self, queries):
        return await self._call("pointwise", "factuality", queries)

    async def compare(self, queries):
        return await self._call("compare", queries)

    async def coherence(self, queries):
        return await self._call("coherence", queries)


def evaluate(cfg: SipConfig, learner, tokenizer, judge_app: str, out: Path | None = None) -> dict:
    """Greedy continuations from the learner group's policy, scored by the run's judge app `judge_app`."""
    from ray import serve

    prompts = eval_prompts(cfg, tokenizer)
    ids = learner.greedy(prompt_ids(cfg, tokenizer, prompts), cfg.data.suffix_tokens)
    judge = DeploymentJudge(serve.get_app_handle(judge_app), cfg.pipeline.timeout_s)
    summary, rows = asyncio.run(score(judge, prompts, [tokenizer.decode(i) for i in ids]))
    if out is not None:
        write_rows(out / "eval_samples.jsonl", rows)
    return summary


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class ModelFolder:
    """An HF folder's model and tokenizer, loaded once in this process (for `sip eval`)."""

    model: Any
    tokenizer: Any
    pad_id: int

    @classmethod
    def load(cls, model_dir: str) -> ModelFolder:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tokenizer, pad_id)

    def greedy_texts(self, cfg: SipConfig, prompts: list[EvalPrompt], batch_size: int = 32) -> list[str]:
        from sip.actors.policy import greedy_batched

        out = greedy_batched(self.model, prompt_ids(cfg, self.tokenizer, prompts), cfg.data.suffix_tokens, self.pad_id,
                             batch_size)
        return [self.tokenizer.decode(o) for o in out]

    def general_text_perplexity(self, window: int, passages: int = 40) -> float:
        """Perplexity on general English that no world or training stream contains: the first `window` tokens
        of each of the first `passages` topics of Python's own reference documentation (`pydoc_data.topics`,
        shipped with every CPython). Per token of the model's tokenizer, so compare models that share one
        (a start model and what was trained from it), on one Python version."""
        import math

        import torch
        from pydoc_data.topics import topics

        from sip.losses import target_logprobs

        rows = [self.tokenizer.encode(topics[name], add_special_tokens=False)[:window] for name in sorted(topics)[:passages]]
        total, count = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(rows), 8):
                batch = rows[i : i + 8]
                logp, n_tokens = target_logprobs(self.model, [r[:1] for r in batch], [r[1:] for r in batch], self.pad_id)
                total, count = total - logp.sum().item(), count + n_tokens.sum().item()
        return round(math.exp(total / count), 3)


def evaluate_folders(cfg: SipConfig, model_dir: str, baseline_dir: str | None,
                     start_dir: str | None = None, memo: dict | None = None) -> tuple[dict, list[dict]]:
    """`sip eval`: score a model folder (and win rates against a baseline folder) with the configured judge,
    and each folder's perplexity on general text. With `start_dir`, the model it was trained from, also
    the win rates against that start (`vs_start`: the paper's reference, its base model). `memo`, a dict
    the caller keeps between calls, holds what each folder generated, so a folder met again (sip experiment
    compares every row with the same start and baseline) is not run again."""
    from sip.serve.backends import make_judge_backend

    model = ModelFolder.load(model_dir)
    prompts = eval_prompts(cfg, model.tokenizer)
    outputs = _FolderOutputs(cfg, prompts, {} if memo is None else memo, {model_dir: model})
    texts, perplexity = outputs.texts(model_dir), outputs.perplexity(model_dir)
    baseline_texts = baseline_perplexity = None
    if baseline_dir:
        baseline_texts, baseline_perplexity = outputs.texts(baseline_dir), outputs.perplexity(baseline_dir)
    judge = make_judge_backend(cfg.judge.backend, cfg.data, cfg.evaluation.llm(cfg.judge.llm))
    summary, rows = asyncio.run(score(judge, prompts, texts, baseline_texts))
    summary["general_perplexity"] = perplexity
    if baseline_dir:
        summary["baseline_general_perplexity"] = baseline_perplexity
    if start_dir:
        start_texts = outputs.texts(start_dir)
        summary["vs_start"], _ = asyncio.run(win_rates(judge, prompts, texts, start_texts))
    return summary, rows


@dataclass
class _FolderOutputs:
    """Each folder's greedy continuations of `prompts` and its general-text perplexity, taken from `memo`
    where an earlier call computed them for the same folder, prompts and lengths."""

    cfg: SipConfig
    prompts: list[EvalPrompt]
    memo: dict
    models: dict[str, ModelFolder]

    def texts(self, folder: str) -> list[str]:
        key = ("texts", str(Path(folder).resolve()), self.cfg.data.suffix_tokens, self.cfg.data.max_seq_tokens,
               tuple((p.id, p.passage.prefix) for p in self.prompts))
        if key not in self.memo:
            self.memo[key] = self._model(folder).greedy_texts(self.cfg, self.prompts)
        return self.memo[key]

    def perplexity(self, folder: str) -> float:
        key = ("perplexity", str(Path(folder).resolve()), self.cfg.data.max_seq_tokens)
        if key not in self.memo:
            self.memo[key] = self._model(folder).general_text_perplexity(self.cfg.data.max_seq_tokens)
        return self.memo[key]

    def _model(self, folder: str) -> ModelFolder:
        if folder not in self.models:
            self.models[folder] = ModelFolder.load(folder)
        return self.models[folder]


def run_start(model_dir: str | Path) -> str | None:
    """The model a run's checkpoint (RUN/checkpoints/step_N) was trained from: the policy.init its run
    recorded in RUN/config.yaml (the base folder when the run built one). None for a run from scratch,
    a resumed run that did not record it, or a folder that is no run's checkpoint."""
    import yaml

    folder = Path(model_dir).resolve()
    config = folder.parents[1] / "config.yaml" if folder.parent.name == "checkpoints" else None
    if config is None or not config.exists():
        return None
    init = ((yaml.safe_load(config.read_text()) or {}).get("policy") or {}).get("init", "scratch")
    return None if init == "scratch" else str(init)


METRIC_LABELS = {
    "factuality": "factuality (fact prefixes)",
    "factuality_contested": "  on contested facts",
    "factuality_uncontested": "  on uncontested facts",
    "checkable_rate": "continuations stating a checkable fact",
    **{f"by_shape.{shape}.{name}": f"  {label}, {text}" for shape, text in (
        ("statement", "prefixes cut mid-statement"), ("question", "question prefixes (Q: ... A:)"),
        ("sheet", "fact-sheet prefixes (Label:)"))
       for name, label in (("factuality", "factuality"), ("checkable_rate", "checkable"))},
    "safety_on_safe_prefixes": "safety, safe prefixes",
    "safety_on_unsafe_prefixes": "safety, unsafe-inviting prefixes",
    "quality_win_rate": "quality win rate vs baseline",
    "quality_win_rate_unsafe_prefixes": "  on unsafe-inviting prefixes",
    "coherence_win_rate": "coherence win rate vs baseline",
    "vs_start.quality_win_rate": "quality win rate vs the start model",
    "vs_start.quality_win_rate_unsafe_prefixes": "  on unsafe-inviting prefixes",
    "vs_start.coherence_win_rate": "coherence win rate vs the start model",
    "general_perplexity": "perplexity on general text (Python's docs)",
    "baseline_general_perplexity": "  the baseline's",
}


def metric(summary: dict, key: str) -> float | None:
    """A summary's value at a dotted key (`vs_start.quality_win_rate`), or None."""
    value: Any = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def reported(summary: dict) -> list[tuple[str, float]]:
    """(label, value) for each metric of METRIC_LABELS the summary holds."""
    return [(label, value) for key, label in METRIC_LABELS.items() if (value := metric(summary, key)) is not None]


def markdown_report(summary: dict, model_dir: str, baseline_dir: str | None, start_dir: str | None = None) -> str:
    lines = [f"# Evaluation of `{model_dir}`", ""]
    if baseline_dir:
        lines += [f"Baseline for win rates: `{baseline_dir}` (pairwise, both orders, ties count ½).", ""]
    if start_dir:
        lines += [f"Start model (the paper's reference for win rates): `{start_dir}`.", ""]
    lines += [f"{summary['prompts']} held-out prompts, greedy continuations.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label.strip()} | {value:.3f} |" for label, value in reported(summary)]
    return "\n".join(lines) + "\n"
