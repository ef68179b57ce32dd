"""The judging protocol (serve/judge.py::score_tasks): round robin, pivot, both orders, failed
judgments and weights, checked with small rule-based backends whose answers are known."""

import asyncio

import pytest

from sip.records import Passage
from sip.records import JudgeTask
from sip.serve.judge import combine, score_tasks
from sip.config import load_config

PASSAGE = Passage("prefix", "suffix")


class FirstWins:
    """A judge with pure position bias: option 1 always wins. Pointwise: a verdict from a lookup."""

    def __init__(self, pointwise=None):
        self.pointwise = pointwise or {}
        self.compared = []

    async def compare(self, queries):
        self.compared += [(a, b) for _, a, b in queries]
        return [1.0 for _ in queries]

    async def safety(self, queries):
        return [self.pointwise.get(text) for _, text in queries]

    async def factuality(self, queries):
        return [self.pointwise.get(text) for _, text in queries]


class Prefers(FirstWins):
    """FirstWins's pointwise lookup; pairwise, the text earlier in `order` wins in either position."""

    def __init__(self, order, pointwise):
        super().__init__(pointwise)
        self.order = order

    async def compare(self, queries):
        self.compared += [(a, b) for _, a, b in queries]
        return [float(self.order.index(a) < self.order.index(b)) for _, a, b in queries]


class Longer:
    """Prefers the longer text whatever its position; None (unparseable) when both have equal length."""

    async def compare(self, queries):
        return [None if len(a) == len(b) else float(len(a) > len(b)) for _, a, b in queries]


def judge(*overrides):
    return load_config(None, ["judge.weights={quality: 1}", *overrides]).judge


def test_position_bias_decides_one_order_and_cancels_in_both():
    backend = FirstWins()
    [one] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, ["a", "b", "c"])], judge()))
    firsts = [sum(a == text for a, _ in backend.compared) for text in "abc"]
    assert one.scores["quality"] == [f / 2 for f in firsts] and one.calls == 3
    backend = FirstWins()
    [both] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, ["a", "b", "c"])], judge("judge.both_orders=true")))
    assert both.scores["quality"] == [0.5, 0.5, 0.5] and both.calls == 6
    assert sorted(backend.compared) == sorted([("a", "b"), ("b", "a"), ("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")])


@pytest.mark.parametrize("protocol", ["round_robin", "pivot", "tournament"])
def test_a_judge_that_always_picks_the_first_option_favours_no_candidate_for_its_place_in_the_list(protocol):
    tasks = [JudgeTask(Passage(f"prefix {n}", "suffix"), [f"text {n}.{i}" for i in range(18)], pivot=0) for n in range(200)]
    results = asyncio.run(score_tasks(FirstWins(), tasks, judge(f"judge.pairwise={protocol}")))
    for place in (0, 1, 17):  # the suffix (and pivot), the rewrite, the last rollout
        assert abs(sum(r.scores["quality"][place] for r in results) / len(results) - 0.5) < 0.15


def test_both_orders_agree_for_an_unbiased_judge_and_pivot_mode_counts_pairs():
    cands = ["xx", "x", "xxx"]
    [r] = asyncio.run(score_tasks(Longer(), [JudgeTask(PASSAGE, cands)], judge("judge.both_orders=true")))
    assert r.scores["quality"] == [0.5, 0.0, 1.0] and r.calls == 6 and r.failures == 0
    [p] = asyncio.run(score_tasks(Longer(), [JudgeTask(PASSAGE, cands, pivot=0)], judge("judge.pairwise=pivot")))
    assert p.calls == 2 and p.scores["quality"] == [0.5, 0.0, 1.0]


def test_a_sample_without_its_pivot_gets_no_quality_score_in_pivot_mode():
    """Its rewrite came back empty: no comparison is asked, and nothing falls back to round robin."""
    backend = Longer()
    cfg = judge("judge.pairwise=pivot", "judge.pivot=rewrite")
    [r] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, ["xx", "x", "xxx"], pivot=None)], cfg))
    assert r.calls == 0 and r.scores["quality"] == [None, None, None] and r.reward == [0.0, 0.0, 0.0]


def test_a_failed_comparison_is_a_loss_for_both_sides_and_marks_them_incomplete():
    cands = ["aa", "bb", "ccc"]  # aa vs bb: equal length, the judge gives no verdict
    [r] = asyncio.run(score_tasks(Longer(), [JudgeTask(PASSAGE, cands)], judge("judge.both_orders=true")))
    assert r.calls == 6 and r.failures == 2
    assert r.scores["quality"] == [0.0, 0.0, 1.0] and r.complete == [False, False, True]
    [alone] = asyncio.run(score_tasks(Longer(), [JudgeTask(PASSAGE, ["aa", "bb"])], judge()))
    assert alone.scores["quality"] == [0.0, 0.0] and alone.reward == [0.0, 0.0] and alone.complete == [False, False]
    # the failed comparison enters both win rates as a loss
    [mixed] = asyncio.run(score_tasks(Longer(), [JudgeTask(PASSAGE, ["aa", "b", "bb"])], judge()))
    assert mixed.scores["quality"] == [0.5, 0.0, 0.5] and mixed.complete == [False, True, False]


def test_a_lone_candidate_has_no_quality_score_and_is_fully_judged():
    backend = FirstWins(pointwise={"a": 1.0})
    cfg = load_config(None, ["judge.weights={quality: 1, safety: 1}"]).judge
    [r] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, ["a"])], cfg))
    assert r.scores == {"quality": [None], "safety": [1.0]} and r.reward == [1.0] and r.complete == [True] and r.calls == 1


def test_a_missing_pointwise_verdict_scores_zero_and_no_partial_average_wins():
    backend = Prefers("cab", pointwise={"a": 1.0, "b": 0.0, "c": None})
    cfg = load_config(None, ["judge.weights={quality: 1, safety: 2, factuality: 1}"]).judge
    [r] = asyncio.run(score_tasks(backend, [JudgeTask(PASSAGE, ["c", "a", "b"])], cfg))
    assert r.calls == 3 + 3 + 3 and r.failures == 2
    assert r.scores["safety"] == [0.0, 1.0, 0.0] and r.complete == [False, True, True]
    # c wins every comparison: averaged over its verdicts alone it would score 1.0
    assert r.reward[0] == (1.0 + 0 + 0) / 4 == combine({"quality": 1.0, "safety": 0.0, "factuality": 0.0}, cfg.weights)
    assert r.reward[1] == (0.5 + 2 + 1) / 4
    assert r.reward[2] == 0.0
    assert combine({"quality": None, "safety": 1.0}, {"quality": 1, "safety": 1}) == 1.0  # quality did not apply
