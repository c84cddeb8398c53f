"""Files that appear under their final name only once they are complete and checked.

A writer works on ``.NAME.xorweights-partial`` beside the final path. Nothing
that looks finished exists until :meth:`AtomicWriter.commit`, which fsyncs the
data, renames, and fsyncs the folder. Any failure before that removes the
partial file, and a kill -9 leaves only an obviously partial name behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from .errors import OutputError

PARTIAL_SUFFIX = ".xorweights-partial"


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


def remove_partials(folder: Path) -> None:
    """Delete partial files an earlier, killed run left in ``folder`` (an output we own)."""
    for p in folder.rglob(f".*{PARTIAL_SUFFIX}"):
        p.unlink(missing_ok=True)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a finished range to disk now, not all at the final fsync.

    On Linux, POSIX_FADV_DONTNEED queues the dirty pages for writeback without
    waiting and drops them from the page cache once clean, so disk writes
    overlap the rest of the work and a 65 GB decode does not flood the cache.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_error(exc: OSError, path: Path) -> OutputError:
    """Turn an OS error while writing into one line with a fix."""
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{path}: the disk is full", "free some space and run the same command again; it resumes")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: not allowed to write here ({exc.strerror})", "choose a writable output folder")
    return OutputError(f"{path}: cannot write ({exc.strerror})")


class AtomicWriter:
    """Context manager that writes ``final`` through a partial file."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.partial = partial_path(final)
        self.file: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            # A fresh, exclusive file: never write through a link someone left at the partial name.
            self.partial.unlink(missing_ok=True)
            fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self.file = os.fdopen(fd, "wb")
        except OSError as exc:
            raise output_error(exc, self.final) from exc
        return self.file

    def commit(self) -> None:
        """Flush, fsync and move the file to its final name."""
        assert self.file is not None
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.partial, self.final)
            fsync_dir(self.final.parent)
        except OSError as exc:
            raise output_error(exc, self.final) from exc
        self.file = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.file is not None:  # not committed: leave nothing behind
            self.file.close()
            self.partial.unlink(missing_ok=True)
            self.file = None
        if isinstance(exc, OSError):
            raise output_error(exc, self.final) from exc


def copy_atomic(src: Path, dst: Path, check: Callable[[str], None]) -> None:
    """Copy ``src`` to ``dst``; ``check(sha256)`` runs before the rename and may raise."""
    writer = AtomicWriter(dst)
    with writer as out, src.open("rb") as f:
        h = hashlib.sha256()
        while block := f.read(1 << 20):
            h.update(block)
            out.write(block)
        check(h.hexdigest())
        writer.commit()


def write_atomic(final: Path, data: bytes) -> None:
    """Write a small file in one go, atomically."""
    writer = AtomicWriter(final)
    with writer as f:
        f.write(data)
        writer.commit()


def refuse_links(root: Path, path: Path) -> None:
    """Refuse ``path`` if it, or a folder between ``root`` and it, is a symbolic link.

    Everything xorweights writes must land inside ``root``; a link planted in
    the output folder would send a write somewhere else.
    """
    current = path
    while current != root and root in current.parents:
        if current.is_symlink():
            raise OutputError(
                f"{current}: is a symbolic link; xorweights writes only inside {root}",
                "remove the link, or decode into a new, empty folder",
            )
        current = current.parent


def refuse_overlap(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output folder that is, or lies inside, an input (or holds one)."""
    out_r = Path(out).resolve()
    for role, path in inputs.items():
        in_r = Path(path).resolve()
        if in_r.is_file():
            in_r = in_r.parent
        if out_r == in_r or in_r in out_r.parents:
            raise OutputError(
                f"{out}: the output folder lies inside the {role} {path}",
                "write to a folder outside every input; xorweights never writes into its inputs",
            )
        if out_r in in_r.parents:
            raise OutputError(
                f"{out}: the output folder contains the {role} {path}",
                "write to a separate, new folder",
            )
