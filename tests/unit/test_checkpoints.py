"""The checkpoint manager without Ray: cadence, what a checkpoint holds, pruning, resume and roll-back,
with a real one-rank learner writing real checkpoints."""

from collections import Counter
from pathlib import Path

import pytest

from helpers import EXAMPLES, make_cfg, one_rank, step
from sip.checkpoint import complete_checkpoints, partial_dir, read_state
from sip.records import JudgedBatch, JudgedSample
from sip.train.checkpoints import CheckpointManager, Tally
from sip.train.data import Sampler
from sip.train.ledger import BatchLedger
from transformers import AutoTokenizer


class OneRankGroup:
    """The learner group's checkpoint calls, answered by one real rank in this process."""

    def __init__(self, cfg, tokenizer_dir, stack):
        self.cfg, self.tokenizer_dir, self.stack = cfg, tokenizer_dir, stack
        self.rank = stack.enter_context(one_rank(cfg, tokenizer_dir))
        self.restarted_from: list = []

    def save(self, final: Path, extra: dict) -> str:
        return self.rank.save(str(partial_dir(final)), str(final), extra)

    def restart(self, resume_from: Path | None) -> None:
        self.restarted_from.append(resume_from)
        self.rank.close()
        self.rank = self.stack.enter_context(one_rank(self.cfg, self.tokenizer_dir, resume_from))


@pytest.fixture
def run(tmp_path, tokenizer_dir):
    """A driver's components at step 0 with a real learner: (manager, ledger, sampler, counters, faults, learner)."""
    from contextlib import ExitStack

    cfg = make_cfg("dpo", "train.steps=7", "run.checkpoint_every=2", "run.keep_checkpoints=2", "train.batch_size=2")
    with ExitStack() as stack:
        learner = OneRankGroup(cfg, tokenizer_dir, stack)
        sampler = Sampler(cfg.data, AutoTokenizer.from_pretrained(tokenizer_dir))
        ledger = BatchLedger(cfg.train.steps, 2, 0, sampler.state_dict())
        counters, faults = Tally(), Tally()
        manager = CheckpointManager(cfg, tmp_path, learner, ledger, sampler, counters, faults, None)
        manager.load({})
        yield manager, ledger, sampler, counters, faults, learner


def train_one(manager, ledger, sampler, counters) -> Path | None:
    """One driver step: feed what the bound allows (the sampler reads ahead), train the next batch in
    order, count a judge call, and checkpoint if due."""
    while ledger.wants_new_batch():
        ledger.add(sampler.take(2), sampler.state_dict())
    for entry in ledger.to_feed():
        attempt = ledger.mark_fed(entry)
        ledger.judged(entry.index, attempt, JudgedBatch(entry.index, [JudgedSample(s, [], []) for s in entry.samples], attempt))
    entry = ledger.next_to_train()
    step(manager.learner.rank, EXAMPLES)
    ledger.mark_trained(entry, len(entry.samples), Counter())
    counters["judge_calls"] += 3
    return manager.save_if_due()


def test_checkpoints_come_at_the_cadence_and_only_the_newest_are_kept(run, tmp_path):
    manager, ledger, sampler, counters, _, _ = run
    written = [train_one(manager, ledger, sampler, counters) for _ in range(7)]
    assert [p.name if p else None for p in written] == [None, "step_000002", None, "step_000004", None, "step_000006", None]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000004", "step_000006"]
    assert manager.save_if_behind() == manager.save() == tmp_path / "checkpoints" / "step_000007"
    assert manager.save_if_behind() == manager.last_path, "a run that stops right after a checkpoint writes no other"


def test_a_checkpoint_holds_the_stream_after_the_last_trained_batch_not_the_read_ahead(run, tmp_path):
    manager, ledger, sampler, counters, faults, _ = run
    faults["failed_episodes"] += 1
    for _ in range(2):
        train_one(manager, ledger, sampler, counters)
    extra = read_state(manager.last_path)["extra"]
    assert ledger.next_index == 4, "the sampler has read batches 2 and 3 ahead of the learner"
    after_two_batches = Sampler(sampler.cfg, sampler.tokenizer)
    after_two_batches.take(4)
    assert extra["sampler"] == after_two_batches.state_dict() != sampler.state_dict()
    assert extra["ledger"] == {"fed": 4, "refed": 0, "trained": 4, "skipped": {}, "mismatched": 0}
    assert extra["counters"] == {"judge_calls": 6} and extra["faults"] == {"failed_episodes": 1}


def test_a_resume_restores_every_component(run, tmp_path, tokenizer_dir):
    manager, ledger, sampler, counters, faults, learner = run
    faults["learner_restarts"] += 1
    for _ in range(4):
        train_one(manager, ledger, sampler, counters)
    expected_next = Sampler(sampler.cfg, sampler.tokenizer, read_state(manager.last_path)["extra"]["sampler"]).take(2)

    resumed_sampler = Sampler(sampler.cfg, sampler.tokenizer)
    resumed_ledger = BatchLedger(7, 2, 4, resumed_sampler.state_dict())
    resumed = CheckpointManager(manager.cfg, tmp_path, learner, resumed_ledger, resumed_sampler, Tally(), Tally(),
                                manager.last_path)
    resumed.load(read_state(manager.last_path)["extra"])
    assert resumed_sampler.take(2) == expected_next
    assert resumed_ledger.counts()["trained"] == 8 and resumed_ledger.cursor() == ledger.cursor()
    assert resumed.states["counters"] == {"judge_calls": 12} and resumed.states["faults"] == {"learner_restarts": 1}
    assert (resumed.last_step, resumed.last_path) == (4, manager.last_path)


def test_roll_back_restarts_the_learner_from_the_newest_checkpoint_and_rewinds_counts_but_not_faults(run):
    manager, ledger, sampler, counters, faults, learner = run
    for _ in range(3):
        train_one(manager, ledger, sampler, counters)  # a checkpoint at step 2, then step 3 trained
    faults["learner_restarts"] += 1
    assert manager.roll_back() == 2
    assert learner.restarted_from == [manager.last_path] and learner.rank.version == 2
    assert ledger.step == 2 and ledger.counts()["trained"] == 4 and ledger.counts()["lost"] == 0
    assert [e.index for e in ledger.to_feed()] == [2, 3, 4], "every batch after the checkpoint is fed again"
    assert counters == {"judge_calls": 6} and faults == {"learner_restarts": 1}


def test_roll_back_without_a_checkpoint_goes_to_the_start(run):
    manager, ledger, sampler, counters, _, learner = run
    train_one(manager, ledger, sampler, counters)
    assert manager.roll_back() == 0
    assert learner.restarted_from == [None] and learner.rank.version == 0 and counters == {}
