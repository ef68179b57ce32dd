"""Checkpoints on disk: their layout, how one is made complete, and what a resume checks first.

A checkpoint is written into a hidden `.step_N.partial` folder and renamed to `step_N` only after
its `COMPLETE` marker is written and every file and folder in it is fsynced, so neither a crash
nor a power cut mid-write leaves a folder that looks whole.
Each holds a Hugging Face folder (`from_pretrained` loads it), the sharded training state
(torch.distributed.checkpoint: model and optimizer, loadable by any number of learner ranks), the
DPO reference, and `trainer_state.json` (version, RNG, data cursor, ledger).

A checkpoint is data, never code. A resume first checks every entry (regular files and folders
only: no symlink, FIFO, socket or device), validates the trainer state's fields, and reads the
sharded state's pickled index with an exact allowlist of classes (`read_sharded_metadata`);
anything else is a `CheckpointError` that says which file is refused and why.

The module imports neither torch nor ray at the top: the driver checks a resume before it starts anything.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import json
import os
import pickle
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from sip.config import BASE_BUILD_SETTINGS, UNKEYED_WORLD_SETTINGS, SipConfig

STATE_FILE = "trainer_state.json"
MARKER = "COMPLETE"
REFERENCE_DIR = "reference"
SHARDED_DIR = "sharded"
PREFIX = "step_"
MAX_STATE_BYTES = 64 * 2**20
MAX_METADATA_BYTES = 2**30


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk, say); its partial folder is gone."""


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"{PREFIX}{step:06d}"


def partial_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).exists()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete(partial: Path, final: Path) -> None:
    """Mark a fully written checkpoint and move it into place (replacing an older one of that step).

    Every file and folder is fsynced before the rename and the parent after it: a folder named
    step_N survives a power cut whole."""
    (partial / MARKER).write_text("")
    for root, _, files in os.walk(partial, topdown=False):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync(final.parent)


def complete_checkpoints(out: Path) -> list[Path]:
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def prune(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any partial one left by a crash
    (prune runs after a save has completed, so no partial folder is being written)."""
    for old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in (Path(out) / "checkpoints").glob(f".{PREFIX}*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


# ---- writing: space ------------------------------------------------------------------------------

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _free_space(folder: Path) -> int:
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    return shutil.disk_usage(existing).free


def space_shortage(folder: Path, need: int) -> str | None:
    """Why a checkpoint of about `need` bytes does not fit where `folder` will be, or None if it does."""
    free = _free_space(Path(folder))
    if free >= need:
        return None
    return (f"cannot write the checkpoint {folder}: it needs about {_mib(need)} and only {_mib(free)} are free there; "
            "free some space (or lower run.keep_checkpoints)")


def _disk_full(err: BaseException) -> int | None:
    """The errno if `err`, or an error it wraps, is a full disk, an exceeded quota or file size limit."""
    seen = [err]
    for e in seen:
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e.errno
        found = re.search(r"\(os error (\d+)\)", str(e))  # safetensors (Rust) gives the OS error only in words
        if found and int(found[1]) in _DISK_FULL:
            return int(found[1])
        # torch.distributed.checkpoint raises CheckpointException with each rank's (error, traceback)
        failures = getattr(e, "failures", None)
        failures = [f[0] if isinstance(f, tuple) else f for f in failures.values()] if isinstance(failures, dict) else []
        seen += [w for w in (e.__cause__, e.__context__, *failures) if isinstance(w, BaseException) and w not in seen]
    return None


@contextmanager
def writing(folder: Path, need: int):
    """Around writing a checkpoint into `folder`: on any failure the folder is removed, and a full
    disk becomes a CheckpointWriteError naming the folder and the space a checkpoint needs."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    folder = Path(folder)
    try:
        yield
    except (Exception, CheckpointException) as err:
        code = _disk_full(err)
        if code is None and _free_space(folder) < 2**20:  # torch's zip writer reports a full disk without the errno
            code = errno.ENOSPC
        shutil.rmtree(folder, ignore_errors=True)
        if code is None:
            raise
        raise CheckpointWriteError(
            f"cannot write the checkpoint {folder}: {os.strerror(code)}; a checkpoint needs about {_mib(need)} "
            f"and {_mib(_free_space(folder))} are free there. The partial checkpoint was removed; free some space "
            "(or lower run.keep_checkpoints)") from None


# ---- resuming: checks --------------------------------------------------------------------------

def fingerprint(cfg: SipConfig) -> dict:
    """What a checkpoint's training state depends on: a resume with other values would be a different run."""
    return {
        "policy": cfg.policy.model_dump(mode="json", exclude={"torch_threads"}),
        "data": cfg.data.model_dump(mode="json", exclude={"world": set(UNKEYED_WORLD_SETTINGS)}),
        "base": cfg.base.model_dump(mode="json", exclude=set(BASE_BUILD_SETTINGS)),
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


def _refused(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint refused: {path} {why}")


def check_files(folder: Path) -> None:
    """Every entry under `folder` is a regular file or a folder (hard links are regular files)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink():
                raise _refused(Path(entry.path), f"is a symbolic link (to {os.readlink(entry.path)}); a checkpoint "
                               "holds only regular files and folders")
            if entry.is_dir(follow_symlinks=False):
                check_files(Path(entry.path))
            elif not entry.is_file(follow_symlinks=False):
                kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                what = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                        stat.S_IFBLK: "a block device"}.get(kind, "not a regular file")
                raise _refused(Path(entry.path), f"is {what}; a checkpoint holds only regular files and folders")


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; opening never blocks (a FIFO) nor follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise _refused(path, f"cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refused(path, "is not a regular file")
        if info.st_size > limit:
            raise _refused(path, f"is {_mib(info.st_size)}, more than the {_mib(limit)} it may be")
        return f.read(limit)


Count = Annotated[int, Field(ge=0)]


def _rng_state(value: str) -> str:
    import torch

    try:
        size = len(base64.b64decode(value, validate=True))
    except binascii.Error:
        raise ValueError("not base64") from None
    if size != torch.get_rng_state().numel():
        raise ValueError(f"{size} bytes, not a torch RNG state")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)  # "3" is not a version, nor true a count


class _Cursor(_Strict):
    next_document: Count = 0
    next_chunk: Count = 0
    documents_read: Count = 0
    skipped: dict[str, Count] = {}
    documents_truncated: Count = 0


class _LedgerCounts(_Strict):
    fed: Count = 0
    refed: Count = 0
    trained: Count = 0
    mismatched: Count = 0
    skipped: dict[str, Count] = {}


class _Extra(_Strict):
    """The driver's components in a checkpoint (train/checkpoints.py)."""

    sampler: _Cursor | None = None
    ledger: _LedgerCounts | None = None
    counters: dict[str, Count] = {}
    faults: dict[str, Count] = {}


class _Scheduler(_Strict):
    base_lrs: list[float]
    last_epoch: int
    lr_lambdas: list[None]


class TrainerState(_Strict):
    """`trainer_state.json`, as the learner's `save` writes it."""

    version: Count
    scheduler: _Scheduler
    rng: list[Annotated[str, AfterValidator(_rng_state)]]
    fingerprint: dict[str, Any]
    extra: _Extra


def read_state(folder: Path) -> dict:
    """`trainer_state.json`, its fields checked (CheckpointError naming what is wrong)."""
    path = Path(folder) / STATE_FILE
    raw = _read_regular(path, MAX_STATE_BYTES)
    try:
        TrainerState.model_validate_json(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in err.errors()[:3])
        raise _refused(path, f"is not a trainer state ({problems})") from None
    return json.loads(raw)


def write_state(folder: Path, state: dict) -> None:
    (Path(folder) / STATE_FILE).write_text(json.dumps(state, indent=1))


def check_resumable(folder: Path, cfg: SipConfig) -> dict:
    """The checkpoint's trainer state, after checking that it is whole, holds only data, and belongs to this config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"run.resume_from={folder}: no such checkpoint folder")
    if not is_complete(folder):
        raise CheckpointError(f"run.resume_from={folder}: the checkpoint is incomplete (no {MARKER} marker: "
                              "its writing was interrupted); resume from an earlier one")
    check_files(folder)
    state = read_state(folder)
    read_sharded_metadata(folder)
    theirs, ours = state["fingerprint"], fingerprint(cfg)
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


# ---- the sharded state ---------------------------------------------------------------------------

# torch.distributed.checkpoint pickles its index (`sharded/.metadata`). Only these exact classes
# (and torch's dtypes) may come out of it, found by listing the globals of a real checkpoint: never
# a whole module, whose own imports (`os`) a dotted name would reach.
_ALLOWED_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
        "TensorProperties", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),  # as Python 3.13 pickles it
}


class _NotAllowed(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        raise _NotAllowed(f"refers to {module}.{name}, which sip does not load (the index holds only "
                          "DCP's metadata classes, shapes, dtypes and plain values)")


def read_sharded_metadata(folder: Path):
    """The sharded state's index, unpickled with the allowlist (CheckpointError for anything else)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / SHARDED_DIR / ".metadata"
    raw = _read_regular(path, MAX_METADATA_BYTES)
    try:
        metadata = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except _NotAllowed as err:
        raise _refused(path, str(err)) from None
    except Exception as err:  # a broken file, or an allowed class given bad arguments
        raise _refused(path, f"is not a sharded-state index ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise _refused(path, f"holds a {type(metadata).__name__}, not a sharded-state index")
    return metadata


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
