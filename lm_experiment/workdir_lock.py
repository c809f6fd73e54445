"""One writer per workdir: an advisory lock on WORKDIR/.lock, held while a training run writes there.

Two runs on one workdir would otherwise interleave their checkpoints, metrics and summaries (the second
deleting the first's unfinished checkpoint, or replacing its results). The lock is `fcntl.flock` on an
open file, so the kernel releases it when the process ends however it ends; nothing stale is left to
clean. The file names the holder ("pid 123 on host node-1") for the error the second run gets. flock is
not reliable on every network file system (NFS before Linux 2.6.12 emulates it per host).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class WorkdirBusyError(ValueError):
    """Another process holds the workdir's lock."""


@contextlib.contextmanager
def hold(workdir: Path) -> Iterator[None]:
    """Holds workdir's lock for the duration; WorkdirBusyError at once if another process holds it."""
    handle = open(Path(workdir) / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not yet written its name"
            raise WorkdirBusyError(f"workdir: {workdir} is in use by another training run ({holder}); wait for "
                                   f"it to finish or use another workdir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)  # an unheld lock names nobody
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
