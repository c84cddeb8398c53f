"""Read an input folder only where it really is: links stay inside, only regular files, sizes capped.

A delta is a download from a stranger, and a checkpoint folder may hold
anything. Every file xorweights reads below an input folder (a checkpoint, a
delta, a legacy payload) is opened here, so one rule holds for all of them:

- A symbolic link is followed only when it resolves inside the folder itself
  or, for a snapshot of the Hugging Face cache, inside that repo's
  ``blobs/`` (where huggingface_hub points every snapshot file). Anything
  else is refused, naming the link and where it leads, before a byte of it is
  read: a ``notes.txt -> ~/.ssh/id_rsa`` planted in a fine-tune would
  otherwise be published inside the delta.
- Only regular files are read: not FIFOs (an open would block), devices or
  folders. The file actually opened is checked through ``/proc/self/fd``, so
  a link swapped in between the check and the open is caught too.
- Sizes come from ``fstat`` of the opened file, and callers compare them with
  what a manifest declares before they copy or allocate anything; small
  metadata files (JSON, md5 lists) are read with a cap.

A folder the user names is trusted as named: a link in its own path is the
user's business. So is a single file named directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InputFileError, ManifestError

# huggingface_hub names a repo's cache folder by its kind: models--org--name, datasets--..., spaces--...
_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
_BLOCK = 1 << 20

LINK_HINT = "replace the link with the file itself; xorweights follows links only within the folder it reads"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _cache_blobs(real: Path) -> tuple[Path, ...]:
    """The repo's ``blobs/`` when ``real`` is a snapshot folder of the Hugging Face cache."""
    snapshots = real.parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith(_CACHE_REPO_PREFIXES):
        return (repo / "blobs",)
    return ()


def _opened_path(fd: int) -> Path | None:
    """Where an open file really is, from the kernel (Linux); None where that cannot be asked."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


class InputFolder:
    """An input folder (or a single input file) and the places its links may lead."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.real = Path(os.path.realpath(self.path))
        self.allowed = (self.real, *_cache_blobs(self.real))

    def contains(self, real: Path) -> bool:
        return any(real == a or a in real.parents for a in self.allowed)

    def resolve(self, path: Path) -> Path:
        """``path`` with every link resolved; refuses one that leads out of this folder."""
        real = Path(os.path.realpath(path))
        if not self.contains(real):
            raise InputFileError(f"{path}: a symbolic link to {real}, outside {self.path}; refused", LINK_HINT)
        return real

    def open(self, path: Path, *, cap: int | None = None) -> tuple[BinaryIO, int]:
        """Open a regular file below this folder for reading; return it and its size from ``fstat``.

        ``cap`` refuses a file larger than that many bytes before anything is read.
        Raises :class:`InputFileError` (FileNotFoundError for a missing file, so
        callers can say what is missing in their own words).
        """
        real = self.resolve(path)
        try:
            # O_NONBLOCK: opening a FIFO for reading would wait for a writer forever.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise InputFileError(
                f"{path}: cannot open ({exc.strerror})", "check the file and its permissions"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputFileError(
                    f"{path}: is {_kind(st.st_mode)}; xorweights reads only regular files",
                    "replace it with a regular file holding the data",
                )
            opened = _opened_path(fd)
            if opened is not None and not self.contains(opened):
                raise InputFileError(f"{path}: changed into a link to {opened} while being opened; refused", LINK_HINT)
            if cap is not None and st.st_size > cap:
                raise InputFileError(
                    f"{path}: {st.st_size} bytes, more than the {cap} allowed for this file",
                    "the file is damaged or hostile; re-download it",
                )
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb"), st.st_size

    def read(self, path: Path, cap: int) -> bytes:
        """The whole of a small file (JSON, an md5 list), refused beyond ``cap`` bytes."""
        f, size = self.open(path, cap=cap)
        with f:
            data = f.read(size + 1)  # not cap + 1: read(n) allocates n bytes up front
        if len(data) > cap:  # grew since fstat
            raise InputFileError(
                f"{path}: more than the {cap} bytes allowed for this file",
                "the file is damaged or hostile; re-download it",
            )
        return data

    def digest(self, path: Path) -> tuple[int, str]:
        """Size and sha256 of a regular file below this folder."""
        f, size = self.open(path)
        with f:
            return size, sha256_exact(f, size, path)


def sha256_exact(f: BinaryIO, size: int, where: Path, sink: BinaryIO | None = None) -> str:
    """sha256 of exactly ``size`` bytes of ``f``, copied to ``sink`` when given.

    A file that turns out shorter or longer than ``size`` (it changed, or
    ``fstat`` lied, as ``/proc`` files do) is refused: never more bytes than
    declared are read.
    """
    h = hashlib.sha256()
    left = size
    while left:
        block = f.read(min(_BLOCK, left))
        if not block:
            raise InputFileError(f"{where}: ended after {size - left} of its {size} bytes", "re-download it")
        h.update(block)
        if sink is not None:
            sink.write(block)
        left -= len(block)
    if f.read(1):
        raise InputFileError(f"{where}: holds more than its {size} bytes (it changed while read)", "re-download it")
    return h.hexdigest()


# JSON from a stranger (a manifest, an index, a state) is read whole into memory, so it is capped before a byte is
# parsed: at 64 MiB, and at 8 million JSON values. The second cap is the one
# that bounds memory: Python holds each value in 40-70 bytes however short its
# text (``[[],[],...]`` takes 20x its size as lists), so 8 million values stay
# under about 0.6 GB. Values are counted by the characters that introduce them
# (``,`` ``:`` ``[`` ``{``); ours have about 60 per tensor, headers included,
# so the caps hold about 130,000 tensors.
MAX_MANIFEST_BYTES = 64 << 20
MAX_MANIFEST_VALUES = 8_000_000


def load_json(text: str, where: str, cap: int = MAX_MANIFEST_BYTES) -> Any:
    """Parse JSON from a stranger, refusing text longer than ``cap`` or with more values than parse in bounded memory."""
    if len(text) > cap:
        raise ManifestError(
            f"{where}: {len(text)} characters, more than the {cap} allowed", "the file is damaged or hostile"
        )
    values = sum(text.count(c) for c in ",:[{")
    if values > MAX_MANIFEST_VALUES:
        raise ManifestError(
            f"{where}: about {values} JSON values, more than the {MAX_MANIFEST_VALUES} xorweights parses",
            "the file is damaged or hostile",
        )
    return json.loads(text)
