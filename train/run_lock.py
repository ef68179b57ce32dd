"""One run writes an output folder at a time.

A run holds an exclusive `flock` on `<output_dir>/.sip.lock` from before its inputs are checked
until it ends. The kernel drops the lock when the process dies however it dies, so a lock left by a
killed run is free and the next run takes it over; the file's text (run id, pid, host, start time)
only names the holder in messages.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".sip.lock"


class OutputLocked(RuntimeError):
    """Another live run writes this output folder."""


class OutputLock:
    def __init__(self, out: Path, run_id: str):
        self.path = Path(out) / LOCK_FILE
        self.run_id = run_id
        self.file = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.file.close()
            raise OutputLocked(f"{self.path.parent} is being written by another run ({holder}): wait for it to end, "
                               "or write this run elsewhere with --output-dir") from None
        previous = self._holder()
        if previous:
            logging.getLogger(__name__).warning("%s: taking over the lock of a run that ended without releasing it (%s)",
                                                self.path.parent, previous)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self.file.flush()
        return self

    def _holder(self) -> str:
        self.file.seek(0)
        text = self.file.read().strip()
        try:
            info = json.loads(text)
            return f"run {info['run_id']}, pid {info['pid']} on {info['host']}, started {info['started']}"
        except (ValueError, KeyError, TypeError):
            return text[:200]

    def __exit__(self, *exc) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.file.close()  # closing drops the flock
