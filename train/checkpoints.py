"""When a run checkpoints, what goes into a checkpoint, and how the run goes back to one.

A checkpoint holds the learner group's state (policy, optimizer, schedule, RNG: sharded over its
ranks, which write it themselves, see sip/checkpoint.py) and the driver's components, each by its
`state_dict` / `load_state_dict`:

- `sampler`: where the stream continues. The sampler reads ahead of the learner (the staleness bound
  lets batches go out before earlier ones are trained), so the position saved is the one right
  after the last *trained* batch, which the ledger keeps (`TrainedStream`).
- `ledger`: the sample counts of the batches trained (train/ledger.py).
- `counters`: judge calls and failures, rewrite failures, retried requests.
- `faults`: learner restarts, rollout batches lost, failed episodes.

`CheckpointManager` owns the cadence (`run.checkpoint_every`, and at the end), writing through the
learner group, pruning to `run.keep_checkpoints`, restoring the components on resume, and rolling
back to the newest checkpoint when a learner rank dies: the learner restarts from it, every batch
after it is fed again, and the counters go back to what they were. Faults are not rolled back:
they happened.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Protocol

from sip.checkpoint import prune, step_dir
from sip.config import SipConfig
from sip.train.data import Sampler
from sip.train.ledger import BatchLedger


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Tally(Counter):
    """Named counts that a checkpoint keeps."""

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        self.update(state)


class TrainedStream:
    """The stream position a checkpoint at the ledger's current step resumes from."""

    def __init__(self, ledger: BatchLedger, sampler: Sampler):
        self.ledger, self.sampler = ledger, sampler

    def state_dict(self) -> dict:
        return self.ledger.cursor()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.ledger.start_cursor = self.sampler.state_dict()


class CheckpointManager:
    def __init__(self, cfg: SipConfig, out: Path, learner, ledger: BatchLedger, sampler: Sampler,
                 counters: Tally, faults: Tally, resumed_from: Path | None):
        self.cfg, self.out, self.learner, self.ledger = cfg, Path(out), learner, ledger
        self.counters = counters
        self.states: dict[str, Stateful] = {"sampler": TrainedStream(ledger, sampler), "ledger": ledger,
                                            "counters": counters, "faults": faults}
        self.last_step, self.last_path = ledger.step, resumed_from
        self.saved: dict[str, dict] = {}

    def load(self, saved: dict) -> None:
        """Restore every component found in a checkpoint's driver state (the learner restored itself)."""
        for name, component in self.states.items():
            if saved.get(name) is not None:
                component.load_state_dict(saved[name])
        self.saved = {name: component.state_dict() for name, component in self.states.items()}

    def due(self) -> bool:
        every, step = self.cfg.run.checkpoint_every, self.ledger.step
        return bool(every) and step % every == 0 and step < self.cfg.train.steps

    def save_if_due(self) -> Path | None:
        return self.save() if self.due() else None

    def save_if_behind(self) -> Path | None:
        """A checkpoint of the current step unless the newest one is of it (a run that must stop)."""
        return self.save() if self.ledger.step > self.last_step else self.last_path

    def save(self) -> Path:
        path = step_dir(self.out, self.ledger.step)
        saved = {name: component.state_dict() for name, component in self.states.items()}
        self.learner.save(path, saved)
        self.ledger.checkpointed()
        self.saved, self.last_step, self.last_path = saved, self.ledger.step, path
        prune(self.out, self.cfg.run.keep_checkpoints)
        return path

    def roll_back(self) -> int:
        """Restart the learner group from the newest checkpoint (the run's start if none) and put the
        driver back there: returns the step it continues from. LearnerDied if a rank dies meanwhile."""
        self.learner.restart(self.last_path)
        self.ledger.rollback(self.last_step)
        self.counters.load_state_dict(self.saved.get("counters", {}))
        return self.last_step
