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

from sip.config import SipConfig
from sip.train.data import DataError, Sampler, data_fingerprint, load_or_train_tokenizer

INFO_FILE = "base.json"


def base_key(cfg: SipConfig) -> str:
    """Everything that changes the base, and nothing that does not (threads, CPUs, cache place, how
    SIP later cuts samples): the config, and the fingerprint of the data files it reads."""
    parts = {
        "data": cfg.data.model_dump(mode="json", exclude={"cut", "max_samples_per_document"}),
        "policy": cfg.policy.model_dump(mode="json", exclude={"torch_threads"}),
        "base": cfg.base.model_dump(mode="json", exclude={"cache_dir", "num_cpus", "torch_threads", "timeout_s"}),
    }
    fingerprint = data_fingerprint(cfg.data)
    if fingerprint is not None:
        parts["data_source"] = fingerprint
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def ensure_base(cfg: SipConfig) -> tuple[Path, dict]:
    """The cached base folder for this config, built first (as a Ray task) if it is not there yet.
    The run has checked the data source before (TrainingRun._check_inputs); a reader that fails in
    the task is a DataError here, with its message and without the remote traceback."""
    import ray

    folder = Path(cfg.base.cache_dir).expanduser() / f"base-{base_key(cfg)}"
    if not (folder / INFO_FILE).exists():
        building = folder.with_name(f"{folder.name}.building-{time.time_ns()}")
        task = ray.remote(pretrain_base).options(num_cpus=cfg.base.num_cpus)
        try:
            ray.get(task.remote(cfg, str(building)), timeout=cfg.base.timeout_s)
        except DataError as err:  # raised in the task: its message, without the remote traceback
            shutil.rmtree(building, ignore_errors=True)
            raise DataError(str(getattr(err, "cause", err))) from None
        if (folder / INFO_FILE).exists():  # another run built it meanwhile
            shutil.rmtree(building)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            building.rename(folder)
    return folder, json.loads((folder / INFO_FILE).read_text())


def pretrain_base(cfg: SipConfig, out_dir: str) -> dict:
    import torch

    from sip.actors.learner import warmup_cosine
    from sip.actors.policy import build_policy
    from sip.losses import nll_loss, target_logprobs

    torch.set_num_threads(cfg.base.torch_threads)
    start = time.perf_counter()
    out = Path(out_dir)
    tokenizer = load_or_train_tokenizer(cfg.data, cfg.policy, out)
    model = build_policy(cfg.policy, tokenizer, cfg.base.seed, cfg.data.max_seq_tokens).train()
    b = cfg.base
    optimizer = torch.optim.AdamW(model.parameters(), lr=b.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, b.warmup_steps, b.steps, 0.1))
    sampler = Sampler(cfg.data, tokenizer)  # counts and skips bad documents the same way
    losses = []
    for _ in range(b.steps):
        docs = sampler.documents(b.batch_size, cfg.data.max_seq_tokens)
        if not docs:
            break
        logp, n_tokens = target_logprobs(model, [d[:1] for d in docs], [d[1:] for d in docs], tokenizer.pad_token_id)
        loss = nll_loss(logp, n_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.save_pretrained(out)
    info = {
        "steps": len(losses),
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "seconds": round(time.perf_counter() - start, 1),
        "sampler": sampler.state(),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info
