"""Where a delta's data files are read from: a local folder, or (see :mod:`xorweights.hub.ranges`) a Hub repo.

Decode and load read frames by ``(offset, length)`` and never care which.
A local file is opened through the :class:`InputFolder` gate and read with
``pread``; a remote one is fetched by HTTP range requests, ahead of the
reader, so the delta's data never lands on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DeltaCorruptError
from ..inputs import InputFolder
from .coding import LITERAL_XOR, NO_BASE
from .kernel import FrameCodec
from .manifest import open_delta_file


class DataFile(Protocol):
    """One data file of a delta, open for reading frames."""

    where: str  # how messages name it

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Exactly ``length`` bytes at ``offset``, or an error."""

    def refetch(self, offset: int, length: int) -> bytes | bytearray | memoryview | None:
        """A fresh copy of a frame that failed its checks; None where reading again cannot help."""

    def close(self) -> None: ...


class DeltaData(Protocol):
    """The data files of one delta."""

    remote: bool

    def check(self, name: str, size: int) -> None:
        """Refuse a missing data file, or one of another size, before any work starts (where that is cheap)."""

    def plan(self, spans: list[tuple[str, int, int]]) -> None:
        """The ``(file, offset, length)`` reads to come, in order, so they can be fetched ahead."""

    def open(self, name: str, size: int) -> DataFile: ...

    def fetched(self) -> int:
        """Bytes read from the network so far (0 for a local folder)."""

    def close(self) -> None:
        """Stop fetching ahead."""


class LocalFile:
    """A data file of a local delta folder, read with ``pread``."""

    def __init__(self, folder: InputFolder, path: Path, size: int) -> None:
        self.where = str(path)
        self._file = open_delta_file(folder, path, size)
        self._fd = self._file.fileno()

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def refetch(self, offset: int, length: int) -> None:
        return None  # the same bytes again: the first error stands

    def close(self) -> None:
        self._file.close()


class LocalData:
    """The data files of a delta folder on disk (or in the Hugging Face cache)."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = InputFolder(self.root)

    def check(self, name: str, size: int) -> None:
        open_delta_file(self.folder, self.root / name, size).close()

    def plan(self, spans: list[tuple[str, int, int]]) -> None:
        pass  # the page cache reads ahead

    def open(self, name: str, size: int) -> LocalFile:
        return LocalFile(self.folder, self.root / name, size)

    def fetched(self) -> int:
        return 0

    def close(self) -> None:
        pass


def decode_frame(
    codec: FrameCodec,
    data: DataFile,
    src: int,
    stored: int,
    width: int,
    out: np.ndarray,
    where: str,
    base: np.ndarray = NO_BASE,
    coding: str = LITERAL_XOR,
) -> None:
    """Read the frame stored at ``src`` and decode it into ``out`` (see :meth:`FrameCodec.decode`).

    A frame that fails its checks is read once more where that can help (a
    download may have gone wrong on the way); failing again, it is refused.
    """
    try:
        codec.decode(data.read(src, stored), width, out, where, base, coding)
    except DeltaCorruptError as exc:
        again = data.refetch(src, stored)
        if again is None:
            raise
        try:
            codec.decode(again, width, out, where, base, coding)
        except DeltaCorruptError:
            raise DeltaCorruptError(
                f"{exc.message} (downloaded twice)", "the delta on the Hub is damaged; tell its owner"
            ) from None
