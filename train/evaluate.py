"""Held-out evaluation: greedy N-token continuations scored by the configured judge.

World runs use the world's held-out prefixes: "fact" ones end right before a fact (factuality),
"unsafe" ones end right after an unsafe lead-in (safety). Other sources use their held-out head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from sip.serve.backends import Passage
from sip.train.config import SipConfig


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    kind: str  # "fact" | "unsafe" | "text"
    prefix_ids: list[int]
    passage: Passage  # prefix text, reference continuation, truth
    contested: bool = False  # "fact" prompts: the asked fact is contested (raw text mostly misstates it)


def eval_prompts(cfg: SipConfig, tokenizer) -> list[EvalPrompt]:
    keep = cfg.data.max_seq_tokens - cfg.data.suffix_tokens
    if cfg.data.source == "world":
        from sip.train.world import World

        prompts = []
        for p in World.from_config(cfg.data.world).eval_prefixes():
            ids = tokenizer.encode(p.text, add_special_tokens=False)[-keep:]
            passage = Passage(tokenizer.decode(ids), p.reference, {"subject": p.subject})
            prompts.append(EvalPrompt(p.id, p.kind, ids, passage, p.contested))
        return prompts
    from sip.train.data import cut_sample, iter_eval_documents, skip_reason

    prompts = []
    for index, text, truth in iter_eval_documents(cfg.data):
        sample = None if skip_reason(text) else cut_sample(cfg.data, tokenizer, f"eval:{index}", text, truth)
        if sample is not None:
            prompts.append(EvalPrompt(sample.id, "text", sample.prefix_ids, Passage(sample.prefix, sample.suffix, truth)))
    return prompts


def evaluate(cfg: SipConfig, learner, tokenizer, out: Path | None = None) -> dict:
    """Greedy continuations from the learner's policy, judged for factuality and safety."""
    import ray
    from ray import serve

    from sip.serve.judge import JUDGE_APP

    timeout = cfg.pipeline.timeout_s
    prompts = eval_prompts(cfg, tokenizer)
    continuations = ray.get(learner.greedy.remote([p.prefix_ids for p in prompts], cfg.data.suffix_tokens), timeout=timeout)
    texts = [tokenizer.decode(ids) for ids in continuations]
    judge = serve.get_app_handle(JUDGE_APP)
    queries = [(p.passage, t) for p, t in zip(prompts, texts)]
    safety = judge.pointwise.remote("safety", queries).result(timeout_s=timeout)
    factuality = judge.pointwise.remote("factuality", queries).result(timeout_s=timeout)
    if out is not None:
        with open(out / "eval_samples.jsonl", "w") as f:
            for p, t, s, fa in zip(prompts, texts, safety, factuality):
                f.write(json.dumps({"id": p.id, "kind": p.kind, "contested": p.contested, "prefix": p.passage.prefix,
                                    "continuation": t, "safety": s, "factuality": fa}) + "\n")
    return summarize([p.kind for p in prompts], safety, factuality, [p.contested for p in prompts])


def summarize(kinds: list[str], safety: list, factuality: list, contested: list[bool] | None = None) -> dict:
    """Mean scores; `contested` marks the "fact" prompts that ask about a contested fact (None: none do)."""
    def avg(values) -> float | None:
        values = [v for v in values if v is not None]
        return round(mean(values), 4) if values else None

    fact_kinds = {"fact", "text"}
    contested = contested or [False] * len(kinds)
    return {
        "prompts": len(kinds),
        "factuality": avg(f for k, f in zip(kinds, factuality) if k in fact_kinds),
        "checkable_rate": avg(float(f != 0.5) for k, f in zip(kinds, factuality) if k in fact_kinds and f is not None),
        "safety": avg(safety),
        "safety_on_unsafe_prefixes": avg(s for k, s in zip(kinds, safety) if k == "unsafe"),
        "safety_on_fact_prefixes": avg(s for k, s in zip(kinds, safety) if k in fact_kinds),
        "factuality_contested": avg(f for k, f, c in zip(kinds, factuality, contested) if k == "fact" and c),
        "factuality_uncontested": avg(f for k, f, c in zip(kinds, factuality, contested) if k == "fact" and not c),
    }
