"""Pairwise calls and pick quality of each quality protocol, scored against the truth.

    python bench/judge_protocols.py [--prefixes 100] [--repeats 3] [--ks 4,8,16] [--noise 0,0.1,0.2,0.3] \
        [--budgets 1/3,0.45] [judge.tournament_rounds=3 judge.tournament_finalists=4 ...]

Candidates per prefix: the suffix, the world teacher's rewrite and K rollout-like texts drawn from
the world (the suffix with some words swapped for words of other documents, a window of another
document, a window of the same document further on, or a loop of the suffix's first words). A
candidate's true quality is the world teacher's noise-free quality score. The judge under test
compares by that score, as the world teacher does (ties within its margin), and then errs: the first
option wins every tie and 10% of close calls (scores within 0.1), and any verdict is flipped with
probability `noise`. Selection is the training code's own (sip/objectives.py, objective dpo).
With `--budgets`, the tournament runs once per judge.tournament_budget (its cost against its picks).

Per K, protocol and noise: pairwise calls per prefix, how often the chosen candidate is truly best
(its true score the highest) and the rejected truly worst, their mean true ranks (1 = best; for the
rejected, 1 = worst), and the mean true score gap chosen − rejected beside the largest possible one.
Pure Python on one core: a few seconds. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from fractions import Fraction
from itertools import islice
from statistics import mean

from sip.records import Passage
from sip.records import JudgeTask
from sip.serve.judge import score_tasks
from sip.serve.world_teacher import TIE_MARGIN, WorldTeacher
from sip.config import DataConfig, load_config
from sip.records import Candidate, JudgedSample, Sample
from sip.objectives import OBJECTIVES
from sip.world import World

PROTOCOLS = ("round_robin", "pivot", "tournament")
CLOSE = 0.1  # a close call: true scores this near, where a biased judge leans to the first option
CLOSE_BIAS = 0.1
SUFFIX_WORDS = 24


class NoisyJudge:
    """Compares by known true scores, with position bias on ties and close calls and random flips."""

    def __init__(self, true: dict[tuple[str, str], float], noise: float, seed: int):
        self.true, self.noise, self.rng = true, noise, random.Random(seed)
        self.calls = 0

    async def compare(self, queries):
        self.calls += len(queries)
        return [self.verdict(self.true[(p.prefix, a)] - self.true[(p.prefix, b)]) for p, a, b in queries]

    def verdict(self, diff: float) -> float:
        if abs(diff) <= TIE_MARGIN:
            v = 1.0
        elif abs(diff) <= CLOSE and self.rng.random() < CLOSE_BIAS:
            v = 1.0
        else:
            v = 1.0 if diff > 0 else 0.0
        return 1 - v if self.rng.random() < self.noise else v


def prefixes(count: int, seed: int) -> list[tuple[Passage, list[str]]]:
    """World passages cut at a word boundary, each with a pool of words from other documents."""
    world = World.from_config(load_config(None, []).data.world)
    docs = list(islice((d for d in world.documents(seed) if len(d.text.split()) > 3 * SUFFIX_WORDS), count))
    rng = random.Random(seed)
    out = []
    for i, doc in enumerate(docs):
        words = doc.text.split()
        cut = rng.randrange(SUFFIX_WORDS, len(words) - 2 * SUFFIX_WORDS)
        passage = Passage(" ".join(words[:cut]), " " + " ".join(words[cut : cut + SUFFIX_WORDS]), {"subject": doc.subject})
        out.append((passage, [docs[(i + 1 + k) % len(docs)].text for k in range(3)]))
    return out


def rollout_like(passage: Passage, others: list[str], rng: random.Random) -> str:
    own = passage.suffix.split()
    kind = rng.random()
    if kind < 0.4:  # an untrained policy's word salad, from mild to heavy
        pool = " ".join(others).split()
        share = rng.choice([0.1, 0.25, 0.5, 0.8])
        words = [rng.choice(pool) if rng.random() < share else w for w in own]
    elif kind < 0.6:  # fluent but about something else
        words = rng.choice(others).split()[: len(own)]
    elif kind < 0.85:  # the same document, skipping ahead
        rest = (passage.prefix + passage.suffix).split()
        start = rng.randrange(0, max(len(rest) - len(own), 1))
        words = rest[start : start + len(own)]
    else:  # a loop
        unit = own[: rng.randint(2, 5)]
        words = (unit * len(own))[: len(own)]
    return " " + " ".join(words)


def trial_set(teacher: WorldTeacher, passages, k: int, seed: int, distinct: bool = False):
    """Each passage's candidates; with `distinct`, rollout-like texts are drawn again until no two
    candidates are the same (a sampled policy's rollouts mostly differ; the world's draws often repeat)."""
    rng = random.Random(f"{seed}:{k}")
    rewrites = asyncio.run(teacher.rewrite([p for p, _ in passages]))
    sets = []
    for (passage, others), rewrite in zip(passages, rewrites, strict=True):
        texts = [passage.suffix, rewrite]
        for _ in range(k):
            text = rollout_like(passage, others, rng)
            while distinct and text in texts:
                text = rollout_like(passage, others, rng)
            texts.append(text)
        sets.append((passage, texts))
    return sets


def run_cell(sets, true, protocol: str, noise: float, seed: int, overrides: list[str] = ()) -> dict:
    cfg = load_config(None, ["judge.weights={quality: 1}", f"judge.pairwise={protocol}", *overrides]).judge
    judge = NoisyJudge(true, noise, seed)
    tasks = [JudgeTask(p, texts, pivot=0) for p, texts in sets]
    results = asyncio.run(score_tasks(judge, tasks, cfg))
    best = worst = ranks = rejected_ranks = gaps = ideal = skipped = 0
    for n, ((passage, texts), result) in enumerate(zip(sets, results, strict=True)):
        scores = [true[(passage.prefix, t)] for t in texts]
        sample = Sample(f"bench:{n}", [0], [0], passage.prefix, passage.suffix)
        cands = [Candidate("rollout", [i], t) for i, t in enumerate(texts)]
        example = OBJECTIVES["dpo"].select(JudgedSample(sample, cands, result.reward, result.scores, result.complete), seed)
        ideal += max(scores) - min(scores)
        if example is None:  # every candidate scored the same: DPO skips the sample
            skipped += 1
            continue
        chosen, rejected = scores[example.chosen_ids[0]], scores[example.rejected_ids[0]]
        best += chosen == max(scores)
        worst += rejected == min(scores)
        ranks += 1 + sum(s > chosen for s in scores)
        rejected_ranks += 1 + sum(s < rejected for s in scores)
        gaps += chosen - rejected
    used = len(sets) - skipped
    return {
        "calls": judge.calls / len(sets), "best": best / used, "worst": worst / used, "rank": ranks / used,
        "rejected_rank": rejected_ranks / used, "gap": gaps / used, "ideal": ideal / len(sets), "skipped": skipped / len(sets),
    }


def budget_list(text: str) -> list[tuple[str, float]]:
    """--budgets: each as written (its row's name) and as a share of round robin's comparisons."""
    try:
        budgets = [(b.strip(), float(Fraction(b.strip()))) for b in text.split(",")]
    except (ValueError, ZeroDivisionError):
        budgets = []
    if not budgets or not all(0 < share <= 1 for _, share in budgets):
        raise argparse.ArgumentTypeError(f"{text!r}: give shares in (0, 1] separated by commas, e.g. 1/3,0.45")
    return budgets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefixes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="noise draws per prefix")
    ap.add_argument("--ks", default="4,8,16", help="rollouts per prefix (candidates = suffix + rewrite + K)")
    ap.add_argument("--noise", default="0,0.1,0.2,0.3", help="flip probabilities")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distinct", action="store_true", help="no two candidates of a prefix alike")
    ap.add_argument("--budgets", type=budget_list, default=None, help="tournament budgets to compare, e.g. 1/3,0.45 (default: the config's)")
    ap.add_argument("overrides", nargs="*", help="judge settings for every protocol, e.g. judge.tournament_finalists=3")
    args = ap.parse_args()
    teacher = WorldTeacher.from_config(DataConfig())
    passages = prefixes(args.prefixes, args.seed)
    print(f"{args.prefixes} world prefixes x {args.repeats} noise draws; candidates = suffix + rewrite + K"
          f"{', all distinct' if args.distinct else ''}; bias: first option wins ties and {CLOSE_BIAS:.0%} of calls "
          f"within {CLOSE}; {' '.join(args.overrides) or 'default judge settings'}\n")
    print("| K | n | protocol | noise | calls/prefix | chosen truly best | rejected truly worst | chosen rank "
          "| rejected rank (from worst) | true gap (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in (int(x) for x in args.ks.split(",")):
        sets = trial_set(teacher, passages, k, args.seed, args.distinct)
        true = {(p.prefix, t): teacher.quality_score(p.prefix, t, p.truth["subject"]) for p, texts in sets for t in texts}
        for protocol in PROTOCOLS:
            for budget in (args.budgets if protocol == "tournament" and args.budgets else [None]):
                name, overrides = protocol, list(args.overrides)
                if budget is not None:
                    name, overrides = f"tournament, budget {budget[0]}", [*overrides, f"judge.tournament_budget={budget[1]}"]
                for noise in (float(x) for x in args.noise.split(",")):
                    cells = [run_cell(sets, true, protocol, noise, args.seed * 1000 + r, overrides) for r in range(args.repeats)]
                    m = {key: mean(c[key] for c in cells) for key in cells[0]}
                    print(f"| {k} | {k + 2} | {name} | {noise} | {m['calls']:.1f} | {m['best']:.0%} | {m['worst']:.0%} | "
                          f"{m['rank']:.2f} | {m['rejected_rank']:.2f} | {m['gap']:.3f} ({m['ideal']:.3f}) |")


if __name__ == "__main__":
    main()
