"""One writer per output folder: a lock file that dies with its process.

The lock is ``fcntl.flock`` on ``FOLDER/.xorweights/lock``, opened relative to
the held output folder without following links. The kernel drops it when the
holder exits, even on kill -9, so a lock left by a dead process is simply
taken over; the pid written inside only serves the messages.

``fcntl`` exists only on POSIX, so it is imported when a lock is taken, not
with the module: ``import xorweights`` works everywhere. Where there is no
``fcntl`` (Windows), ``msvcrt.locking`` holds the file's first byte instead,
which Windows also releases when the holder dies. (The filelock package
cannot open its file relative to a held folder, so it is not used.)
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from .errors import OutputError
from .outdir import OutputDir, output_error

LOCK_NAME = "lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, which has no dir_fd either


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False if another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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

    def __init__(self, folder: OutputDir | Path) -> None:
        self._own = not isinstance(folder, OutputDir)  # opened here, closed here
        self.folder = OutputDir(folder) if not isinstance(folder, OutputDir) else folder
        self.path = self.folder.path / ".xorweights" / LOCK_NAME
        self.fd: int | None = None
        self.took_over_from: int | None = None  # pid of a dead holder whose lock we took

    def __enter__(self) -> FolderLock:
        try:
            return self._take()
        except BaseException:
            if self._own:
                self.folder.close()
            raise

    def _take(self) -> FolderLock:
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644, dir_fd=self.folder.work_fd)
        except OSError as exc:
            raise output_error(exc, self.path) from None
        if os.fstat(fd).st_nlink != 1:  # a hard link planted at our name: truncating it would harm its other name
            os.close(fd)
            raise OutputError(f"{self.path}: has other names (hard links); not ours", f"delete {self.path}")
        if not _try_lock(fd):
            owner = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {owner[0]} on {owner[1]}" if len(owner) >= 2 else "another process"
            raise OutputError(
                f"{self.folder.path}: another xorweights ({who}) is writing into this folder",
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
        if self._own:
            self.folder.close()
