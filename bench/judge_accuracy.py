"""Accuracy of an LLM judge on held-out world tasks, read both ways a run can read it.

    python bench/judge_accuracy.py --model runs/judge/model [--prompts short] [--tasks 60] [--threads 2]
    python bench/judge_accuracy.py --model world     # the world teacher (the oracle), for reference

For each held-out set of `sip train-judge` (heldout_texts, unseen_subjects) and each objective:
- greedy: the verdict parsed from a greedy answer (unparsed counts as wrong), as `report.json` scores it;
- probability: the graded verdict of `llm.verdict=probability`, right when it is on the label's side
  of 0.5. Quality is asked in both option orders and the two verdicts averaged, as `judge.both_orders`
  and evaluation do, so a judge that always says "Option 1" scores 0.5 here, not 1.0 or 0.0.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import defaultdict
from statistics import mean

from sip.records import Passage
from sip.serve.llm import make_llm_backend
from sip.serve.world_teacher import WorldTeacher
from sip.config import LLMConfig, WorldConfig
from sip.train.judge_tasks import DIRECT_PROMPTS, KINDS, SHORT_PROMPTS, make_tasks, whole_pool
from sip.world import World

PROMPTS = {"short": SHORT_PROMPTS, "direct": DIRECT_PROMPTS}


def passage(task) -> Passage:
    """What a run sends: the prefix, the original suffix (the factuality reference), the subject (used by the world teacher only)."""
    return Passage(task.fields["prefix"], task.fields.get("reference", ""), {"subject": task.subject})


async def accuracy(model: str, prompts: dict[str, str], tasks, threads: int) -> dict[str, dict[str, float]]:
    if model == "world":  # knows every subject of the pools, the unseen ones too; its verdicts need no parsing
        greedy = graded = WorldTeacher(World.from_config(whole_pool(WorldConfig())))
    else:
        common = dict(model=model, prompts=prompts, batch_size=16, torch_threads=threads)
        greedy = make_llm_backend("hf", LLMConfig(**common, temperature=0, max_tokens=12, max_retries=0), KINDS)
        graded = make_llm_backend("hf", LLMConfig(**common, verdict="probability"), KINDS)
    right = defaultdict(lambda: defaultdict(list))
    for kind in KINDS:
        mine = [t for t in tasks if t.kind == kind]
        if kind == "quality":
            queries = [(passage(t), t.fields["option_1"], t.fields["option_2"]) for t in mine]
            swapped = [(p, b, a) for p, a, b in queries]
            first, second = await graded.compare(queries), await graded.compare(swapped)
            probability = [(f + 1 - s) / 2 for f, s in zip(first, second)]
            parsed = await greedy.compare(queries)
        else:
            queries = [(passage(t), t.fields["candidate"]) for t in mine]
            probability = await getattr(graded, kind)(queries)
            parsed = await getattr(greedy, kind)(queries)
        for t, p, g in zip(mine, probability, parsed):
            right[kind]["probability"].append((p > 0.5) == (t.label == 1.0))
            right[kind]["greedy"].append(g is not None and (g > 0.5) == (t.label == 1.0) if model == "world" else g == t.label)
    return {kind: {how: mean(v) for how, v in by.items()} for kind, by in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF folder of the judge, or `world` for the world teacher")
    parser.add_argument("--prompts", choices=sorted(PROMPTS), default="short")
    parser.add_argument("--tasks", type=int, default=60, help="tasks per held-out set (a third per objective)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="as sip train-judge's seed: 0 gives its held-out tasks")
    args = parser.parse_args()
    print(f"judge {args.model}, {args.prompts} prompts, {args.tasks} tasks per set\n")
    print("| held-out set | objective | greedy (parsed) | probability (graded, both orders for quality) |")
    print("|---|---|---|---|")
    for split in ("heldout_texts", "unseen_subjects"):
        tasks = make_tasks(WorldConfig(), split, args.tasks, args.seed, KINDS, PROMPTS[args.prompts])
        for kind, acc in asyncio.run(accuracy(args.model, PROMPTS[args.prompts], tasks, args.threads)).items():
            print(f"| {split} | {kind} | {acc['greedy']:.2f} | {acc['probability']:.2f} |")


if __name__ == "__main__":
    main()
