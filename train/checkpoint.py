"""Checkpoints on disk: their layout, how one is made complete, and what a resume checks first.

A checkpoint is written into a hidden `.step_N.partial` folder and renamed to `step_N` only after
its `COMPLETE` marker is written, so a crash mid-write never leaves a folder that looks whole.
Each holds a Hugging Face folder (`from_pretrained` loads it), the sharded training state
(torch.distributed.checkpoint: model and optimizer, loadable by any number of learner ranks), the
DPO reference, and `trainer_state.json` (version, RNG, data cursor, ledger). Nothing in it is
unpickled with arbitrary classes: the JSON is plain data, the sharded state is read with an
allowlist (`load_sharded`).

The module imports neither torch nor ray at the top: the driver checks a resume before it starts anything.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

from sip.train.config import SipConfig

STATE_FILE = "trainer_state.json"
MARKER = "COMPLETE"
REFERENCE_DIR = "reference"
SHARDED_DIR = "sharded"
PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"{PREFIX}{step:06d}"


def partial_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).exists()


def complete(partial: Path, final: Path) -> None:
    """Mark a fully written checkpoint and move it into place (replacing an older one of that step)."""
    (partial / MARKER).write_text("")
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def complete_checkpoints(out: Path) -> list[Path]:
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def prune(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any partial one left by a crash."""
    for old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def fingerprint(cfg: SipConfig) -> dict:
    """What a checkpoint's training state depends on: a resume with other values would be a different run."""
    return {
        "policy": cfg.policy.model_dump(mode="json", exclude={"torch_threads"}),
        "data": cfg.data.model_dump(mode="json"),
        "base": cfg.base.model_dump(mode="json", exclude={"cache_dir", "num_cpus", "torch_threads", "timeout_s"}),
        "objective": cfg.train.objective,
        "candidates": list(cfg.train.candidates),
    }


def resolve_resume(cfg: SipConfig) -> Path | None:
    """The checkpoint folder `run.resume_from` names ('latest': the newest complete one in output_dir)."""
    ref = cfg.run.resume_from
    if ref is None:
        return None
    if str(ref) == "latest":
        found = complete_checkpoints(cfg.run.output_dir)
        if not found:
            raise CheckpointError(f"run.resume_from=latest: no complete checkpoint in {Path(cfg.run.output_dir) / 'checkpoints'}")
        return found[-1]
    return Path(ref)


def check_resumable(folder: Path, cfg: SipConfig) -> dict:
    """The checkpoint's trainer state, after checking it is whole and belongs to this config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"run.resume_from={folder}: no such checkpoint folder")
    if not is_complete(folder):
        raise CheckpointError(f"run.resume_from={folder}: the checkpoint is incomplete (no {MARKER} marker: "
                              "its writing was interrupted); resume from an earlier one")
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"run.resume_from={folder}: cannot read {STATE_FILE} ({err})") from None
    read_sharded_metadata(folder)
    theirs, ours = state.get("fingerprint", {}), fingerprint(cfg)
    differences = [f"{key}: checkpoint {theirs.get(key)!r}, this run {ours[key]!r}"
                   for key in ours if theirs.get(key) != ours[key]]
    if differences:
        raise CheckpointError(f"run.resume_from={folder} was written by a different run:\n  " + "\n  ".join(differences))
    return state


def link_or_copy_tree(source: Path, dest: Path) -> None:
    """Hard links where the filesystem allows (a frozen model kept in every checkpoint costs no space), else copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        target = dest / item.name
        if item.is_dir():
            link_or_copy_tree(item, target)
            continue
        try:
            os.link(item, target)
        except OSError:
            shutil.copy2(item, target)


# torch.distributed.checkpoint pickles its metadata and non-tensor values. Only these classes may
# come out of a checkpoint: anything else (a crafted file's os.system, say) is refused unrun.
_ALLOWED_GLOBALS = {
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
}
_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"the checkpoint's sharded state refers to {module}.{name}, which sip does not load "
                              "(a checkpoint only holds tensors and plain values)")


def read_sharded_metadata(folder: Path):
    """The sharded state's index, unpickled with the allowlist (CheckpointError for anything else)."""
    try:
        with open(Path(folder) / SHARDED_DIR / ".metadata", "rb") as f:
            return _RestrictedUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"cannot read the sharded state of {folder} ({err})") from None


def load_sharded(state_dict: dict, folder: Path) -> None:
    """`torch.distributed.checkpoint.load` into `state_dict` (any world size), refusing executable pickles."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_sharded_metadata(folder)
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # plain values only (the default unpickles anything)
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    read_sharded_metadata(folder)  # refuse a bad file here, before the collective load starts
    dcp.load(state_dict, storage_reader=Reader(Path(folder) / SHARDED_DIR), planner=Planner())


def save_sharded(state_dict: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dict, checkpoint_id=Path(folder) / SHARDED_DIR)


def write_state(folder: Path, state: dict) -> None:
    (Path(folder) / STATE_FILE).write_text(json.dumps(state, indent=1))


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())
