"""The driver's book of batches: what may be fed next, what may be trained next, and where every sample went.

Ray-free, so the scheduling rules are unit-tested on their own (tests/unit/test_ledger.py):

- **Staleness bound.** Batch i (the samples of optimizer step i) is fed only once the learner has
  reached step i − max_staleness, and it carries the newest weights, so every rollout trained at
  step i comes from a policy at most max_staleness versions old. Sync mode is max_staleness = 0.
- **In order.** Batches are trained strictly by index, whichever worker finishes first.
- **Re-feeding.** A batch whose worker died goes back to be fed again (to any worker, at the
  newest weights, still within the bound). A rollback to a checkpoint (the learner died) sends
  every batch after the checkpoint back too. Each feed is an attempt; a result from an earlier
  attempt is ignored.
- **Same samples back.** A judged batch must hold the samples fed, by id and in order; one that
  does not is never trained: it is fed again like a lost batch, and its samples counted `mismatched`.
- **Accounting.** Every sample fed ends `trained` or `skipped` (by reason). `refed` counts extra
  feeds, `in_flight` samples without a fate yet, and `lost` whatever is none of these: it must be 0.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from sip.records import JudgedBatch, Sample

log = logging.getLogger("sip.train")


@dataclass
class Entry:
    index: int
    samples: list[Sample]
    cursor: dict  # the stream position right after this batch: where a checkpoint at step index + 1 resumes
    attempt: int = 0  # feeds so far
    mismatches: int = 0  # attempts that came back holding other samples
    status: str = "queued"  # queued | in_flight | judged | trained
    result: JudgedBatch | None = None
    trained: int = 0
    skipped: Counter = field(default_factory=Counter)


class BatchLedger:
    def __init__(self, steps: int, max_staleness: int, start: int, cursor: dict):
        self.steps, self.max_staleness = steps, max_staleness
        self.step = start  # batches trained = the learner's version
        self.next_index = start  # the first batch never taken from the stream
        self.start_cursor = cursor
        self.entries: dict[int, Entry] = {}
        self.load_state_dict({})

    # ---- feeding --------------------------------------------------------------------------------

    def wants_new_batch(self) -> bool:
        """Is there room, under the staleness bound, for a batch not yet taken from the stream?"""
        return self.next_index < self.steps and self.next_index <= self.step + self.max_staleness

    def add(self, samples: list, cursor: dict) -> Entry:
        entry = Entry(self.next_index, samples, cursor)
        self.entries[entry.index] = entry
        self.next_index += 1
        return entry

    def to_feed(self) -> list[Entry]:
        """Batches waiting to go out (new or to be fed again) that the staleness bound allows now, lowest first."""
        limit = self.step + self.max_staleness
        return sorted((e for e in self.entries.values() if e.status == "queued" and e.index <= limit), key=lambda e: e.index)

    def mark_fed(self, entry: Entry) -> int:
        """Record one feed of `entry`; returns its attempt number (which its result must carry back)."""
        entry.attempt += 1
        entry.status = "in_flight"
        if entry.attempt == 1:
            self.fed += len(entry.samples)
        else:
            self.refed += len(entry.samples)
        return entry.attempt

    # ---- results --------------------------------------------------------------------------------

    def _current(self, index: int, attempt: int) -> Entry | None:
        entry = self.entries.get(index)
        if entry is None or entry.attempt != attempt or entry.status != "in_flight":
            return None  # an earlier attempt's answer, or one for a batch rolled back meanwhile
        return entry

    def judged(self, index: int, attempt: int, result: JudgedBatch) -> bool:
        """Hold the attempt's result until its turn; one that holds other samples than fed is fed again."""
        entry = self._current(index, attempt)
        if entry is None:
            return False
        fed, back = [s.id for s in entry.samples], [j.sample.id for j in result.judged]
        if back != fed:
            entry.status = "queued"
            entry.mismatches += 1
            self.mismatched += len(fed)
            missing, extra = Counter(fed) - Counter(back), Counter(back) - Counter(fed)
            log.warning("batch %d came back holding other samples than it was fed (not back: %s, not fed: %s, "
                        "or another order): feeding it again", index, sorted(missing)[:3], sorted(extra)[:3])
            return False
        entry.result, entry.status = result, "judged"
        return True

    def mismatches(self, index: int) -> int:
        """How often batch `index` came back holding other samples than it was fed."""
        entry = self.entries.get(index)
        return entry.mismatches if entry is not None else 0

    def lost(self, index: int, attempt: int) -> bool:
        """The attempt will never answer (its worker died): feed the batch again."""
        entry = self._current(index, attempt)
        if entry is None:
            return False
        entry.status = "queued"
        return True

    def next_to_train(self) -> Entry | None:
        entry = self.entries.get(self.step)
        return entry if entry is not None and entry.status == "judged" else None

    def mark_trained(self, entry: Entry, trained: int, skipped: Counter) -> None:
        assert entry.index == self.step and entry.status == "judged", "batches are trained in order, once"
        entry.status, entry.trained, entry.skipped = "trained", trained, Counter(skipped)
        self.trained += trained
        self.skipped.update(skipped)
        self.step += 1

    # ---- checkpoints ----------------------------------------------------------------------------

    def cursor(self) -> dict:
        """Where a resume from the current step continues the stream."""
        previous = self.entries.get(self.step - 1)
        return previous.cursor if previous is not None else self.start_cursor

    def state_dict(self) -> dict:
        """The counts of the batches before the current step: what a checkpoint taken now covers.
        Batches beyond it are not in the checkpoint; a resume takes them from the stream again."""
        ahead = [e for e in self.entries.values() if e.index >= self.step and e.attempt]
        return {
            "fed": self.fed - sum(len(e.samples) for e in ahead),
            "refed": self.refed - sum(len(e.samples) * (e.attempt - 1) for e in ahead),
            "trained": self.trained,
            "skipped": dict(self.skipped),
            "mismatched": self.mismatched - sum(len(e.samples) * e.mismatches for e in ahead),
        }

    def load_state_dict(self, counts: dict) -> None:
        self.fed = counts.get("fed", 0)
        self.refed = counts.get("refed", 0)
        self.trained = counts.get("trained", 0)
        self.skipped = Counter(counts.get("skipped", {}))
        self.mismatched = counts.get("mismatched", 0)  # absent from checkpoints written before it was counted

    def checkpointed(self) -> None:
        """A checkpoint at the current step exists: earlier batches will never be rolled back to."""
        self.start_cursor = self.cursor()
        for index in [i for i in self.entries if i < self.step]:
            del self.entries[index]

    def rollback(self, step: int) -> None:
        """The learner restarts from a checkpoint at `step`: every later batch goes back to be fed again."""
        assert step <= self.step
        for entry in self.entries.values():
            if entry.index < step:
                continue
            if entry.status == "trained":
                self.trained -= entry.trained
                self.skipped.subtract(entry.skipped)
                entry.trained, entry.skipped = 0, Counter()
            if entry.attempt:
                entry.status, entry.result = "queued", None
        self.skipped = +self.skipped
        self.step = step

    # ---- accounting -----------------------------------------------------------------------------

    def counts(self) -> dict:
        in_flight = sum(len(e.samples) for e in self.entries.values() if e.attempt and e.status != "trained")
        skipped = sum(self.skipped.values())
        return {
            "fed": self.fed,
            "trained": self.trained,
            "skipped": dict(self.skipped),
            "refed": self.refed,
            "in_flight": in_flight,
            "lost": self.fed - self.trained - skipped - in_flight,
            "mismatched": self.mismatched,
        }

    def in_flight_batches(self) -> int:
        return sum(e.status == "in_flight" for e in self.entries.values())

    def waiting_batches(self) -> int:
        """Judged batches held until the batches before them are trained."""
        return sum(e.status == "judged" for e in self.entries.values())
