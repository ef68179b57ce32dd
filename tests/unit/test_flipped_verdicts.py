"""judge.flip_rates: a judge that errs, simulated on the world teacher (serve/judge.py, FlippedVerdicts).
The configured share of training verdicts flips, the same query always gets the same verdict, the two
orders of a pair err independently, a failed judgment stays failed, and evaluation's verdicts (the
replica's own compare and pointwise methods) are never flipped."""

import asyncio
from itertools import islice

import pytest

from sip.config import ConfigError, load_config
from sip.records import Passage
from sip.serve.judge import FlippedVerdicts, Judge
from sip.serve.world_teacher import WorldTeacher
from sip.world import World


@pytest.fixture(scope="module")
def world_queries():
    """Pairs of real world texts after real world prefixes: 40 passages x 12 ordered pairs."""
    cfg = load_config(None, [])
    docs = [d.text.split() for d in islice(World.from_config(cfg.data.world).documents(0), 44)]
    queries = []
    for i, words in enumerate(docs[:40]):
        passage = Passage(" ".join(words[:30]), " " + " ".join(words[30:54]))
        texts = [passage.suffix] + [" " + " ".join(docs[40 + k][:24]) for k in range(3)]
        queries += [(passage, a, b) for a in texts for b in texts if a != b]
    return cfg, queries


def test_the_configured_share_of_comparisons_flips_the_same_way_every_time(world_queries):
    cfg, queries = world_queries
    teacher = WorldTeacher.from_config(cfg.data)
    flipped = FlippedVerdicts(teacher, {"quality": 0.2})
    exact = asyncio.run(teacher.compare(queries))
    first, again = asyncio.run(flipped.compare(queries)), asyncio.run(flipped.compare(queries))
    assert first == again
    assert all(f in (e, 1 - e) for e, f in zip(exact, first))
    decided = {(q[0].prefix, q[1], q[2]): e != f for q, e, f in zip(queries, exact, first) if e != 0.5}  # a tie flips to itself
    assert len(decided) > 200
    assert 0.14 <= sum(decided.values()) / len(decided) <= 0.26, sum(decided.values()) / len(decided)
    # each ordered pair draws its own error: where one order of a pair flipped, the other mostly did not
    one_of_two = [decided[(p, a, b)] != decided[(p, b, a)] for p, a, b in decided if a < b]
    assert 0.2 <= sum(one_of_two) / len(one_of_two) <= 0.45  # independent draws: 2 x 0.2 x 0.8 = 0.32


def test_a_kind_without_a_rate_is_untouched_and_a_failed_judgment_stays_failed(world_queries):
    cfg, queries = world_queries
    teacher = WorldTeacher.from_config(cfg.data)
    flipped = FlippedVerdicts(teacher, {"quality": 1.0})
    pointwise = [(p, b) for p, _, b in queries[:60]]
    assert asyncio.run(flipped.safety(pointwise)) == asyncio.run(teacher.safety(pointwise))
    assert asyncio.run(flipped.factuality(pointwise)) == asyncio.run(teacher.factuality(pointwise))

    class Fails:
        async def compare(self, queries):
            return [None] * len(queries)

    assert asyncio.run(FlippedVerdicts(Fails(), {"quality": 1.0}).compare(queries[:10])) == [None] * 10


def test_the_replica_flips_training_verdicts_only(world_queries):
    cfg, queries = world_queries
    run = load_config(None, ["judge.flip_rates={quality: 0.5, safety: 0.5}"])
    replica = Judge.func_or_class(run.judge, run.data)
    teacher = WorldTeacher.from_config(cfg.data)
    pointwise = [(p, b) for p, _, b in queries[:60]]
    assert asyncio.run(replica.compare(queries)) == asyncio.run(teacher.compare(queries))
    assert asyncio.run(replica.pointwise("safety", pointwise)) == asyncio.run(teacher.safety(pointwise))
    assert asyncio.run(replica.training_backend.compare(queries)) != asyncio.run(teacher.compare(queries))
    exact = Judge.func_or_class(cfg.judge, cfg.data)  # no flip rates: training asks the backend itself
    assert exact.training_backend is exact.backend


@pytest.mark.parametrize("rates", ["{quality: 1.5}", "{quality: -0.1}", "{coherence: 0.2}"])
def test_a_flip_rate_outside_0_to_1_or_for_an_unknown_kind_is_refused(rates):
    with pytest.raises(ConfigError, match="flip_rates"):
        load_config(None, [f"judge.flip_rates={rates}"])
