"""The base model: plain next-token pretraining on whole documents of the stream.

SIP then continues from it, as the paper's main experiments continue from a base pretrained on
raw text. The stream is the training stream itself (corruption included): the base consumes its
first `steps x batch_size` documents and the SIP stage starts right after them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from sip.config import BASE_BUILD_SETTINGS, UNKEYED_WORLD_SETTINGS, SipConfig
from sip.records import TrainExample
from sip.resources import ClusterError
from sip.train.data import Sampler, data_fingerprint, load_or_train_tokenizer

INFO_FILE = "base.json"


def base_key(cfg: SipConfig) -> str:
    """Everything that changes the base, and nothing that does not (threads, CPUs, micro-batches, cache
    place, how SIP later cuts samples): the config, and the fingerprint of the data files it reads."""
    parts = {
        "data": cfg.data.model_dump(mode="json", exclude={"cut": True, "max_samples_per_document": True, "suffix_tokens": True,
                                                            "min_prefix_tokens": True, "world": set(UNKEYED_WORLD_SETTINGS)}),
        "policy": cfg.policy.model_dump(mode="json", exclude={"torch_threads"}),
        "base": cfg.base.model_dump(mode="json", exclude=set(BASE_BUILD_SETTINGS)),
    }
    fingerprint = data_fingerprint(cfg.data)
    if fingerprint is not None:
        parts["data_source"] = fingerprint
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def ensure_base(cfg: SipConfig) -> tuple[Path, dict]:
    """The cached base folder for this config, built first if it is not there yet. The run has
    checked the data source before (TrainingRun._check_inputs)."""
    folder = Path(cfg.base.cache_dir).expanduser() / f"base-{base_key(cfg)}"
    if not (folder / INFO_FILE).exists():
        building = folder.with_name(f"{folder.name}.building-{time.time_ns()}")
        try:
            pretrain_base(cfg, building)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        if (folder / INFO_FILE).exists():  # another run built it meanwhile
            shutil.rmtree(building)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            building.rename(folder)
    return folder, json.loads((folder / INFO_FILE).read_text())


def base_stage_config(cfg: SipConfig) -> SipConfig:
    """The learner's settings for the base stage: next-token loss on whole documents, from scratch,
    on one CPU rank (the base of the world's miniature is small), with the base section's schedule."""
    b = cfg.base
    train = cfg.train.model_copy(update={
        "objective": "nll", "candidates": ["suffix"], "steps": b.steps, "batch_size": b.batch_size, "lr": b.lr,
        "warmup_steps": b.warmup_steps, "min_lr_ratio": 0.1, "weight_decay": 0.0, "grad_clip": 1.0, "num_learners": 1,
        "micro_batch_size": b.micro_batch_size, "dtype": "float32", "activation_checkpointing": False, "num_cpus": b.num_cpus,
        "num_gpus": 0.0,
    })
    return cfg.model_copy(update={
        "train": train,
        "policy": cfg.policy.model_copy(update={"init": "scratch", "torch_threads": b.torch_threads}),
        "run": cfg.run.model_copy(update={"seed": b.seed}),
    })


def pretrain_base(cfg: SipConfig, out: Path) -> dict:
    """Train the base through the learner group (the same step as SIP's NLL objective) and write it
    as a Hugging Face folder with its tokenizer and `base.json`."""
    from sip.actors.learner_group import LearnerGroup

    start = time.perf_counter()
    tokenizer = load_or_train_tokenizer(cfg.data, cfg.policy, out)
    sampler = Sampler(cfg.data, tokenizer)  # counts and skips bad documents the same way
    learner = LearnerGroup(base_stage_config(cfg), str(out))
    try:
        losses = []
        for step in range(cfg.base.steps):
            if time.perf_counter() - start > cfg.base.timeout_s:
                raise ClusterError(f"the base model was not built within base.timeout_s={cfg.base.timeout_s:g}s "
                                   f"({step} of {cfg.base.steps} steps); raise it, or give the base more CPUs "
                                   f"(base.num_cpus={cfg.base.num_cpus:g}, base.torch_threads={cfg.base.torch_threads})")
            docs = sampler.documents(cfg.base.batch_size, cfg.data.max_seq_tokens)
            if not docs:
                break
            examples = [TrainExample(f"base:{i}", doc[:1], doc[1:], "suffix") for i, doc in enumerate(docs)]
            losses.append(learner.train_step(examples)["loss"])
        learner.save_pretrained(out)
    finally:
        learner.shutdown()
    info = {
        "steps": len(losses),
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "seconds": round(time.perf_counter() - start, 1),
        "sampler": sampler.state_dict(),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info
