"""A checkpoint is data, never code: a resume refuses, with one line naming the file and why, a
checkpoint whose pickled index names anything but DCP's own classes, whose trainer state is
malformed, or that holds a symlink, FIFO or socket; a checkpoint is fsynced before it is renamed
complete; and a full disk fails the save with the space it needs, leaving no partial folder."""

import json
import os
import pickle
import resource
import shutil
import signal
import socket
import struct
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from sip.checkpoint import CheckpointError, CheckpointWriteError, check_resumable, complete, prune, step_dir
from helpers import EXAMPLES, assert_refused, make_cfg, one_rank, sip, step

pytestmark = pytest.mark.filterwarnings("ignore")
CFG = make_cfg("nll")


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):
    """A real checkpoint of a one-rank learner with the tiny test policy."""
    root = tmp_path_factory.mktemp("ckpt")
    final = step_dir(root / "run", 1)
    with one_rank(CFG, tokenizer_dir) as learner:
        step(learner, EXAMPLES)
        learner.save(str(root / "partial"), str(final), {"sampler": {"next_document": 3}})
    return final


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A copy of the real checkpoint, for a test to spoil."""
    copy = tmp_path / "step_000001"
    shutil.copytree(checkpoint, copy)
    return copy


def refused(folder: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        check_resumable(folder, CFG)
    message = str(err.value)
    assert message.startswith("checkpoint refused: ") and "\n" not in message, message
    return message


# ---- the sharded state's pickled index -------------------------------------------------------------

def call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle of `module.name(arg)`, the callable named by STACK_GLOBAL."""
    def text(s: str) -> bytes:
        return pickle.BINUNICODE + struct.pack("<I", len(s.encode())) + s.encode()

    return (pickle.PROTO + bytes([4]) + text(module) + text(name) + pickle.STACK_GLOBAL + text(arg) + pickle.TUPLE1
            + pickle.REDUCE + pickle.STOP)


PAYLOADS = {
    # the module's own `import os`, reached by a dotted name
    "dotted os.mkdir": lambda witness: call("torch.distributed.checkpoint.metadata", "os.mkdir", str(witness)),
    "dotted os.system": lambda witness: call("torch.distributed.checkpoint.metadata", "os.system", f"touch {witness}"),
    "builtins.eval": lambda witness: call("builtins", "eval", f"__import__('os').mkdir({str(witness)!r})"),
}


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_pickle_that_runs_code_is_refused_unrun(payload, folder, tmp_path):
    witness = tmp_path / "pwned"
    data = PAYLOADS[payload](witness)
    pickle.loads(data)  # the payload is live: a plain unpickler runs it
    assert witness.exists()
    witness.rmdir() if witness.is_dir() else witness.unlink()

    (folder / "sharded" / ".metadata").write_bytes(data)
    message = refused(folder)
    assert not witness.exists()
    name = payload.split()[-1]
    assert f"{folder / 'sharded' / '.metadata'} refers to " in message and name in message, message


@pytest.mark.parametrize("data, why", [
    (call("torch.serialization", "_get_layout", "os"), "is not a sharded-state index (KeyError"),
    (call("pathlib", "PosixPath", "/etc/passwd"), "holds a PosixPath, not a sharded-state index"),
    (b"\x80\x04garbage", "is not a sharded-state index"),
])
def test_allowed_classes_misused_or_a_broken_index_are_refused(data, why, folder):
    (folder / "sharded" / ".metadata").write_bytes(data)
    assert why in refused(folder)


def test_a_real_checkpoint_passes_every_check(checkpoint):
    state = check_resumable(checkpoint, CFG)
    assert state["version"] == 1 and state["extra"] == {"sampler": {"next_document": 3}}


# ---- the trainer state ------------------------------------------------------------------------------

def edited(**changes):
    return lambda state: json.dumps({**state, **changes}).encode()


@pytest.mark.parametrize("spoil, why", [
    (lambda state: b"[]", "the file: Input should be an object"),
    (lambda state: b'{"version": 1', "Invalid JSON"),
    (lambda state: b"\xff\xfe{}", "Invalid JSON"),
    (edited(version="abc"), "version: Input should be a valid integer"),
    (edited(version=-1), "version: Input should be greater than or equal to 0"),
    (edited(version=True), "version: Input should be a valid integer"),
    (edited(fingerprint=[]), "fingerprint: Input should be an object"),
    (edited(rng=["not base64!"]), "rng.0: Value error, not base64"),
    (edited(rng=["AAAA"]), "rng.0: Value error, 3 bytes, not a torch RNG state"),
    (edited(extra={"ledger": []}), "extra.ledger: Input should be an object"),
    (edited(extra={"sampler": {"next_document": "7"}}), "extra.sampler.next_document: Input should be a valid integer"),
    (edited(scheduler={"last_epoch": 1}), "scheduler.base_lrs: Field required"),
    (lambda state: json.dumps({k: v for k, v in state.items() if k != "extra"}).encode(), "extra: Field required"),
])
def test_a_malformed_trainer_state_is_refused_naming_the_field(spoil, why, folder):
    path = folder / "trainer_state.json"
    path.write_bytes(spoil(json.loads(path.read_text())))
    message = refused(folder)
    assert f"{path} is not a trainer state (" in message and why in message, message


def test_an_oversized_trainer_state_is_refused_unread(folder):
    path = folder / "trainer_state.json"
    with path.open("r+b") as f:
        f.truncate(64 * 2**20 + 1)  # sparse: the size is what counts
    assert f"{path} is 64.0 MiB, more than the 64.0 MiB it may be" in refused(folder)


# ---- what the folder holds ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["trainer_state.json", "sharded/.metadata", "config.json"])
def test_a_fifo_is_refused_without_hanging(name, folder):
    fifo = folder / name
    fifo.unlink()
    os.mkfifo(fifo)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_refusal(folder)), daemon=True)
    thread.start()
    thread.join(timeout=15)
    if thread.is_alive():  # let the blocked reader go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"check_resumable hung on the FIFO {name}")
    assert outcome == [f"checkpoint refused: {fifo} is a FIFO; a checkpoint holds only regular files and folders"]


def _refusal(folder: Path) -> str | None:
    try:
        check_resumable(folder, CFG)
    except CheckpointError as err:
        return str(err)
    return None


def test_a_socket_is_refused(folder, monkeypatch):
    monkeypatch.chdir(folder)  # a socket's path must be short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("control")
        assert f"{folder / 'control'} is a socket" in refused(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "sharded"])
def test_a_symlink_out_of_the_checkpoint_is_refused(name, folder, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)
    assert f"{folder / name} is a symbolic link (to {outside})" in refused(folder)


def test_hard_links_are_regular_files(folder, tmp_path):
    """Checkpoints hard-link the DPO reference to the previous one's: a hard link is fine."""
    outside = tmp_path / "kept.safetensors"
    os.link(folder / "model.safetensors", outside)
    assert os.stat(outside).st_nlink == 2
    assert check_resumable(folder, CFG)["version"] == 1


# ---- writing: durable, and no stale partial folders -----------------------------------------------

def test_every_file_and_folder_is_fsynced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    partial, final = tmp_path / "ckpts" / ".step_000002.partial", tmp_path / "ckpts" / "step_000002"
    (partial / "sharded").mkdir(parents=True)
    (partial / "sharded" / "__0_0.distcp").write_bytes(b"x")
    (partial / "model.safetensors").write_bytes(b"y")
    (tmp_path / "elsewhere").write_bytes(b"z")
    os.link(tmp_path / "elsewhere", partial / "linked")
    events: list = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    complete(partial, final)

    before = set(events[: events.index("replace")])
    expected = {str(partial / name) for name in ("", "sharded", "sharded/__0_0.distcp", "model.safetensors", "linked",
                                                 "COMPLETE")}
    assert expected <= before, expected - before
    assert events[events.index("replace") + 1:] == [str(final.parent)]
    assert (final / "COMPLETE").exists() and not partial.exists()


def test_prune_keeps_the_newest_and_removes_partial_folders(tmp_path):
    folders = tmp_path / "checkpoints"
    for n in (1, 2, 3):
        (folders / f"step_00000{n}").mkdir(parents=True)
        (folders / f"step_00000{n}" / "COMPLETE").write_text("")
    (folders / ".step_000004.partial" / "sharded").mkdir(parents=True)
    (folders / ".step_000004.partial" / "sharded" / "__0_0.distcp").write_bytes(b"half")
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in folders.iterdir()) == ["step_000002", "step_000003"]


# ---- a full disk ---------------------------------------------------------------------------------

@contextmanager
def file_size_limit(nbytes: int):
    """A real RLIMIT_FSIZE on this process: a write past it fails with EFBIG (SIGXFSZ ignored meanwhile)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, previous_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_write_that_fails_for_lack_of_space_says_so_and_leaves_no_partial_folder(tokenizer_dir, tmp_path):
    with one_rank(make_cfg("nll"), tokenizer_dir) as learner:
        step(learner, EXAMPLES)
        with file_size_limit(64 * 1024), pytest.raises(CheckpointWriteError) as refused:
            learner.save(str(tmp_path / "partial"), str(tmp_path / "step_000001"), {})
    assert str(refused.value).startswith(f"cannot write the checkpoint {tmp_path / 'partial'}: File too large; "
                                         "a checkpoint needs about "), refused.value
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root; skipped where it cannot be mounted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?); the RLIMIT_FSIZE test covers a failing write")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_found_before_writing_and_when_writing(small_disk, tokenizer_dir, monkeypatch):
    with one_rank(CFG, tokenizer_dir) as learner:
        step(learner, EXAMPLES)
        with pytest.raises(CheckpointWriteError, match=rf"^cannot write the checkpoint {small_disk / 'partial'}: "
                                                       r"it needs about 0\.\d MiB and only 0\.\d MiB are free there"):
            learner.save(str(small_disk / "partial"), str(small_disk / "step_000001"), {})
        assert list(small_disk.iterdir()) == []

        monkeypatch.setattr("sip.actors.learner.space_shortage", lambda folder, need: None)  # the disk fills meanwhile
        with pytest.raises(CheckpointWriteError, match=rf"^cannot write the checkpoint {small_disk / 'partial'}: "
                                                       "No space left on device; a checkpoint needs about"):
            learner.save(str(small_disk / "partial"), str(small_disk / "step_000001"), {})
        assert list(small_disk.iterdir()) == []


# ---- through the CLI: one line, no traceback, no hang -----------------------------------------------

@pytest.mark.parametrize("spoil", ["dotted pickle", "fifo"])
def test_the_cli_refuses_a_spoiled_checkpoint_in_one_line(spoil, folder, tmp_path):
    witness = tmp_path / "pwned"
    if spoil == "fifo":
        (folder / "trainer_state.json").unlink()
        os.mkfifo(folder / "trainer_state.json")
    else:
        (folder / "sharded" / ".metadata").write_bytes(PAYLOADS["dotted os.mkdir"](witness))
    done, seconds = sip("train", f"run.resume_from={folder}", f"--output-dir={tmp_path / 'run'}", timeout=60)
    assert_refused(done, seconds, "checkpoint refused: ", "is a FIFO" if spoil == "fifo" else "os.mkdir")
    assert not witness.exists()

