"""One writer per output folder: an exclusive lock held while collect, train or analyze writes.

Two runs writing into the same folder interleave silently (every metrics line twice, a
cache with shards from both). So each writing command holds a lock on its output folder:
the file ``.<folder name>.lock`` beside the folder (beside, not inside, so that a folder
swapped in whole, as analyze does, keeps its lock), holding the holder's pid, host and
command.

The lock itself is an ``flock`` on that file, which the kernel drops when the holder
exits, even on kill -9. A lock file left by a process that is gone is therefore stale:
the next run takes it over and says so. A second run while the holder lives is refused
with one line naming it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from crossdiff.errors import CrossdiffError
from crossdiff.files import ensure_output_folder, write_error


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str, *, shared_by_ranks: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock of output ``folder`` (created if missing) for ``command``.

    ``shared_by_ranks``: the processes of one torchrun job share the folder; only rank 0
    (or a process outside torchrun) takes the lock.
    """
    folder = ensure_output_folder(folder)
    if shared_by_ranks and os.environ.get("RANK", "0") != "0":
        yield folder
        return
    path = lock_path(folder)
    fd = _acquire(path, folder, command)
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before unlocking: a waiter then finds the path gone and retries
        os.close(fd)


def _acquire(path: Path, folder: Path, command: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise write_error(path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CrossdiffError(
                    f"{folder} is in use by {holder}; wait for it to finish "
                    "or choose another output folder"
                ) from None
            raise write_error(path, err) from None
        # The holder we waited on may have unlinked the file before we locked it: then we
        # hold a lock on a file nobody else can see, and must start over.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read_holder(fd)
        if previous:
            print(f"crossdiff: taking over the stale lock {path} of {_describe(previous)}, which is gone",
                  file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return fd


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "command": "an unreadable lock"}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return f"crossdiff {holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')})"
