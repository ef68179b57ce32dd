"""The judge deployment: turns a backend's primitive verdicts into one reward per candidate.

Quality is pairwise, by one of three protocols (`judge.pairwise`), each asking every comparison in
a random order (seeded by the sample), so a judge's position bias is noise rather than a side taken
for the candidates listed first (the suffix and the rewrite) or last (the rollouts):
- round_robin: every pair of candidates; a candidate's quality is its win rate (win 1, tie ½);
- pivot: every candidate against one pivot (the suffix or the rewrite); the same win rate. A sample
  whose pivot is missing (its rewrite came back empty) has no quality score: the protocol is never
  swapped for another behind the user's back;
- tournament: Swiss rounds, then a playoff among the leaders and one among the last, to find the
  best and the worst within a share of round robin's comparisons (`judge.tournament_budget`, a
  third by default: at 18 texts at most 51, round robin 153);
  a candidate's quality is its place in the final standing, as the share of the other candidates it
  finished above (a tie with one counts ½): 1 the champion, 0 the last, in [0, 1] like a win rate,
  which it equals for a noise-free judge that ranks every text apart. Only the ends are decided with
  care; the order in the middle is rough.
Safety and factuality are pointwise; the reward is the weighted mean of the objectives. Copies of a
text are judged once and share its scores, and no ordered pair of texts is asked twice in a sample.

A judgment that gives no verdict (the backend's retries included) is never a free win: it scores
the worst value for what it judged (0 for a pointwise verdict, a loss for both sides of a failed
comparison), and the candidates it concerned are marked incomplete, so selection never chooses them.
"""

from __future__ import annotations

import hashlib
import random
from itertools import combinations
from statistics import mean
from typing import NamedTuple

from ray import serve

from sip.config import DataConfig, JudgeConfig
from sip.records import JudgeResult, JudgeTask, Passage, Verdict
from sip.serve.backends import JudgeBackend, make_judge_backend
from sip.serve.replica import TeacherReplica, teacher_app

JUDGE_APP = "sip-judge"
POINTWISE = ("safety", "factuality")


class _Sample:
    """One task's distinct candidate texts and every verdict asked for so far, by ordered pair of
    text indices: copies of a text are judged once and share its score, and no ordered pair is
    asked twice."""

    def __init__(self, task: JudgeTask):
        self.passage = task.passage
        self.texts = list(dict.fromkeys(task.candidates))
        position = {text: u for u, text in enumerate(self.texts)}
        self.of_candidate = [position[text] for text in task.candidates]
        self.pivot = None if task.pivot is None else self.of_candidate[task.pivot]
        self.needs_worst = task.needs_worst
        self.verdicts: dict[tuple[int, int], Verdict] = {}
        self.failed: set[int] = set()
        self.calls = self.failures = 0
        self.rng = random.Random("\x00".join([task.passage.prefix, *self.texts]))


def _round_robin(m: int, both_orders: bool, rng: random.Random, pivot: int | None = None):
    """Every pair, or every text against the pivot, each in a random order; a text's score is its mean
    outcome (win 1, tie ½, loss 0)."""
    pairs = list(combinations(range(m), 2)) if pivot is None else [(pivot, u) for u in range(m) if u != pivot]
    asked = _orders(_random_order(pairs, rng), both_orders)
    verdicts = yield asked
    outcomes: list[list[float]] = [[] for _ in range(m)]
    for (a, b), v in zip(asked, verdicts, strict=True):
        outcomes[a].append(0.0 if v is None else v)
        outcomes[b].append(0.0 if v is None else 1 - v)
    return [mean(o) for o in outcomes]


def _random_order(pairs: list[tuple[int, int]], rng: random.Random) -> list[tuple[int, int]]:
    """Each pair with its two texts in a random order, so position bias is noise, not a side taken."""
    return [(b, a) if rng.random() < 0.5 else (a, b) for a, b in pairs]


def _orders(pairs: list[tuple[int, int]], both_orders: bool) -> list[tuple[int, int]]:
    """The comparisons to ask: each pair, and with `both_orders` also swapped (cancels position bias)."""
    return pairs + ([(b, a) for a, b in pairs] if both_orders else [])


def _tally(points: list[float], asked: list[tuple[int, int]], verdicts: list[Verdict]) -> None:
    for (a, b), v in zip(asked, verdicts, strict=True):
        points[a] += 0.0 if v is None else v  # a failed comparison: no point for either side
        points[b] += 0.0 if v is None else 1 - v


def _record(wins: list[float], losses: list[float], asked: list[tuple[int, int]], verdicts: list[Verdict]) -> None:
    for (a, b), v in zip(asked, verdicts, strict=True):
        if v is None:  # a loss for both sides: dodging a comparison never keeps a text unbeaten (or winless)
            losses[a] += 1
            losses[b] += 1
        else:
            wins[a], losses[a] = wins[a] + v, losses[a] + 1 - v
            wins[b], losses[b] = wins[b] + 1 - v, losses[b] + v


def _swiss_pairs(wins: list[float], losses: list[float], tiebreak: list[float],
                 played: set[frozenset[int]], limit: int | None = None) -> list[tuple[int, int]]:
    """One round's pairs, from both ends of the standing in turn: the texts with the fewest losses meet
    each other, and so do those with the fewest wins, each with the nearest one it has not met where
    one is left. With an odd count the text left over also meets its nearest unmet text, so no text
    sits a round out (one that did could be the best and fall behind the unbeaten). With `limit`, a
    partial round: only the first `limit` pairs, which alternate between the two ends."""
    m = len(wins)
    top = sorted(range(m), key=lambda u: (losses[u], -wins[u], tiebreak[u]))
    bottom = sorted(range(m), key=lambda u: (wins[u], -losses[u], tiebreak[u]))
    free, pairs = set(range(m)), []
    limit = m if limit is None else limit

    def meet(a: int, candidates: list[int]) -> None:
        b = next((u for u in candidates if frozenset((a, u)) not in played), candidates[0])
        played.add(frozenset((a, b)))
        pairs.append((a, b))

    for turn in range(min(m // 2, limit)):
        a, *rest = [u for u in (top if turn % 2 == 0 else bottom) if u in free]
        meet(a, rest)
        free.difference_update(pairs[-1])
    if free and len(pairs) < limit:
        (a,) = free
        meet(a, sorted((u for u in range(m) if u != a), key=lambda u: abs(top.index(u) - top.index(a))))
    return pairs


class TournamentPlan(NamedTuple):
    rounds: int  # full Swiss rounds
    extra_pairs: int  # pairs of one more, partial round, taken from the two ends of the standing
    top: int  # finalists in the top playoff
    bottom: int  # finalists in the bottom playoff
    budget: int  # the most comparisons, Swiss rounds and playoffs together


def _playoff_comparisons(t: int, orders: int) -> int:
    """A playoff of t texts asks each pair once (in both orders with judge.both_orders), then, in one order,
    the two leaders again in the order they have not met in."""
    return orders * t * (t - 1) // 2 + (orders == 1)


def round_robin_comparisons(m: int, cfg: JudgeConfig) -> int:
    """What round robin asks for m distinct texts: every pair, twice with judge.both_orders."""
    return cfg.orders * m * (m - 1) // 2


def tournament_plan(m: int, cfg: JudgeConfig) -> TournamentPlan | None:
    """The plan for m distinct texts: the most top finalists (judge.tournament_finalists down to 2), then the
    most bottom finalists (judge.tournament_bottom_finalists down to 2), whose playoffs leave enough of the
    budget (judge.tournament_budget x round robin's) for Swiss rounds after which no more texts can be
    unbeaten (or winless) than each playoff holds, so a judge without errors always finds the best and the
    worst. The Swiss rounds take the rest of the budget: full rounds (at most judge.tournament_rounds), then
    a partial one. None when nothing fits (few texts: a round robin instead)."""
    orders = cfg.orders
    # a share such as 1/3 is a float a hair under the fraction: a third of 300 pairs must be 100, not 99
    budget = int(cfg.tournament_budget * round_robin_comparisons(m, cfg) + 1e-9)
    per_round = (m + 1) // 2
    cap = min(cfg.tournament_rounds or m - 1, m - 1)
    for top in range(min(cfg.tournament_finalists, m // 2), 1, -1):  # the two playoffs must not overlap
        for bottom in range(min(cfg.tournament_bottom_finalists, m // 2), 1, -1):
            pairs = (budget - _playoff_comparisons(top, orders) - _playoff_comparisons(bottom, orders)) // orders
            rounds, extra = divmod(max(pairs, 0), per_round)
            if rounds >= cap:
                rounds, extra = cap, 0
            unbeaten = winless = m
            for _ in range(rounds):
                unbeaten, winless = -(-unbeaten // 2), -(-winless // 2)
            unbeaten -= min((extra + 1) // 2, unbeaten // 2)  # the partial round's pairs alternate, the top first
            winless -= min(extra // 2, winless // 2)
            if rounds >= 1 and unbeaten <= top and winless <= bottom:
                return TournamentPlan(rounds, extra, top, bottom, budget)
    return None


def _unasked_order(pairs, asked: set[tuple[int, int]], rng: random.Random | None) -> list[tuple[int, int]]:
    """Each pair in the order it has not been asked in (a random one if neither; as listed without `rng`);
    pairs asked in both orders already are left out: asking again would add no verdict."""
    out = []
    for a, b in pairs if rng is None else _random_order(pairs, rng):
        if (a, b) not in asked:
            out.append((a, b))
        elif (b, a) not in asked:
            out.append((b, a))
    return out


def _playoffs(groups: list[list[int]], asked: set[tuple[int, int]], both_orders: bool,
              rng: random.Random | None) -> list[tuple[int, int]]:
    """The comparisons of a playoff in each group: with both_orders every pair in both orders (a verdict
    asked before is reused, not asked again), otherwise each pair in the order it has not been asked in."""
    pairs = [pair for group in groups for pair in combinations(group, 2)]
    if both_orders:
        return [(a, b) for x, y in pairs for a, b in ((x, y), (y, x))]
    return _unasked_order(pairs, asked, rng)


def _playoff_cost(groups: list[list[int]], asked: set[tuple[int, int]], both_orders: bool) -> int:
    """The comparisons these playoffs would still ask, with, in one order, a rematch at each end."""
    new = sum(pair not in asked for pair in _playoffs(groups, asked, both_orders, rng=None))
    return new + (0 if both_orders else sum(len(group) >= 2 for group in groups))


def _grow_playoffs(ends: list[tuple[list[int], list[int]]], room: int, asked: set[tuple[int, int]],
                   both_orders: bool) -> None:
    """Finalists who met in the Swiss rounds leave part of the playoffs' budget unspent (with
    judge.both_orders, about half of it): the next texts by record join them, an end at a time, while the
    playoffs still fit in `room`. Each end is (its finalists, every text in order of its record)."""
    finalists = {u for group, _ in ends for u in group}
    grown = True
    while grown:
        grown = False
        for group, standing in ends:
            nearest = next((u for u in standing if u not in finalists), None)
            if nearest is None:
                continue
            group.append(nearest)
            if _playoff_cost([g for g, _ in ends], asked, both_orders) <= room:
                finalists.add(nearest)
                grown = True
            else:
                group.pop()


def _tournament(m: int, cfg: JudgeConfig, rng: random.Random, worst: bool = True):
    """Best and worst with few comparisons: Swiss rounds, then a playoff at each end.

    Every round pairs texts with equal records (one comparison each, in a random order, so position
    bias is noise rather than a bias for one text), so a single wrong verdict only delays the best
    instead of knocking it out. After the planned rounds the texts with the fewest losses and those
    with the fewest wins each play a round robin, each pair in the order it has not met in (the next texts
    by record join the playoffs while what earlier meetings saved pays for them); then the
    two leaders of the top playoff, and the two last of the bottom one, meet again in their other order
    (with judge.both_orders every playoff pair is asked in both orders and there is no rematch). The
    final standing puts the top playoff above the rest above the bottom playoff, each ranked by its
    playoff points and then its record (wins - losses). Without `worst` (the objective trains on the
    best alone) the bottom playoff is not played. Where no plan fits the budget (few texts), it is a
    round robin in random orders.
    """
    plan = tournament_plan(m, cfg)
    if plan is None:
        return (yield from _round_robin(m, cfg.both_orders, rng))
    wins, losses = [0.0] * m, [0.0] * m
    tiebreak = [rng.random() for _ in range(m)]
    played: set[frozenset[int]] = set()
    asked_before: set[tuple[int, int]] = set()
    for r in range(plan.rounds + (plan.extra_pairs > 0)):
        pairs = _swiss_pairs(wins, losses, tiebreak, played, plan.extra_pairs if r == plan.rounds else None)
        asked = _orders(_random_order(pairs, rng), cfg.both_orders)
        asked_before.update(asked)
        _record(wins, losses, asked, (yield asked))
    fewest_losses = sorted(range(m), key=lambda u: (losses[u], -wins[u], tiebreak[u]))
    fewest_wins = sorted(range(m), key=lambda u: (wins[u], -losses[u], tiebreak[u]))
    top = fewest_losses[: plan.top]
    bottom = [u for u in fewest_wins if u not in top][: plan.bottom] if worst else []
    room = plan.budget - len(asked_before)
    if not worst:  # the bottom playoff's share stays unasked
        room -= _playoff_comparisons(plan.bottom, cfg.orders)
    _grow_playoffs([(top, fewest_losses)] + ([(bottom, fewest_wins)] if worst else []), room, asked_before, cfg.both_orders)
    asked = _playoffs([top, bottom], asked_before, cfg.both_orders, rng)
    asked_before.update(asked)
    points = [0.0] * m
    _tally(points, asked, (yield asked))
    if not cfg.both_orders:
        place = [(points[u], wins[u] - losses[u], tiebreak[u]) for u in range(m)]
        ends = [sorted(top, key=place.__getitem__)[-2:], sorted(bottom, key=place.__getitem__)[:2]]
        rematch = [pair for end in ends if len(end) == 2 for pair in _unasked_order([tuple(end)], asked_before, rng)]
        if rematch:
            _tally(points, rematch, (yield rematch))
    group = [1] * m
    for u in top:
        group[u] = 2
    for u in bottom:
        group[u] = 0
    standing = [(group[u], points[u], wins[u] - losses[u]) for u in range(m)]
    return [
        (sum(s < standing[u] for s in standing) + 0.5 * (sum(s == standing[u] for s in standing) - 1)) / (m - 1)
        for u in range(m)
    ]


def _protocol(sample: _Sample, cfg: JudgeConfig):
    m = len(sample.texts)
    if cfg.pairwise == "tournament":
        return _tournament(m, cfg, sample.rng, sample.needs_worst)
    return _round_robin(m, cfg.both_orders, sample.rng, pivot=sample.pivot if cfg.pairwise == "pivot" else None)


async def _quality(backend: JudgeBackend, samples: list[_Sample], cfg: JudgeConfig) -> list[list[float | None]]:
    """Each sample's quality score per distinct text, its protocol's rounds batched over the samples
    into one backend call per round."""
    results: list[list[float | None] | None] = [None] * len(samples)
    plays, asked = {}, {}
    for s, sample in enumerate(samples):
        if len(sample.texts) == 1:  # copies of one text tie; a lone candidate has nothing to be compared with
            results[s] = [None if len(sample.of_candidate) == 1 else 0.5]
        elif cfg.pairwise == "pivot" and sample.pivot is None:
            results[s] = [None] * len(sample.texts)
        else:
            plays[s] = _protocol(sample, cfg)
            asked[s] = next(plays[s])
    while asked:
        queries, slots = [], []
        for s, pairs in asked.items():
            sample = samples[s]
            for pair in dict.fromkeys(pairs):
                if pair not in sample.verdicts:
                    a, b = pair
                    queries.append((sample.passage, sample.texts[a], sample.texts[b]))
                    slots.append((sample, pair))
        verdicts = await backend.compare(queries) if queries else []
        for (sample, pair), v in zip(slots, verdicts, strict=True):
            sample.verdicts[pair] = v
            sample.calls += 1
            if v is None:  # a loss for both sides: dodging a comparison never pays
                sample.failures += 1
                sample.failed.update(pair)
        for s, pairs in list(asked.items()):
            try:
                asked[s] = plays[s].send([samples[s].verdicts[pair] for pair in pairs])
            except StopIteration as done:
                results[s] = done.value
                del asked[s]
    return results


async def score_tasks(backend: JudgeBackend, tasks: list[JudgeTask], cfg: JudgeConfig) -> list[JudgeResult]:
    weights = {name: w for name, w in cfg.weights.items() if w > 0}
    calls = [0] * len(tasks)
    comparisons = [0] * len(tasks)
    round_robin_sizes = [0] * len(tasks)
    failures = [0] * len(tasks)
    complete = [[True] * len(task.candidates) for task in tasks]
    scores: list[dict[str, list[float | None]]] = [{} for _ in tasks]

    if "quality" in weights:
        samples = [_Sample(task) for task in tasks]
        for t, (sample, quality) in enumerate(zip(samples, await _quality(backend, samples, cfg), strict=True)):
            calls[t] += sample.calls
            comparisons[t] = sample.calls
            round_robin_sizes[t] = round_robin_comparisons(len(sample.texts), cfg)
            failures[t] += sample.failures
            scores[t]["quality"] = [quality[u] for u in sample.of_candidate]
            complete[t] = [u not in sample.failed for u in sample.of_candidate]

    for objective in POINTWISE:
        if objective not in weights:
            continue
        unique: dict[tuple[int, str], int] = {}
        queries = []
        for t, task in enumerate(tasks):
            for text in task.candidates:
                if (t, text) not in unique:
                    unique[(t, text)] = len(queries)
                    queries.append((task.passage, text))
        verdicts: list[Verdict] = await getattr(backend, objective)(queries) if queries else []
        for (t, _), v in zip(unique, verdicts, strict=True):
            calls[t] += 1
            failures[t] += v is None
        for t, task in enumerate(tasks):
            values = [verdicts[unique[(t, text)]] for text in task.candidates]
            for c, v in enumerate(values):
                complete[t][c] = complete[t][c] and v is not None
            scores[t][objective] = [0.0 if v is None else v for v in values]  # no verdict: the worst one

    return [
        JudgeResult(
            reward=[combine({name: s[c] for name, s in scores[t].items()}, weights) for c in range(len(task.candidates))],
            complete=complete[t],
            scores=scores[t],
            calls=calls[t],
            comparisons=comparisons[t],
            round_robin_comparisons=round_robin_sizes[t],
            failures=failures[t],
            failure_example=getattr(backend, "last_unparsed", None) if failures[t] else None,
        )
        for t, task in enumerate(tasks)
    ]


def combine(scores: dict[str, float | None], weights: dict[str, float]) -> float:
    """Weighted mean over the objectives that apply to the candidate (None: nothing to judge, e.g.
    quality for a lone candidate); 0 when none applies. Failed judgments arrive here as 0, not None."""
    judged = {name: s for name, s in scores.items() if s is not None}
    total = sum(weights[name] for name in judged)
    return sum(weights[name] * s for name, s in judged.items()) / total if total else 0.0


class FlippedVerdicts:
    """A backend whose verdicts are flipped (v -> 1 - v) at a rate per kind (judge.flip_rates): a judge
    that errs, simulated on top of an exact one. Whether a verdict flips is decided by a hash of its
    query, so the same query always gets the same verdict (a run and its resume see the same errors)
    and the two orders of a pair err independently. A failed judgment stays failed."""

    def __init__(self, backend: JudgeBackend, rates: dict[str, float]):
        self.backend, self.rates = backend, rates

    @property
    def last_unparsed(self) -> str | None:
        return getattr(self.backend, "last_unparsed", None)

    def _flipped(self, kind: str, queries: list[tuple], verdicts: list[Verdict]) -> list[Verdict]:
        rate = self.rates.get(kind, 0.0)
        out = []
        for (passage, *texts), v in zip(queries, verdicts, strict=True):
            key = "\x00".join([kind, passage.prefix, passage.suffix, *texts]).encode()
            draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
            out.append(1 - v if v is not None and draw < rate else v)
        return out

    async def compare(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        return self._flipped("quality", queries, await self.backend.compare(queries))

    async def safety(self, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        return self._flipped("safety", queries, await self.backend.safety(queries))

    async def factuality(self, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        return self._flipped("factuality", queries, await self.backend.factuality(queries))


@serve.deployment
class Judge(TeacherReplica):
    def __init__(self, cfg: JudgeConfig, data_cfg: DataConfig):
        super().__init__(cfg, data_cfg, make_judge_backend(cfg.backend, data_cfg, cfg.llm), self.score)
        self.training_backend = FlippedVerdicts(self.backend, cfg.flip_rates) if cfg.flip_rates else self.backend

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def score(self, tasks: list[JudgeTask]) -> list[JudgeResult]:
        """Training's rewards (with judge.flip_rates, from a judge that errs); the verdicts of the methods
        below, which evaluation uses, are never flipped."""
        return await score_tasks(self.training_backend, tasks, self.cfg)

    async def pointwise(self, objective: str, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        """One objective's verdicts on given texts: evaluation uses this."""
        if objective not in POINTWISE:
            raise ValueError(f"pointwise objective must be one of {POINTWISE}, not {objective!r}")
        return await getattr(self.backend, objective)(queries)

    async def compare(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        return await self.backend.compare(queries)

    async def coherence(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        return await self.backend.coherence(queries)


def judge_app(cfg: JudgeConfig, data_cfg: DataConfig):
    return teacher_app(Judge, cfg, data_cfg)
