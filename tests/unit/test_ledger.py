"""The driver's scheduling rules without Ray: the staleness bound, in-order training, re-feeding and accounting."""

from collections import Counter

import pytest

from sip.train.ledger import BatchLedger
from sip.records import JudgedBatch, JudgedSample, Sample

B = 4  # samples per batch


def sample(sample_id: str) -> Sample:
    return Sample(sample_id, [1], [2], "prefix", "suffix")


def take(ledger: BatchLedger) -> None:
    """What the driver does before waiting: take new batches from the stream while the bound allows."""
    while ledger.wants_new_batch():
        i = ledger.next_index
        ledger.add([sample(f"world:0:{i * B + j}") for j in range(B)], {"next_document": (i + 1) * B})


def back(ledger: BatchLedger, index: int, attempt: int, samples: list[Sample] | None = None) -> JudgedBatch:
    """What a worker returns for the batch: its samples judged, or `samples` in their place."""
    samples = ledger.entries[index].samples if samples is None else samples
    return JudgedBatch(index, [JudgedSample(s, [], []) for s in samples], attempt)


def answer(ledger: BatchLedger, index: int, attempt: int) -> bool:
    return ledger.judged(index, attempt, back(ledger, index, attempt))


def feed_all(ledger: BatchLedger) -> dict[int, int]:
    take(ledger)
    return {e.index: ledger.mark_fed(e) for e in ledger.to_feed()}


def train_next(ledger: BatchLedger, skipped=Counter()) -> int:
    entry = ledger.next_to_train()
    assert entry is not None
    ledger.mark_trained(entry, B - sum(skipped.values()), skipped)
    return entry.index


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_a_batch_is_fed_only_within_the_staleness_bound(staleness):
    ledger = BatchLedger(steps=10, max_staleness=staleness, start=0, cursor={})
    fed_at_step = {}
    while ledger.step < 10:
        for index in feed_all(ledger):
            fed_at_step[index] = ledger.step
            answer(ledger, index, 1)
        train_next(ledger)
    assert all(index - step <= staleness for index, step in fed_at_step.items())
    assert any(index - step == staleness for index, step in fed_at_step.items())
    assert sorted(fed_at_step) == list(range(10))


def test_batches_are_trained_in_feeding_order_whatever_order_they_come_back_in():
    ledger = BatchLedger(steps=4, max_staleness=3, start=0, cursor={})
    attempts = feed_all(ledger)
    assert sorted(attempts) == [0, 1, 2, 3]
    for index in (3, 1, 2):
        answer(ledger, index, 1)
    assert ledger.next_to_train() is None  # batch 0 is not back yet
    assert ledger.waiting_batches() == 3
    answer(ledger, 0, 1)
    assert [train_next(ledger) for _ in range(4)] == [0, 1, 2, 3]


def test_a_lost_batch_is_fed_again_and_its_old_attempt_is_ignored():
    ledger = BatchLedger(steps=3, max_staleness=1, start=0, cursor={})
    assert feed_all(ledger) == {0: 1, 1: 1}
    assert ledger.lost(1, 1)  # its worker died
    assert [e.index for e in ledger.to_feed()] == [1]
    assert ledger.mark_fed(ledger.to_feed()[0]) == 2
    assert not answer(ledger, 1, 1), "the late answer of the dead attempt"
    assert answer(ledger, 1, 2) and answer(ledger, 0, 1)
    assert (ledger.next_to_train().result.index, ledger.next_to_train().result.attempt) == (0, 1)
    train_next(ledger)
    assert (ledger.next_to_train().result.index, ledger.next_to_train().result.attempt) == (1, 2)
    train_next(ledger)
    for index, attempt in feed_all(ledger).items():
        answer(ledger, index, attempt)
    train_next(ledger, Counter(tie=1))
    assert ledger.counts() == {"fed": 12, "trained": 11, "skipped": {"tie": 1}, "refed": 4, "in_flight": 0, "lost": 0,
                               "mismatched": 0}


def test_rollback_refeeds_every_batch_after_the_checkpoint():
    ledger = BatchLedger(steps=6, max_staleness=1, start=0, cursor={"next_document": 0})
    for _ in range(2):
        for index, attempt in feed_all(ledger).items():
            answer(ledger, index, attempt)
        train_next(ledger)
    ledger.checkpointed()  # at step 2
    checkpoint_cursor, checkpoint_counts = ledger.cursor(), ledger.state_dict()
    assert checkpoint_cursor == {"next_document": 2 * B}
    for index, attempt in feed_all(ledger).items():
        answer(ledger, index, attempt)
    train_next(ledger)  # step 3 trained, then the learner dies
    in_flight = feed_all(ledger)
    ledger.rollback(2)
    assert ledger.step == 2 and ledger.trained == 2 * B
    assert [e.index for e in ledger.to_feed()] == [2, 3]
    for index, attempt in in_flight.items():
        assert not answer(ledger, index, attempt), "from the policy that was rolled back"
    while ledger.step < 6:
        for index, attempt in feed_all(ledger).items():
            answer(ledger, index, attempt)
        train_next(ledger)
    counts = ledger.counts()
    assert counts["trained"] == 6 * B and counts["lost"] == 0 and counts["in_flight"] == 0
    assert counts["refed"] >= 2 * B
    assert checkpoint_counts == {"fed": 2 * B, "refed": 0, "trained": 2 * B, "skipped": {}, "mismatched": 0}


def test_state_covers_only_the_batches_before_the_step_so_a_resume_counts_right():
    ledger = BatchLedger(steps=4, max_staleness=1, start=0, cursor={})
    for index, attempt in feed_all(ledger).items():
        answer(ledger, index, attempt)
    train_next(ledger)
    feed_all(ledger)  # batch 2 goes out: it is not in a checkpoint taken now
    state = ledger.state_dict()
    assert state == {"fed": B, "refed": 0, "trained": B, "skipped": {}, "mismatched": 0}
    resumed = BatchLedger(steps=4, max_staleness=1, start=1, cursor=ledger.cursor())
    resumed.load_state_dict(state)
    while resumed.step < 4:
        for index, attempt in feed_all(resumed).items():
            answer(resumed, index, attempt)
        train_next(resumed)
    assert resumed.counts() == {"fed": 4 * B, "trained": 4 * B, "skipped": {}, "refed": 0, "in_flight": 0, "lost": 0,
                                "mismatched": 0}


def test_a_dropped_batch_shows_as_lost():
    ledger = BatchLedger(steps=2, max_staleness=0, start=0, cursor={})
    feed_all(ledger)
    del ledger.entries[0]  # what a bug that forgets a batch would do
    assert ledger.counts()["lost"] == B


def other_samples(ledger: BatchLedger, index: int) -> dict[str, list[Sample]]:
    fed = ledger.entries[index].samples
    return {
        "missing": fed[:-1],
        "extra": [*fed, sample("world:0:999")],
        "duplicated": [*fed, fed[0]],
        "reordered": [fed[1], fed[0], *fed[2:]],
        "another batch's": ledger.entries[index + 1].samples,
    }


@pytest.mark.parametrize("case", ["missing", "extra", "duplicated", "reordered", "another batch's"])
def test_a_batch_that_comes_back_with_other_samples_is_counted_and_fed_again(case):
    ledger = BatchLedger(steps=2, max_staleness=1, start=0, cursor={})
    assert feed_all(ledger) == {0: 1, 1: 1}
    assert not ledger.judged(0, 1, back(ledger, 0, 1, other_samples(ledger, 0)[case]))
    assert ledger.next_to_train() is None, "never trained"
    assert ledger.counts()["mismatched"] == B and ledger.counts()["in_flight"] == 2 * B
    assert [e.index for e in ledger.to_feed()] == [0]
    assert ledger.mark_fed(ledger.to_feed()[0]) == 2
    assert answer(ledger, 0, 2) and answer(ledger, 1, 1)
    train_next(ledger)
    train_next(ledger)
    counts = ledger.counts()
    assert counts["trained"] == 2 * B and counts["refed"] == B and counts["mismatched"] == B and counts["lost"] == 0


def test_a_batch_with_its_own_samples_is_trained_and_nothing_is_mismatched():
    ledger = BatchLedger(steps=1, max_staleness=0, start=0, cursor={})
    feed_all(ledger)
    own = [sample(s.id) for s in ledger.entries[0].samples]  # equal ids, other objects: as they come back from Ray
    assert ledger.judged(0, 1, back(ledger, 0, 1, own))
    assert ledger.next_to_train().index == 0
    train_next(ledger)
    assert ledger.counts()["mismatched"] == 0 and ledger.counts()["trained"] == B


def test_mismatches_are_checkpointed_and_older_checkpoints_still_load():
    ledger = BatchLedger(steps=3, max_staleness=1, start=0, cursor={})
    feed_all(ledger)
    ledger.judged(0, 1, back(ledger, 0, 1, []))
    ledger.judged(1, 1, back(ledger, 1, 1, []))  # batch 1 is ahead of the checkpoint below: not in it
    feed_all(ledger)
    answer(ledger, 0, 2)
    train_next(ledger)
    assert ledger.state_dict()["mismatched"] == B and ledger.counts()["mismatched"] == 2 * B
    resumed = BatchLedger(steps=3, max_staleness=1, start=1, cursor={})
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.counts()["mismatched"] == B
    resumed.load_state_dict({"fed": B, "refed": 0, "trained": B, "skipped": {}})  # written before samples were checked
    assert resumed.counts()["mismatched"] == 0
