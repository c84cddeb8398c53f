"""One writer per output folder: a lock file that dies with its process.

The lock is ``fcntl.flock`` on ``FOLDER/.xorweights/lock``. The kernel drops it
when the holder exits, even on kill -9, so a lock left by a dead process is
simply taken over; the pid written inside only serves the messages.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

from .atomic import output_error, refuse_links
from .errors import OutputError

LOCK_DIR = ".xorweights"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """Hold the lock on ``folder`` for the duration of a ``with`` block."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_DIR / "lock"
        self.fd: int | None = None
        self.took_over_from: int | None = None  # pid of a dead holder whose lock we took

    def __enter__(self) -> FolderLock:
        refuse_links(self.path.parent.parent, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise output_error(exc, self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {owner[0]} on {owner[1]}" if len(owner) >= 2 else "another process"
            raise OutputError(
                f"{self.path.parent.parent}: another xorweights ({who}) is writing into this folder",
                "wait for it to finish, or use another output folder",
            ) from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").split()
        if previous and previous[0].isdigit() and previous[1:2] == [socket.gethostname()]:
            pid = int(previous[0])
            if pid != os.getpid() and not _alive(pid):
                self.took_over_from = pid
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody holds it
            os.close(self.fd)  # closing releases the flock
            self.fd = None
