"""TensorBoard and W&B logging of the per-step records (the Ray metrics are checked on a real
cluster in test_cluster.py)."""

import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sip.config import load_config
from sip.metrics import RunLog, flatten

RECORDS = [
    {"step": s, "loss": 2.0 / s, "chosen_rate": {"suffix": 0.5, "rollout": 0.25 * s}, "judge_score": {},
     "staleness_max": 1, "queue_depth": {"samples": s}, "note": "text is skipped", "ok": True}
    for s in (1, 2, 3)
]


def test_flatten_keeps_numeric_leaves_as_paths():
    assert flatten(RECORDS[1]) == {"step": 2.0, "loss": 1.0, "chosen_rate/suffix": 0.5, "chosen_rate/rollout": 0.5,
                                   "staleness_max": 1.0, "queue_depth/samples": 2.0}


def test_tensorboard_gets_every_step(tmp_path):
    log = RunLog(load_config(None, [f"run.output_dir={tmp_path}"]), tmp_path)
    for record in RECORDS:
        log.log(record["step"], record)
    log.log(3, {"factuality": 0.75}, prefix="eval/")
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("chosen_rate/rollout")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert events.Scalars("eval/factuality")[0].value == 0.75


def test_wandb_logs_offline_when_enabled(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="W&B is the optional extra sip[wandb]")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.wandb=true", "run.tensorboard=false", "run.name=unit"])
    log = RunLog(cfg, tmp_path)
    for record in RECORDS:
        log.log(record["step"], record)
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    deadline = time.monotonic() + 20  # W&B's service process finishes writing the file after finish() returns
    while not all(key in (data := runs[0].read_bytes()) for key in (b"chosen_rate/rollout", b"queue_depth/samples")):
        assert time.monotonic() < deadline, f"logged keys missing from the offline run: {data[:200]!r}"
        time.sleep(0.2)
    assert b"unit" in data
