"""The tournament protocol (judge.pairwise=tournament) beside round robin: it finds the best and the
worst with at most a third of round robin's comparisons, judges copies of a text once, batches each
round over the tasks, and never lets a failed comparison win (serve/judge.py)."""

import asyncio
import itertools
import random
from itertools import islice

import pytest

from sip.records import Passage
from sip.records import JudgeTask
from sip.serve.judge import _playoff_comparisons, score_tasks, tournament_plan
from sip.serve.world_teacher import WorldTeacher
from sip.config import DataConfig, WorldConfig, load_config
from sip.records import Candidate, JudgedSample, Sample
from sip.objectives import OBJECTIVES
from sip.world import World

PASSAGE = Passage("prefix", "suffix")


class Ranked:
    """Compares texts by known scores, noise-free: the higher score wins. Records every request;
    texts in `fails` get no verdict in any comparison."""

    def __init__(self, score, fails=()):
        self.score, self.fails = score, set(fails)
        self.requests: list[list[tuple[str, str]]] = []

    async def compare(self, queries):
        self.requests.append([(a, b) for _, a, b in queries])
        return [None if {a, b} & self.fails else float(self.score[a] > self.score[b]) for _, a, b in queries]

    @property
    def asked(self):
        return [pair for request in self.requests for pair in request]


def judge(*overrides):
    return load_config(None, ["judge.weights={quality: 1}", *overrides]).judge


def distinct_texts(n, seed):
    rng = random.Random(seed)
    texts = [f"text {i}" for i in range(n)]
    rng.shuffle(texts)
    return texts, {t: rng.random() for t in texts}


def test_a_noise_free_tournament_finds_the_best_and_the_worst_with_a_third_of_the_calls():
    for seed in range(20):
        texts, score = distinct_texts(18, seed)
        backend = Ranked(score)
        [r] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, texts)], judge("judge.pairwise=tournament")))
        best, worst = max(texts, key=score.get), min(texts, key=score.get)
        assert texts[r.reward.index(max(r.reward))] == best and r.reward.count(max(r.reward)) == 1
        assert texts[r.reward.index(min(r.reward))] == worst and r.reward.count(min(r.reward)) == 1
        assert max(r.reward) == 1.0 and min(r.reward) == 0.0 and all(0 <= q <= 1 for q in r.scores["quality"])
        assert r.calls == len(backend.asked) == len(set(backend.asked)) <= 153 // 3
        assert r.round_robin_comparisons == 153  # the yardstick: what round robin asks for the same texts
        assert r.failures == 0 and all(r.complete)
    [rr] = asyncio.run(score_tasks(Ranked(score), [JudgeTask(PASSAGE, texts)], judge()))
    assert rr.calls == rr.round_robin_comparisons == 153 and sorted(rr.reward) == [i / 17 for i in range(18)]


@pytest.mark.parametrize("budget,both_orders", [(1 / 3, False), (0.5, False), (1 / 3, True), (0.5, True)])
def test_the_tournament_never_asks_more_than_its_budget_and_falls_back_to_round_robin_only_for_few_texts(budget, both_orders):
    """...and an error-free judge always finds the best and the worst, whatever the count of texts."""
    cfg = judge("judge.pairwise=tournament", f"judge.tournament_budget={budget}", f"judge.both_orders={both_orders}")
    orders = 2 if both_orders else 1
    for n, seed in itertools.product(range(2, 41), range(4)):
        texts, score = distinct_texts(n, 100 * n + seed)
        for worst in (True, False):
            backend = Ranked(score)
            [r] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, texts, needs_worst=worst)], cfg))
            assert len(backend.asked) == len(set(backend.asked)) == r.calls
            if r.calls < orders * n * (n - 1) // 2:
                assert r.calls <= budget * orders * n * (n - 1) / 2 + 1e-9, (n, worst)  # 1/3 of 300 is 100
            else:
                assert n <= 10, "a round robin only where no tournament fits the budget"
            assert texts[r.reward.index(1.0)] == max(texts, key=score.get), (n, seed, worst)
            if worst:
                assert texts[r.reward.index(0.0)] == min(texts, key=score.get), (n, seed)


def test_with_both_orders_the_playoffs_spend_what_finalists_who_already_met_leave():
    """Finalists who met in the Swiss rounds in both orders need not be asked again; the next texts by
    record take their place in the playoffs, so the tournament asks nearly its whole budget (102 of 306)
    instead of 86-92, and still finds the best and the worst."""
    cfg = judge("judge.pairwise=tournament", "judge.both_orders=true")
    for seed in range(20):
        texts, score = distinct_texts(18, seed)
        backend = Ranked(score)
        [r] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, texts)], cfg))
        assert 94 <= r.calls == len(set(backend.asked)) <= 102, seed
        assert texts[r.reward.index(1.0)] == max(texts, key=score.get)
        assert texts[r.reward.index(0.0)] == min(texts, key=score.get)


def test_a_third_of_round_robin_is_a_third_even_where_the_float_lands_below_it():
    plan = tournament_plan(25, judge("judge.pairwise=tournament"))  # 300 pairs; 1/3 * 300 is 99.99999999999999
    per_round = 13  # 25 texts: 12 pairs and the odd one out against its nearest unmet text
    spent = plan.rounds * per_round + plan.extra_pairs + _playoff_comparisons(plan.top, 1) + _playoff_comparisons(plan.bottom, 1)
    assert spent == 100


def test_when_only_the_best_is_needed_the_bottom_playoff_is_not_played():
    for seed in range(10):
        texts, score = distinct_texts(18, seed)
        both, best_only = Ranked(score), Ranked(score)
        [r] = asyncio.run(score_tasks(both, [JudgeTask(PASSAGE, texts)], judge("judge.pairwise=tournament")))
        [b] = asyncio.run(score_tasks(best_only, [JudgeTask(PASSAGE, texts, needs_worst=False)],
                                      judge("judge.pairwise=tournament")))
        assert b.reward.index(1.0) == r.reward.index(1.0) == texts.index(max(texts, key=score.get))
        assert b.calls == b.comparisons == len(best_only.asked) < r.calls
        # the same Swiss rounds, top playoff and top rematch: each request is the start of the one that wants both ends
        assert len(best_only.requests) <= len(both.requests)  # no top rematch where the leaders met in both orders
        assert all(one == two[: len(one)] for one, two in zip(best_only.requests, both.requests))


def test_comparisons_count_the_pairwise_calls_apart_from_the_pointwise_ones():
    texts, score = distinct_texts(6, 0)

    class WithSafety(Ranked):
        async def safety(self, queries):
            return [1.0] * len(queries)

    cfg = load_config(None, ["judge.weights={quality: 1, safety: 1}"]).judge
    [r] = asyncio.run(score_tasks(WithSafety(score), [JudgeTask(PASSAGE, texts)], cfg))
    assert r.comparisons == 15 and r.calls == 15 + 6


def test_few_texts_cost_no_more_than_round_robin_and_get_the_exact_ranking():
    for n in (2, 3, 6, 9, 10):
        texts, score = distinct_texts(n, n)
        [t] = asyncio.run(score_tasks(Ranked(score), [JudgeTask(PASSAGE, texts)], judge("judge.pairwise=tournament")))
        [rr] = asyncio.run(score_tasks(Ranked(score), [JudgeTask(PASSAGE, texts)], judge()))
        assert t.calls <= rr.calls == n * (n - 1) // 2
        assert texts[t.reward.index(1.0)] == max(texts, key=score.get)
        assert texts[t.reward.index(0.0)] == min(texts, key=score.get)


def test_each_round_is_one_batched_request_over_all_tasks():
    tasks, scores = [], {}
    for seed in range(5):
        texts, score = distinct_texts(18, seed)
        tasks.append(JudgeTask(Passage(f"prefix {seed}", "suffix"), texts))
        scores.update(score)
    backend = Ranked(scores)
    results = asyncio.run(score_tasks(backend, tasks, judge("judge.pairwise=tournament", "judge.tournament_rounds=3")))
    assert len(backend.requests) == 3 + 2  # three Swiss rounds, the playoffs, the rematches: each one request
    assert len(backend.requests[0]) == 5 * 9  # every task's first round in the first request
    assert sum(r.calls for r in results) == len(backend.asked)


@pytest.mark.parametrize("protocol", ["round_robin", "pivot", "tournament"])
def test_copies_of_a_text_are_judged_once_and_share_its_score(protocol):
    texts, score = distinct_texts(12, 1)
    candidates = texts + texts[:4] + [texts[0]]  # the pivot's text is copied too
    backend = Ranked(score)
    [r] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, candidates, pivot=0)], judge(f"judge.pairwise={protocol}")))
    assert len(backend.asked) == len(set(backend.asked)) == r.calls and all(a != b for a, b in backend.asked)
    for i, text in enumerate(candidates):
        assert r.reward[i] == r.reward[candidates.index(text)]
    assert r.round_robin_comparisons == 12 * 11 // 2  # copies do not count: round robin asks distinct texts
    if protocol == "round_robin":
        assert r.calls == 12 * 11 // 2
    [copies] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, ["same", "same"])], judge(f"judge.pairwise={protocol}")))
    assert copies.calls == 0 and copies.scores["quality"] == [0.5, 0.5] and copies.complete == [True, True]


def test_a_text_whose_comparisons_fail_never_wins_and_takes_its_opponents_out_of_the_choice():
    texts, score = distinct_texts(18, 3)
    best = max(texts, key=score.get)
    backend = Ranked(score, fails={best})
    [r] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, texts)], judge("judge.pairwise=tournament")))
    met = {b if a == best else a for a, b in backend.asked if best in (a, b)}
    assert r.failures == sum(best in pair for pair in backend.asked) > 0
    assert [not ok for ok in r.complete] == [t == best or t in met for t in texts]
    assert r.reward[texts.index(best)] < 0.5  # every comparison it was in counted as its loss
    sample = Sample("s", [0], [0], PASSAGE.prefix, PASSAGE.suffix)
    cands = [Candidate("rollout", [i], t) for i, t in enumerate(texts)]
    example = OBJECTIVES["dpo"].select(JudgedSample(sample, cands, r.reward, r.scores, r.complete), seed=0)
    chosen = texts[example.chosen_ids[0]]
    assert chosen != best and chosen not in met and all(0 <= x <= 1 for x in r.reward)


def test_on_world_text_the_tournament_chooses_what_the_world_teacher_scores_highest():
    teacher = WorldTeacher.from_config(DataConfig())
    world = World.from_config(WorldConfig())
    docs = list(islice((d for d in world.documents(0) if d.corruption is None and len(d.text.split()) > 80), 6))
    rng = random.Random(0)
    for doc, other in zip(docs, docs[1:]):
        words = doc.text.split()
        passage = Passage(" ".join(words[:30]), " " + " ".join(words[30:50]), {"subject": doc.subject})
        own = passage.suffix.split()
        salads = [rng.sample(own, len(own)) for _ in range(5)]
        loops = [(own[:k] * 20)[: len(own)] for k in (2, 3, 4, 5)]
        elsewhere = [other.text.split()[k : k + len(own)] for k in (0, 7, 15, 30, 45)]
        candidates = [passage.suffix] + [" " + " ".join(w) for w in salads + loops + elsewhere]
        assert len(set(candidates)) == 15
        truth = [teacher.quality_score(passage.prefix, c, doc.subject) for c in candidates]
        [r] = asyncio.run(score_tasks(teacher, [JudgeTask(passage, candidates)], judge("judge.pairwise=tournament")))
        chosen, rejected = r.reward.index(max(r.reward)), r.reward.index(min(r.reward))
        assert truth[chosen] >= max(truth) - 0.05 and truth[rejected] <= min(truth) + 0.05  # the teacher ties closer texts
        assert r.calls <= 15 * 14 // 2 / 3


def test_the_protocols_bench_prints_the_tournament_at_each_budget():
    """bench/judge_protocols.py --budgets: one tournament row per budget, each within its share of round
    robin's calls, a larger budget asking more."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[2] / "bench" / "judge_protocols.py"
    done = subprocess.run([sys.executable, str(bench), "--prefixes", "20", "--repeats", "1", "--ks", "16", "--noise", "0.2",
                           "--distinct", "--budgets", "1/3,0.5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in done.stdout.splitlines() if line.startswith("| 16 |")]
    calls = {cells[2]: float(cells[4]) for cells in rows}
    assert set(calls) == {"round_robin", "pivot", "tournament, budget 1/3", "tournament, budget 0.5"}, done.stdout
    assert calls["tournament, budget 1/3"] <= calls["round_robin"] / 3 < calls["tournament, budget 0.5"] <= calls["round_robin"] / 2
