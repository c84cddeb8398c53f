"""Decode releases made with OpenAssistant's whole-file ``xor_codec.py``, and migrate them.

That codec XORs every top-level file of the payload folder with the base file
of the same name, whole file, byte for byte:

- where the base is shorter, it is padded with zero bytes, so the payload's
  bytes past the end of the base are the fine-tune's bytes in the clear;
- where the base is longer, only its first ``len(payload)`` bytes are used;
- a gzip payload (made with ``--compress``) is XORed as its decompressed stream;
- a payload file with no counterpart in the base (``added_tokens.json``) is
  copied as it is; the codec printed a warning for it that users were told to expect.

The codec checked nothing. Its releases came with md5 lists, committed under
``checksums/NAME/`` in this repository: ``NAME.md5`` for the decoded output
and one list of the base files the payload is XORed with. :func:`decode_legacy`
hashes every base file and every output file on the way through the decode,
as their bytes pass through memory, and gives an output file its final name
only once its base file and it match their lists. Because the XOR is
whole-file, only a base that is identical byte for byte decodes: the same
tensors pickled by another library version do not. :func:`migrate` turns such
a release into a per-tensor delta once, so that downloaders need only the
same tensors.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import queue
import re
import shutil
import stat
import threading
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Literal, cast

import numpy as np
from tqdm import tqdm

from .delta.kernel import xor_into
from .delta.manifest import MANIFEST_NAME
from .encode import EncodeResult, encode
from .errors import BaseMismatchError, InputFileError, OutputError, UsageError, VerifyFailed
from .exposure import DEFAULT_MAX_UNPROTECTED_PCT
from .inputs import InputFolder
from .locks import FolderLock
from .outdir import WORK_DIR, OutputDir, start_writeback
from .overlap import refuse_overlap
from .progress import byte_bar


def _checksums_dir() -> Path:
    """The published lists: checksums/ in a source checkout, their packaged copy in an installed wheel."""
    source = Path(__file__).resolve().parents[1] / "checksums"
    return source if source.is_dir() else Path(__file__).resolve().parent / "published_checksums"


CHECKSUMS_DIR = _checksums_dir()
DEFAULT_CHUNK_BYTES = 16 << 20
MAX_MD5_LIST_BYTES = 1 << 20  # ~10,000 lines; a release's lists have a few dozen
# gzip's magic number plus its only compression method (deflate). The third
# byte makes a false match on a plain payload, whose first bytes are the XOR of
# two files of the same kind (and so mostly zero), even less likely.
GZIP_MAGIC = b"\x1f\x8b\x08"
_MD5_LINE = re.compile(r"^(?P<md5>[0-9a-fA-F]{32}) [ *](?P<name>.+)$")


# ------------------------------------------------------------------ md5 lists


@dataclass(frozen=True)
class Md5List:
    """An md5sum-format list: ``<md5>  <name>`` per line."""

    path: Path
    sums: dict[str, str]

    @property
    def label(self) -> str:
        """How messages name the list: relative to the repository when it is one of ours."""
        try:
            return self.path.resolve().relative_to(CHECKSUMS_DIR.parent).as_posix()
        except ValueError:
            return str(self.path)


def read_md5_list(path: str | Path) -> Md5List:
    """Parse an md5sum-format file; blank lines and ``#`` comments are skipped.

    A leading ``./`` is dropped from names: ``md5sum ./*`` writes them so, and
    files are matched by their name in the folder.
    """
    path = Path(path)
    try:
        text = InputFolder(path).read(path, MAX_MD5_LIST_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such md5 list", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read the md5 list ({exc})") from None
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _MD5_LINE.match(line.rstrip("\r"))
        if m is None:
            raise InputFileError(
                f"{path}: line {number} is not '<md5>  <name>'", "give a list in the format `md5sum` writes"
            )
        sums[m["name"].removeprefix("./")] = m["md5"].lower()
    if not sums:
        raise InputFileError(f"{path}: the md5 list names no files", "give a list in the format `md5sum` writes")
    return Md5List(path, sums)


def published_releases() -> list[str]:
    """Names of the folders under ``checksums/`` that hold a legacy release's lists."""
    if not CHECKSUMS_DIR.is_dir():
        return []
    return sorted(d.name for d in CHECKSUMS_DIR.iterdir() if (d / f"{d.name}.md5").is_file())


def published_lists(name: str) -> tuple[Md5List, Md5List]:
    """The (base, output) md5 lists of the release ``checksums/NAME``.

    The output list is ``NAME.md5``. The base list is the other list in the
    folder that shares the most file names with it: the payload is XORed with
    base files of the same names (a list of some other input, such as Meta's
    ``consolidated.*.pth``, shares none).
    """
    folder = CHECKSUMS_DIR / name
    if name not in published_releases():
        known = ", ".join(published_releases()) or f"none: {CHECKSUMS_DIR} is missing"
        raise UsageError(
            f"--checksums {name}: no such release under {CHECKSUMS_DIR}",
            f"use one of: {known}; or pass --base-md5 FILE and --out-md5 FILE",
        )
    out = read_md5_list(folder / f"{name}.md5")
    others = [read_md5_list(p) for p in sorted(folder.glob("*.md5")) if p.name != f"{name}.md5"]
    ranked = sorted(others, key=lambda lst: len(lst.sums.keys() & out.sums.keys()), reverse=True)
    if not ranked or not ranked[0].sums.keys() & out.sums.keys():
        raise InputFileError(
            f"{folder}: holds no md5 list of the base files (one that shares file names with {out.path.name})",
            "add the published md5 list of the base to that folder, or pass --base-md5 FILE",
        )
    return ranked[0], out


def detect_release(payload_names: Iterable[str]) -> str | None:
    """The release under ``checksums/`` whose output list names only files the payload holds.

    Every decoded file comes from the payload file of the same name, so the
    payload of a release holds every name of its output list (and maybe a
    README or .gitattributes besides).
    """
    names = set(payload_names)
    found = [r for r in published_releases() if read_md5_list(CHECKSUMS_DIR / r / f"{r}.md5").sums.keys() <= names]
    if len(found) > 1:
        raise UsageError(
            f"the payload's files match the md5 lists of several releases: {', '.join(found)}",
            "choose one with --checksums NAME",
        )
    return found[0] if found else None


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class LegacyFile:
    """One output file: which payload file, XORed with which base file, and what md5 it must have."""

    name: str
    payload: Path
    base: Path | None  # None: no counterpart in the base, copied as is
    gzip: bool  # XOR the decompressed stream of the payload
    expected_md5: str | None
    base_md5: str | None = None  # the base file's published md5: hashed whole while decoding, checked before commit


@dataclass
class LegacyResult:
    out: Path
    release: str | None  # the folder under checksums/ used, if any
    base_list: str | None  # label of the md5 list the base was checked against
    out_list: str | None  # label of the md5 list the output was checked against
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in OUT with the published md5 (resume)
    copied: list[str] = field(default_factory=list)  # no counterpart in the base: copied as is
    ignored: list[str] = field(default_factory=list)  # subfolders of the payload, which the codec never read
    base_checked: list[str] = field(default_factory=list)  # base files that match their published md5
    unchecked: list[str] = field(default_factory=list)  # written files that no output list names
    payload_bytes: int = 0  # the whole payload on disk
    warnings: list[str] = field(default_factory=list)


def _starts_like_gzip(folder: InputFolder, path: Path) -> bool:
    """Whether a file below ``folder`` starts like gzip; refuses a link out of ``folder`` or a non-regular file."""
    f, _ = folder.open(path)
    with f:
        return f.read(len(GZIP_MAGIC)) == GZIP_MAGIC


def plan_legacy(payload: Path, base: Path, out_list: Md5List | None) -> tuple[list[LegacyFile], list[str]]:
    """Every top-level file of ``payload`` as a :class:`LegacyFile`; also the names of skipped subfolders.

    Payload and base files are read only through :class:`InputFolder`: a link
    leading out of its folder, or anything but a regular file, is refused.
    """
    if not payload.is_dir():
        raise InputFileError(f"{payload}: no such folder", "point at the folder of the release's XOR files")
    if not base.is_dir():
        raise InputFileError(f"{base}: no such folder", "point at the folder of the base files the release needs")
    payload_in, base_in = InputFolder(payload), InputFolder(base)
    files, ignored = [], []
    for p in sorted(payload.iterdir()):
        if p.is_dir() and not p.is_symlink():
            ignored.append(p.name)
            continue
        if p.name == WORK_DIR:
            raise InputFileError(
                f"{p}: has the name of xorweights' own work folder, so it cannot be decoded into OUT",
                "rename it in the payload; the legacy codec gives files no meaning by name",
            )
        gzipped = _starts_like_gzip(payload_in, p)
        counterpart = base / p.name
        if counterpart.is_dir():
            raise InputFileError(
                f"{counterpart}: is a folder, but the payload holds a file {p.name} to XOR with it",
                "point --base at the folder of the base files the release needs",
            )
        expected = out_list.sums.get(p.name) if out_list else None
        if counterpart.exists() or counterpart.is_symlink():
            _starts_like_gzip(base_in, counterpart)  # the same checks for the base file
            files.append(LegacyFile(p.name, p, counterpart, gzipped, expected))
        else:  # copied byte for byte, as the codec copied added_tokens.json, even if it looks like gzip
            files.append(LegacyFile(p.name, p, None, False, expected))
    if not files:
        raise InputFileError(f"{payload}: holds no files", "point at the folder of the release's XOR files")
    if out_list is not None:
        missing = sorted(out_list.sums.keys() - {f.name for f in files})
        if missing:
            raise InputFileError(
                f"{payload}: lacks {', '.join(missing)}, which {out_list.label} lists",
                "download every XOR file of the release into that folder",
            )
    return files, ignored


def _lists(
    payload_names: list[str], checksums: str | None, base_md5: str | Path | None, out_md5: str | Path | None
) -> tuple[str | None, Md5List | None, Md5List | None]:
    """(release name, base list, output list) from the options, or found by the payload's file names."""
    if checksums is not None and (base_md5 is not None or out_md5 is not None):
        raise UsageError("--checksums cannot be combined with --base-md5 or --out-md5", "pass one or the other")
    if base_md5 is not None or out_md5 is not None:
        return (
            None,
            read_md5_list(base_md5) if base_md5 is not None else None,
            read_md5_list(out_md5) if out_md5 is not None else None,
        )
    release = checksums or detect_release(payload_names)
    if release is None:
        return None, None, None
    base_list, out_list = published_lists(release)
    return release, base_list, out_list


# ------------------------------------------------------------------ bytes


def _read_full(f: io.BufferedIOBase, buf: np.ndarray) -> int:
    """Fill ``buf`` from ``f``; fewer bytes only at the end of the stream."""
    view = memoryview(buf)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def md5_file(folder: InputFolder, path: Path, bar: tqdm | None = None) -> str:
    """md5 of a regular file below ``folder`` (links checked)."""
    h = hashlib.md5(usedforsecurity=False)
    f, _ = folder.open(path)
    with f:
        while block := f.read(1 << 20):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    return h.hexdigest()


# A gzip payload decompresses to the fine-tune's file, which is its base file
# plus what fine-tuning added: a few vocabulary rows in an embedding shard (16
# rows of LLaMA-65B are 0.5 MB), a longer tokenizer or config. An eighth more
# than the base, and at least 64 MiB for small files, covers that many times
# over. The compression ratio cannot tell a bomb from a real payload: an
# unchanged file XORs to zeros, which deflate shrinks 1000:1 just like a bomb.
GUNZIP_MARGIN_BYTES = 64 << 20


def gunzip_limit(base_bytes: int) -> int:
    """The most bytes a gzip payload may decompress to when XORed with a base file of ``base_bytes``."""
    return base_bytes + max(base_bytes // 8, GUNZIP_MARGIN_BYTES)


def _gunzip_too_big(job: LegacyFile, limit: int, base_bytes: int) -> InputFileError:
    return InputFileError(
        f"{job.payload}: decompresses past {limit} bytes, more than its base file {job.base} "
        f"of {base_bytes} bytes allows",
        "re-download this XOR file",
    )


@dataclass(frozen=True)
class Digests:
    """What one pass over a payload file learnt: the md5 of the decoded bytes, and of the whole base file."""

    out: str
    base: str | None  # None unless the job asked for it (``LegacyFile.base_md5``)


# Payload buffers in flight: one being filled by the reader, one queued, one
# being hashed and written. Two would already overlap the threads; the third
# absorbs a slow read or write without stalling the other side. With the
# reader's one base buffer, a decode holds SLOTS + 1 chunks whatever the file size.
SLOTS = 3


class _Reader:
    """Reads, hashes the base and XORs on its own thread, ahead of the thread that hashes and writes.

    The work splits in two because each half is one md5 stream: hashlib,
    numpy and file reads release the GIL, so on two cores the base's md5 and
    the output's md5 run side by side instead of one after the other. Items
    go to the consumer in order; an error is one of them, so whatever was
    read before it is still written, and nothing after it is.
    """

    def __init__(
        self, job: LegacyFile, raw: BinaryIO, base: BinaryIO | None, base_bytes: int, chunk_bytes: int
    ) -> None:
        # InputFolder.open gives os.fdopen(fd, "rb"): buffered readers, whose readinto fills a buffer in place.
        self.job = job
        self.raw = cast(io.BufferedReader, raw)
        self.base = cast(io.BufferedReader | None, base)
        self.base_bytes = base_bytes
        self.base_md5 = hashlib.md5(usedforsecurity=False) if base is not None and job.base_md5 else None
        self.key = np.empty(chunk_bytes if base is not None else 0, dtype=np.uint8)
        self.free: queue.Queue[np.ndarray | None] = queue.Queue()
        for _ in range(SLOTS):
            self.free.put(_aligned(chunk_bytes))  # written from directly: see _Output
        # (buffer, bytes in it, payload bytes read so far), an error, or None once the base is hashed to its end.
        # Unbounded, yet never longer than SLOTS: only that many buffers exist.
        self.full: queue.Queue[tuple[np.ndarray, int, int] | BaseException | None] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"decode-legacy {job.name}", daemon=True)

    def __enter__(self) -> _Reader:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # The files close once this returns: the reader must be done with them first.
        self.stop.set()
        self.free.put(None)
        self.thread.join()

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        """Each decoded chunk with the payload bytes read so far; the buffer goes back once the next is asked for."""
        while True:
            item = self.full.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            buf, n, consumed = item
            yield buf[:n], consumed
            self.free.put(buf)

    def _run(self) -> None:
        try:
            self._decode()
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self.full.put(exc)

    def _decode(self) -> None:
        job = self.job
        src: io.BufferedIOBase = gzip.GzipFile(fileobj=self.raw, mode="rb") if job.gzip else self.raw
        # A plain payload writes its own size; only a decompressed one needs a bound from a real size.
        limit = gunzip_limit(self.base_bytes) if job.gzip else None
        base, written = self.base, 0
        try:
            while True:
                buf = self.free.get()
                if buf is None or self.stop.is_set():
                    return  # the consumer stopped
                n = _read_full(src, buf)
                if not n:
                    break
                if limit is not None and written + n > limit:
                    raise _gunzip_too_big(job, limit, self.base_bytes)
                written += n
                if base is not None:
                    key = self.key[:n]
                    m = _read_full(base, key)
                    if self.base_md5 is not None:
                        self.base_md5.update(key[:m])
                    xor_into(buf[:n], key[:m])
                    if m < n:
                        base = None  # past its end the base counts as zeros: payload bytes pass unchanged
                self.full.put((buf, n, self.raw.tell()))
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise InputFileError(
                f"{job.payload}: starts like gzip but does not decompress ({exc})", "re-download this XOR file"
            ) from None
        finally:
            if src is not self.raw:
                src.close()  # the gzip reader only; the payload file is closed by xor_file
        if base is not None and self.base_md5 is not None:
            # A base longer than the payload: the bytes the XOR never used still count in the file's md5.
            while (m := _read_full(base, self.key)) and not self.stop.is_set():
                self.base_md5.update(self.key[:m])
        self.full.put(None)


# O_DIRECT wants the buffer's address, the file offset and the length in
# multiples of the device's logical block size; 4096 is a multiple of every common one.
DIRECT_ALIGN = 4096


def _aligned(n: int) -> np.ndarray:
    """``n`` uninitialised bytes starting at a multiple of DIRECT_ALIGN."""
    raw = np.empty(n + DIRECT_ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % DIRECT_ALIGN
    return raw[skip : skip + n]


def _fd_of(dst: BinaryIO) -> int | None:
    """The file descriptor behind ``dst``; None for a sink in memory."""
    try:
        return dst.fileno()
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        return None


class _Output:
    """Where the decoded chunks go: the file's descriptor, with O_DIRECT where the file system takes it.

    Through the page cache, each byte written is copied into a freshly
    allocated cache page: 2 to 3.6 s of CPU per GB on the 2-core VM of the
    benchmark, as much as hashing it, and taken from the threads that hash.
    With O_DIRECT the disk reads our aligned buffer itself (0.06 s of CPU per
    GB there), and the write waits for the disk with the GIL released while
    the reader works on. Whole chunks go direct; the short last one, or any
    write the file system refuses direct (EINVAL), goes through the page
    cache, with its writeback started at once. A sink without a descriptor
    gets plain ``write`` calls.
    """

    def __init__(self, dst: BinaryIO, chunk_bytes: int) -> None:
        self.dst = dst
        self.fd = _fd_of(dst)
        self.offset = 0
        self.flags: int | None = None  # the descriptor's own flags while O_DIRECT is added to them
        if self.fd is not None:
            dst.flush()  # from here on, bytes go to the descriptor itself
            if chunk_bytes % DIRECT_ALIGN == 0 and hasattr(os, "O_DIRECT"):
                import fcntl  # POSIX only, as O_DIRECT (Linux) is: never imported on Windows

                try:
                    flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT)
                    self.flags = flags
                except OSError:
                    pass  # not on this file system: the page cache it is

    def _buffered(self) -> None:
        if self.fd is not None and self.flags is not None:
            import fcntl

            fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
            self.flags = None

    def write(self, chunk: np.ndarray) -> None:
        if self.fd is None:
            self.dst.write(chunk)
            return
        if len(chunk) % DIRECT_ALIGN:
            self._buffered()  # only the last chunk is short
        view = memoryview(chunk)
        while view:
            try:
                done = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or self.flags is None:
                    raise
                self._buffered()  # O_DIRECT accepted, yet not this write: same bytes, through the page cache
                continue
            if done % DIRECT_ALIGN:
                self._buffered()  # a short write leaves the next offset unaligned
            view = view[done:]
        if self.flags is None:
            start_writeback(self.fd, self.offset, len(chunk))
        self.offset += len(chunk)

    def close(self) -> None:
        """Give the descriptor back with its own flags."""
        self._buffered()


def xor_file(job: LegacyFile, dst: BinaryIO, chunk_bytes: int, bar: tqdm | None = None) -> Digests:
    """Write the payload XOR the base (zero-padded or truncated to the payload's length) to ``dst``.

    Returns the md5 of what was written and, when ``job.base_md5`` is set, the
    md5 of the whole base file, taken from the same read: no file is read
    twice. Payload and base are opened through :class:`InputFolder`. Reading
    and XOR run on a second thread, overlapped with hashing and writing here;
    memory stays at ``SLOTS + 1`` buffers of ``chunk_bytes`` whatever the file
    size. The bytes go to ``dst``'s descriptor, direct to the disk where the
    file system allows (see :class:`_Output`), or to ``dst.write`` when it has
    none. A gzip payload is refused with :class:`InputFileError` before it
    writes more than :func:`gunzip_limit` of its base file's size.
    """
    md5 = hashlib.md5(usedforsecurity=False)
    with ExitStack() as stack:
        raw, _ = InputFolder(job.payload.parent).open(job.payload)
        stack.enter_context(raw)
        base: BinaryIO | None = None
        base_bytes = 0
        if job.base is not None:
            base, base_bytes = InputFolder(job.base.parent).open(job.base)
            stack.enter_context(base)
        output = _Output(dst, chunk_bytes)
        stack.callback(output.close)
        reader = stack.enter_context(_Reader(job, raw, base, base_bytes, chunk_bytes))
        consumed = 0
        for chunk, read in reader:
            md5.update(chunk)
            output.write(chunk)
            if bar is not None:
                bar.update(read - consumed)
                consumed = read
        base_md5 = reader.base_md5.hexdigest() if reader.base_md5 is not None else None
    return Digests(md5.hexdigest(), base_md5)


# ------------------------------------------------------------------ decode


def decode_legacy(
    payload: str | Path,
    base: str | Path,
    out: str | Path,
    base_md5: str | Path | None = None,
    out_md5: str | Path | None = None,
    *,
    checksums: str | None = None,
    check: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
) -> LegacyResult:
    """Decode a release made with OpenAssistant's whole-file ``xor_codec.py`` into ``out``.

    The md5 lists come from ``checksums`` (a folder under ``checksums/``), from
    ``base_md5``/``out_md5`` (md5sum-format files), or, when none is given,
    from the release under ``checksums/`` whose output list the payload's file
    names cover. With ``check`` (the default) a base list is required and every
    base file the payload is XORed with must match it, or
    :class:`BaseMismatchError` names them all. A base file that is missing or
    that the list does not name is refused before anything is written; the md5
    of the others is taken during the decode, from the bytes it reads anyway.
    Each output file is written through a partial file and gets its final name
    only if its base file matched the base list and it matches the output list
    (:class:`VerifyFailed` names the others); at the first base file that
    differs, the remaining ones are hashed so that the error names them all,
    and nothing decoded from a differing base is kept. Files already in
    ``out`` with their published md5 are skipped, so a second run resumes.
    ``chunk_bytes`` bounds the memory: ``SLOTS + 1`` buffers of that size.
    """
    payload, base, out = Path(payload), Path(base), Path(out)
    if chunk_bytes < 1:
        raise UsageError(f"chunk size {chunk_bytes}: must be at least 1 byte")
    refuse_overlap(out, {"payload": payload, "base": base})
    if not payload.is_dir():
        raise InputFileError(f"{payload}: no such folder", "point at the folder of the release's XOR files")
    release, base_list, out_list = _lists(_names(payload), checksums, base_md5, out_md5)
    if check and base_list is None:
        why = "" if out_md5 is not None else f", and no release under {CHECKSUMS_DIR} matches the payload's file names"
        raise UsageError(
            f"{payload}: no md5 list of the base files to check them against{why}",
            "pass --checksums NAME or --base-md5 FILE [--out-md5 FILE]; or --no-check to decode without checking the base",
        )
    files, ignored = plan_legacy(payload, base, out_list)
    result = LegacyResult(
        out,
        release,
        base_list.label if base_list else None,
        out_list.label if out_list else None,
        ignored=ignored,
        payload_bytes=sum(f.payload.stat().st_size for f in files),
    )
    done = _already_done(out, files, progress)
    pending = [f for f in files if f.name not in done]
    if check:
        assert base_list is not None
        result.base_checked = _base_to_check(base, base_list, pending, progress)
        # No pass of its own: each base file is hashed by the decode that reads it anyway.
        files = [replace(f, base_md5=base_list.sums[f.name]) if f.name in result.base_checked else f for f in files]
    else:
        result.warnings.append("the base files were not checked (--no-check)")
    if out_list is None:
        result.warnings.append("no md5 list of the output: the decoded files were not checked")
    for name in ignored:
        result.warnings.append(f"{name}/: a subfolder of the payload; the legacy codec decodes top-level files only")

    mismatched: list[str] = []
    with OutputDir(out) as od, FolderLock(od):
        refuse_overlap(out, {"payload": payload, "base": base})  # again, now that it exists
        bar = byte_bar(sum(f.payload.stat().st_size for f in pending), "decode-legacy", progress)
        for i, job in enumerate(files):
            if job.name in done:
                result.skipped.append(job.name)
                continue
            outcome = _write_one(job, od, chunk_bytes, bar, resumes=out_list is not None)
            if outcome == "base differs":
                bar.close()
                assert base_list is not None
                # Name every base file that differs, as a check before decoding would: the rest are hashed now.
                later = [f.name for f in files[i + 1 :] if f.base_md5 is not None]
                differ = [job.name, *_differing(base, base_list, later, progress)]
                raise _base_mismatch(base, base_list, len(result.base_checked), differ)
            if outcome == "written":
                result.written.append(job.name)
            else:
                mismatched.append(job.name)
        bar.close()
        od.sweep([f.name for f in files])
    result.copied = [f.name for f in files if f.base is None and f.name in result.written]
    for name in result.copied:
        result.warnings.append(
            f"{name}: no counterpart in the base, copied as is (the release's own decoder warns too)"
        )
    result.unchecked = [f.name for f in files if f.expected_md5 is None and f.name in result.written]
    if out_list is not None and result.unchecked:
        result.warnings.append(f"not in {out_list.label}, so not checked: {', '.join(result.unchecked)}")
    if mismatched:
        assert out_list is not None
        why = (
            "your base files are not the exact ones the release was made from; run without --no-check to see which"
            if not check
            else "the base matched its list, so these XOR files are damaged; re-download them"
        )
        raise VerifyFailed(
            f"{out}: {len(mismatched)} decoded file(s) differ from {out_list.label}: {', '.join(mismatched)}; "
            "they were not kept",
            why,
        )
    return result


def _already_done(out: Path, files: list[LegacyFile], progress: bool) -> set[str]:
    """Names already in ``out`` with their published md5; anything else under an output name is refused.

    Looked at through the held folder without following links: a link under
    an output name is refused, never read through or vouched for.
    """
    if not out.is_dir():
        return set()
    done = set()
    with OutputDir(out) as od:
        present = []
        for job in files:
            st = od.lstat(job.name)
            if st is None:
                continue
            if job.expected_md5 is None or not stat.S_ISREG(st.st_mode):
                raise _foreign(out / job.name)
            present.append((job, st.st_size))
        bar = byte_bar(sum(size for _, size in present), "check existing", progress)
        for job, _ in present:
            if od.digest(job.name, hashlib.md5(usedforsecurity=False), bar=bar) != job.expected_md5:
                raise _foreign(out / job.name)
            done.add(job.name)
        bar.close()
    return done


def _foreign(final: Path) -> OutputError:
    return OutputError(
        f"{final}: already exists and is not the published decoded file",
        "decode into a new, empty folder, or remove that file",
    )


def _base_to_check(base: Path, base_list: Md5List, files: list[LegacyFile], progress: bool) -> list[str]:
    """The base files to hash during the decode; refuses, before any is read, a list that cannot check them all.

    A base file the list does not name would go unchecked: that is refused
    (UsageError), naming every such file, never skipped in silence. A listed
    base file that is missing is refused too (BaseMismatchError); that error
    also names every present file that differs, so they are hashed first.
    """
    xored = [f.name for f in files if f.base is not None]
    unlisted = [n for n in xored if n not in base_list.sums]
    if unlisted:
        which = "any" if len(unlisted) == len(xored) else f"{len(unlisted)}"
        raise UsageError(
            f"{base_list.label}: does not name {which} of the {len(xored)} base files the payload is XORed with, "
            f"so they cannot be checked: {', '.join(unlisted)}",
            "pass the md5 list of exactly these base files (run `md5sum *` in the base folder), "
            "or --no-check to decode without checking the base",
        )
    needed = [f.name for f in files if f.name in base_list.sums]
    present = [n for n in needed if (base / n).is_file()]
    missing = [n for n in needed if n not in present]
    if missing:
        differ = _differing(base, base_list, present, progress)
        raise _base_mismatch(base, base_list, len(needed), differ + [f"{n} (missing)" for n in missing])
    return present


def _differing(base: Path, base_list: Md5List, names: list[str], progress: bool) -> list[str]:
    """Those of ``names`` whose base file differs from the list: a pass of its own, only to name them in an error."""
    bar = byte_bar(sum((base / n).stat().st_size for n in names), "check base", progress)
    base_in = InputFolder(base)
    differ = [n for n in names if md5_file(base_in, base / n, bar) != base_list.sums[n]]
    bar.close()
    return differ


def _base_mismatch(base: Path, base_list: Md5List, needed: int, names: list[str]) -> BaseMismatchError:
    return BaseMismatchError(
        f"{base}: {len(names)} of {needed} base files differ from the published list {base_list.label}: "
        f"{', '.join(names)}; a whole-file XOR release decodes only from these exact files, byte for byte",
        "a per-tensor delta made once with `xorweights migrate` by anyone who holds the exact files removes "
        "this need: it asks only for the same tensors, not the same file bytes",
    )


def _write_one(
    job: LegacyFile, out: OutputDir, chunk_bytes: int, bar: tqdm, *, resumes: bool
) -> Literal["written", "base differs", "output differs"]:
    """Decode one file; give it its final name only if its base file and it have their expected md5s."""
    writer = out.writer(job.name, resumes=resumes)
    with writer as dst:  # leaving the block uncommitted removes the partial file
        digests = xor_file(job, dst, chunk_bytes, bar)
        if job.base_md5 is not None and digests.base != job.base_md5:
            return "base differs"  # first: decoded from a wrong base, the output cannot be right either
        if job.expected_md5 is not None and digests.out != job.expected_md5:
            return "output differs"
        writer.commit()
    return "written"


# ------------------------------------------------------------------ migrate


@dataclass
class MigrateResult:
    delta: Path
    legacy: LegacyResult
    encoded: EncodeResult

    @property
    def legacy_bytes(self) -> int:
        return self.legacy.payload_bytes

    @property
    def delta_bytes(self) -> int:
        return self.encoded.delta_bytes

    @property
    def saved_bytes(self) -> int:
        return self.legacy_bytes - self.delta_bytes


def decoded_folder(delta: Path) -> Path:
    """Where migrate decodes the legacy release: hidden, beside the delta, kept for resume until encode ends."""
    return delta.parent / f".{delta.name}.legacy-decoded"


def migrate(
    payload: str | Path,
    base: str | Path,
    out: str | Path,
    base_md5: str | Path | None = None,
    out_md5: str | Path | None = None,
    *,
    checksums: str | None = None,
    check: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compress: bool = True,
    base_description: str = "",
    base_repo_id: str | None = None,
    base_revision: str | None = None,
    max_unprotected: float = DEFAULT_MAX_UNPROTECTED_PCT,
    allow_unprotected: bool = False,
    progress: bool = False,
    jobs: int | None = None,
) -> MigrateResult:
    """Turn a whole-file XOR release into a per-tensor delta ``out`` against the same ``base``.

    Decodes with :func:`decode_legacy` (same checks) into :func:`decoded_folder`
    beside ``out``, then runs :func:`xorweights.encode` on it. The decoded
    folder is removed once the delta is finished; after an interruption it is
    kept and a second run resumes from it (it is started afresh when there is
    no output list to tell finished files apart).
    """
    payload, base, delta = Path(payload), Path(base), Path(out)
    refuse_overlap(delta, {"payload": payload, "base": base})
    if (delta / MANIFEST_NAME).exists():
        raise OutputError(
            f"{delta}: already holds a finished delta", "choose a new output folder or remove the old delta"
        )
    work = decoded_folder(delta)
    refuse_overlap(work, {"payload": payload, "base": base})
    fresh = _lists(_names(payload), checksums, base_md5, out_md5)[2] is None
    _scratch_folder(work, fresh)  # no output list to tell finished files from foreign ones: start afresh
    legacy = decode_legacy(
        payload,
        base,
        work,
        base_md5,
        out_md5,
        checksums=checksums,
        check=check,
        chunk_bytes=chunk_bytes,
        progress=progress,
    )
    if not base_description and legacy.base_list:
        base_description = f"the base of the whole-file XOR release: the files listed in {legacy.base_list}"
    encoded = encode(
        work,
        base,
        delta,
        compress=compress,
        base_description=base_description,
        base_repo_id=base_repo_id,
        base_revision=base_revision,
        progress=progress,
        jobs=jobs,
        max_unprotected=max_unprotected,
        allow_unprotected=allow_unprotected,
    )
    shutil.rmtree(work, ignore_errors=True)
    return MigrateResult(delta, legacy, encoded)


def _scratch_folder(work: Path, fresh: bool) -> None:
    """Make migrate's scratch folder, or take up our own from an interrupted run; never a link planted at its name.

    A folder of ours holds xorweights' work folder (decode-legacy's lock). It
    is removed first when ``fresh``; anything else at that name is refused.
    """

    def is_folder(path: Path) -> bool | None:
        try:
            return stat.S_ISDIR(os.lstat(path).st_mode)
        except FileNotFoundError:
            return None

    if is_folder(work) is not None:
        if not (is_folder(work) and is_folder(work / WORK_DIR)):
            raise OutputError(
                f"{work}: migrate's scratch folder already exists and was not made by xorweights",
                "remove it, or write the delta somewhere else",
            )
        if not fresh:
            return
        shutil.rmtree(work)  # fd-based on Linux: never follows a link inside
    try:
        os.mkdir(work, 0o700)  # fails on anything, a link included, that appeared at the name
        os.mkdir(work / WORK_DIR)  # marks it as ours from the start
    except OSError as exc:
        raise OutputError(f"{work}: cannot create migrate's scratch folder ({exc.strerror})") from None


def _names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
