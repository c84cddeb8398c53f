"""The output folder, held open: files appear under their final names only once complete, and never replace others.

Another process can plant a link or a file in the output folder while a
command runs, so checking once up front is not enough. Everything here goes
through file descriptors instead of paths:

- The folder is opened once (``OUT``). Subfolders are opened (and made) one
  component at a time relative to it with ``O_DIRECTORY | O_NOFOLLOW``, so a
  link planted as a subfolder is refused, never followed.
- Files are written under a partial name in ``OUT/.xorweights/``, a folder of
  our own opened the same way, created with ``O_CREAT | O_EXCL | O_NOFOLLOW``.
- A finished file gets its final name with ``linkat`` relative to the held
  folders, which fails if that name exists: something that appeared there
  meanwhile is refused and left alone, never replaced. (Where hard links are
  not supported, Linux's ``renameat2(RENAME_NOREPLACE)`` does the same.) Then
  the partial name is unlinked and the folder fsynced.
- Files already in OUT are looked at with ``lstat`` and ``O_NOFOLLOW`` relative
  to the held folder, so a link is never read through or vouched for.
- Leftover partials of a killed run are removed by exact name, only those
  this command would write, only inside ``OUT/.xorweights/``: nothing else is
  ever deleted, and a command writing into ``OUT/inner`` is not disturbed.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from .errors import OutputError
from .inputs import sha256_exact

WORK_DIR = ".xorweights"  # our own folder inside OUT: the lock, state files and partial files
WRITEBACK_MIN_BYTES = 4 << 20

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_RENAME_NOREPLACE = 1


def output_error(exc: OSError, path: Path, *, resumes: bool = False) -> OutputError:
    """Turn an OS error while writing into one line with a fix; promise a resume only where there is one."""
    if exc.errno == errno.ENOSPC:
        again = "run the same command again; it resumes" if resumes else "run the same command again"
        return OutputError(f"{path}: the disk is full", f"free some space and {again}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: not allowed to write here ({exc.strerror})", "choose a writable output folder")
    return OutputError(f"{path}: cannot write ({exc.strerror})")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a finished range to disk now, not all at the final fsync.

    On Linux, POSIX_FADV_DONTNEED queues the dirty pages for writeback without
    waiting and drops them from the page cache once clean, so disk writes
    overlap the rest of the work and a 65 GB decode does not flood the cache.
    """
    # Below a few MiB the call costs more than it saves (0.1 ms each): the final fsync covers those.
    if length >= WRITEBACK_MIN_BYTES and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _foreign(path: Path) -> OutputError:
    return OutputError(
        f"{path}: already exists and is not the file this command writes",
        "write into a new, empty folder, or remove that file",
    )


def _appeared(path: Path) -> OutputError:
    return OutputError(
        f"{path}: appeared while xorweights was writing it; it was left alone and the new file was not kept",
        "make sure nothing else writes into this folder, then run the same command again",
    )


def _rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """``renameat2(..., RENAME_NOREPLACE)``: atomic, and fails with EEXIST instead of replacing."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _link_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """Give ``src`` the second name ``dst`` and drop ``src``; FileExistsError if ``dst`` exists."""
    try:
        os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        _rename_noreplace(src_dir, src, dst_dir, dst)  # no hard links here (FAT, some FUSE mounts)
        return
    os.unlink(src, dir_fd=src_dir)


def publish(src_dir: int, src: str, dst_dir: int, dst: str, where: Path, *, replace: bool = False) -> None:
    """Give the finished file ``src`` the name ``dst``; refuse if ``dst`` exists, unless ``replace``.

    ``replace`` is only for names inside a folder that is ours by
    construction, or a file the user named; a rename replaces a link itself
    and never writes through it.
    """
    if replace:
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return
    try:
        _link_noreplace(src_dir, src, dst_dir, dst)
    except FileExistsError:
        os.unlink(src, dir_fd=src_dir)
        raise _appeared(where) from None


class OutputDir:
    """An output folder opened once; every file is created, looked at and named relative to it.

    The folder itself is the one the user named (made if missing); inside it,
    nothing is followed through a link.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, _DIR_FLAGS)
        except OSError as exc:
            raise OutputError(
                f"{self.path}: cannot create the output folder ({exc.strerror})", "choose a writable location"
            ) from None
        self._dirs: dict[str, int] = {"": self.fd}

    @property
    def work_fd(self) -> int:
        """Our own folder in OUT, made on first use (so a command refused early leaves none behind)."""
        fd = self.dir_fd(WORK_DIR, create=True)
        assert fd is not None
        return fd

    # ------------------------------------------------------------ folders

    def dir_fd(self, rel: str, *, create: bool) -> int | None:
        """The held folder ``rel`` below OUT (None if missing and not ``create``); refuses links."""
        if rel in self._dirs:
            return self._dirs[rel]
        parent, _, name = rel.rpartition("/")
        parent_fd = self.dir_fd(parent, create=create)
        if parent_fd is None:
            return None
        where = self.path / rel
        if create:
            try:
                os.mkdir(name, 0o755, dir_fd=parent_fd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise output_error(exc, where) from None
        try:
            fd = os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=parent_fd)
        except FileNotFoundError:
            if create:
                raise OutputError(f"{where}: removed while xorweights was writing into it") from None
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OutputError(
                    f"{where}: is a symbolic link or a file, where xorweights needs a folder of its own",
                    "remove it, or write into a new, empty folder",
                ) from None
            raise output_error(exc, where) from None
        self._dirs[rel] = fd
        return fd

    def _parent(self, rel: str, *, create: bool) -> tuple[int | None, str]:
        parent, _, name = rel.rpartition("/")
        return self.dir_fd(parent, create=create), name

    # ------------------------------------------------------------ what is there

    def lstat(self, rel: str) -> os.stat_result | None:
        """What is at ``rel`` now, without following a link; None if nothing."""
        parent_fd, name = self._parent(rel, create=False)
        if parent_fd is None:
            return None
        try:
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def _open_existing(dir_fd: int, name: str) -> tuple[BinaryIO, os.stat_result] | None:
        """``name`` in a held folder, opened for reading without following a link; None if nothing is there."""
        try:
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        return os.fdopen(fd, "rb"), os.fstat(fd)

    def digest(self, rel: str, h: Any = None, size: int | None = None, bar: Any = None) -> str | None:
        """The hash (sha256 by default) of the regular file at ``rel``, read without following a link.

        None when it is anything else, or not ``size`` bytes long.
        """
        parent_fd, name = self._parent(rel, create=False)
        try:
            opened = self._open_existing(parent_fd, name) if parent_fd is not None else None
        except OSError:  # a link (ELOOP), or unreadable: not the file we want
            return None
        if opened is None:
            return None
        f, st = opened
        with f:
            if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
                return None
            h = hashlib.sha256() if h is None else h
            while block := f.read(1 << 20):
                h.update(block)
                if bar is not None:
                    bar.update(len(block))
            return str(h.hexdigest())

    def holds(self, rel: str, size: int, sha256: str) -> bool | None:
        """True if ``rel`` is exactly this file, False if nothing is there, None if something else is."""
        if self.lstat(rel) is None:
            return False
        return True if self.digest(rel, size=size) == sha256 else None

    # ------------------------------------------------------------ writing

    @staticmethod
    def partial_name(rel: str) -> str:
        """The partial file for ``rel`` in the work folder: one exact name per output name."""
        return hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".partial"

    def writer(self, rel: str, *, replace: bool = False, resumes: bool = True, reopen: bool = False) -> AtomicWriter:
        return AtomicWriter(self, rel, replace=replace, resumes=resumes, reopen=reopen)

    def write_bytes(self, rel: str, data: bytes, *, replace: bool = False) -> bool:
        """Write a small file; an identical one already there is kept (False).

        Any other file there is refused, unless ``replace`` (for a folder of
        ours, such as a delta in progress: see :func:`publish`).
        """
        there = self.holds(rel, len(data), hashlib.sha256(data).hexdigest())
        if there is None and not replace:
            raise _foreign(self.path / rel)
        if there:
            return False
        writer = self.writer(rel, replace=replace)
        with writer as f:
            f.write(data)
            writer.commit()
        return True

    def copy_in(
        self, rel: str, src: BinaryIO, size: int, where: Path, check: Callable[[str], None], *, replace: bool = False
    ) -> None:
        """Copy exactly ``size`` bytes of ``src`` to ``rel``; ``check(sha256)`` runs before the final name and may raise."""
        writer = self.writer(rel, replace=replace)
        with writer as f:
            check(sha256_exact(src, size, where, sink=f))
            writer.commit()

    def sweep(self, rels: list[str]) -> None:
        """Remove the partial files a killed run left for these output names, by exact name."""
        work = self.dir_fd(WORK_DIR, create=False)
        for rel in rels if work is not None else []:
            try:
                os.unlink(self.partial_name(rel), dir_fd=work)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------ our own files in the work folder

    def read(self, rel: str, cap: int) -> bytes | None:
        """A small file of ours in OUT (a state, a checksum manifest), refused beyond ``cap`` bytes; None if missing."""
        where = self.path / rel
        parent_fd, name = self._parent(rel, create=False)
        try:
            opened = self._open_existing(parent_fd, name) if parent_fd is not None else None
        except OSError as exc:
            raise OutputError(f"{where}: cannot read ({exc.strerror})", f"delete {where}") from None
        if opened is None:
            return None
        f, st = opened
        with f:
            if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
                raise OutputError(
                    f"{where}: not a file xorweights wrote (expected at most {cap} bytes, found {st.st_size})",
                    f"delete {where} and run the same command again",
                )
            return f.read(st.st_size)

    def read_work(self, name: str, cap: int) -> bytes | None:
        """One of our state files in the work folder; see :meth:`read`."""
        return self.read(f"{WORK_DIR}/{name}", cap)

    def write_work(self, name: str, data: bytes) -> None:
        """Replace one of our state files atomically (the work folder is ours: replacing is safe)."""
        writer = AtomicWriter(self, f"{WORK_DIR}/{name}", replace=True)
        with writer as f:
            f.write(data)
            writer.commit()

    def remove_work(self, names: list[str]) -> None:
        """Delete our own files by name, then the work folder if that left it empty."""
        work = self.dir_fd(WORK_DIR, create=False)
        for name in names if work is not None else []:
            try:
                os.unlink(name, dir_fd=work)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(WORK_DIR, dir_fd=self.fd)
            os.close(self._dirs.pop(WORK_DIR))
        except (OSError, KeyError):
            pass  # something else is in it: leave it

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AtomicWriter:
    """Writes ``rel`` below an :class:`OutputDir` through a partial file; see the module docstring.

    With ``reopen``, a partial file left by a killed or failed run is reopened
    as it is (``kept`` says so); while ``keep`` is set, one not committed is
    left for the next run. Decode reads back and checks what its state says is there.
    """

    def __init__(
        self, out: OutputDir, rel: str, *, replace: bool = False, resumes: bool = True, reopen: bool = False
    ) -> None:
        self.out = out
        self.rel = rel
        self.final = out.path / rel
        self.replace = replace
        self.resumes = resumes
        self.reopen = reopen
        self.kept = False
        self.keep = False
        self.partial = OutputDir.partial_name(rel)
        self.file: BinaryIO | None = None

    def _reopen(self) -> int | None:
        """The partial file a run before left, if it is a plain file of ours with one name; else None."""
        try:
            fd = os.open(self.partial, os.O_RDWR | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=self.out.work_fd)
        except OSError:
            return None  # missing, or a link planted at its name: _create replaces it
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return fd
        os.close(fd)
        return None

    def _create(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.partial, flags, 0o644, dir_fd=self.out.work_fd)
        except FileExistsError:
            # A killed run's partial, or something planted at its exact name in our own folder.
            os.unlink(self.partial, dir_fd=self.out.work_fd)
            return os.open(self.partial, flags, 0o644, dir_fd=self.out.work_fd)

    def __enter__(self) -> BinaryIO:
        try:
            self.parent_fd, self.name = self.out._parent(self.rel, create=True)
            fd = self._reopen() if self.reopen else None
            self.kept = fd is not None
            self.file = os.fdopen(fd if fd is not None else self._create(), "r+b" if self.kept else "wb")
        except OSError as exc:
            raise output_error(exc, self.final, resumes=self.resumes) from exc
        return self.file

    def commit(self) -> None:
        """Flush, fsync and give the file its final name (see :func:`publish`)."""
        assert self.file is not None and self.parent_fd is not None
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
            publish(self.out.work_fd, self.partial, self.parent_fd, self.name, self.final, replace=self.replace)
            os.fsync(self.parent_fd)
        except OSError as exc:
            raise output_error(exc, self.final, resumes=self.resumes) from exc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.file is not None:  # not committed: leave nothing behind, or only a partial to resume from
            self.file.close()
            self.file = None
            try:
                if not self.keep:
                    os.unlink(self.partial, dir_fd=self.out.work_fd)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError):
            raise output_error(exc, self.final, resumes=self.resumes) from exc


def write_file(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write a file the user named by its path, whole, through a partial beside it.

    The partial has a fresh random name (``O_EXCL | O_NOFOLLOW``), so nothing
    of the user's is ever opened, swept or deleted; the final rename replaces
    what is at ``path`` (a link there is replaced, not written through) unless
    ``replace`` is False, when an existing file is refused.
    """
    path = Path(path)
    try:
        dir_fd = os.open(path.parent if str(path.parent) else Path("."), _DIR_FLAGS)
    except OSError as exc:
        raise output_error(exc, path) from None
    partial = f".{path.name[:64]}.{secrets.token_hex(6)}.xorweights-partial"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            publish(dir_fd, partial, dir_fd, path.name, path, replace=replace)
            os.fsync(dir_fd)
        except BaseException:
            try:
                os.unlink(partial, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            raise
    except OSError as exc:
        raise output_error(exc, path) from None
    finally:
        os.close(dir_fd)
