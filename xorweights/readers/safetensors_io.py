"""Safetensors headers: parse and validate, map the raw bytes, build new headers.

We never hand the data to a framework: a tensor is a byte range of a
memory-mapped file, read as ``uint8``. That keeps bf16 readable without torch
and lets callers page through a 4 GB tensor chunk by chunk.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from ..errors import CheckpointError, InputFileError
from ..inputs import InputFolder
from .dtypes import ITEMSIZE, tensor_nbytes, unsupported

MAX_HEADER_BYTES = 100 * 1024 * 1024
_ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_header(header: bytes, data_size: int, where: str) -> tuple[list[TensorInfo], dict[str, str]]:
    """Validate a header and return its tensors in data order, and its metadata.

    ``where`` names the file in error messages. The data section must be
    covered exactly, without gaps or overlaps, as the official library demands.
    """

    def bad(what: str) -> InputFileError:
        return InputFileError(
            f"{where}: not a valid safetensors file: {what}",
            "the file is damaged or was not written by safetensors; re-download it",
        )

    try:
        obj = json.loads(header.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except RecursionError:
        raise bad("header nests JSON too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise bad("header is not a JSON object")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    tensors: list[TensorInfo] = []
    for name, entry in obj.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if isinstance(dtype, str) and unsupported(dtype):
            raise CheckpointError(
                f"{where}: tensor {name!r}: {unsupported(dtype)}",
                "store this tensor in a dtype of whole bytes (such as U8, F8_E4M3 or BF16), or leave it out",
            )
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {name!r} has invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r} outside the {data_size} data bytes")
        expected = tensor_nbytes(dtype, shape)
        if offsets[1] - offsets[0] != expected:
            raise bad(
                f"tensor {name!r} is {dtype}{shape}, {expected} bytes, "
                f"but its data_offsets span {offsets[1] - offsets[0]}"
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1]))
    tensors.sort(key=lambda t: (t.begin, t.end))
    position = 0
    for t in tensors:
        if t.begin != position:
            kind = "overlaps the previous tensor" if t.begin < position else "leaves a gap before it"
            raise bad(f"tensor {t.name!r} at offset {t.begin} {kind}")
        position = t.end
    if position != data_size:
        raise bad(f"tensors cover {position} of {data_size} data bytes")
    return tensors, metadata


class SafetensorsFile:
    """A safetensors file opened for reading raw tensor bytes through mmap.

    It is opened through ``folder`` (see :mod:`xorweights.inputs`): a link
    leading out of the checkpoint folder, or anything but a regular file, is
    refused. The mapping is made later from a second open, which must be the
    same file as the one whose header was checked.
    """

    def __init__(self, path: Path, folder: InputFolder | None = None) -> None:
        self.path = path
        self.folder = folder or InputFolder(path)
        if path.is_symlink() and not path.exists():
            raise InputFileError(f"{path}: broken symbolic link", "fix or replace the link")
        if path.is_dir() or not path.exists():
            raise InputFileError(f"{path}: expected a safetensors file, found a directory or nothing")
        f, self.size = self.folder.open(path)
        with f:
            self._identity = _identity(f)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputFileError(f"{path}: truncated, only {self.size} bytes", "re-download it")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise InputFileError(
                    f"{path}: header claims {n} bytes, more than the {MAX_HEADER_BYTES} allowed",
                    "the file is damaged or hostile; re-download it",
                )
            if 8 + n > self.size:
                raise InputFileError(
                    f"{path}: header claims {n} bytes, but only {self.size - 8} follow its length; it is truncated",
                    "re-download it",
                )
            self.header_bytes = f.read(n)
        self.data_start = 8 + n
        self.tensors, self.metadata = parse_header(self.header_bytes, self.size - self.data_start, str(path))
        self.by_name = {t.name: t for t in self.tensors}
        self._mmap: mmap.mmap | None = None

    @property
    def prefix(self) -> bytes:
        """The bytes before the data: the 8-byte length and the header, exactly as in the file."""
        return struct.pack("<Q", len(self.header_bytes)) + self.header_bytes

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            f, _ = self.folder.open(self.path)
            with f:
                if _identity(f) != self._identity:
                    raise InputFileError(f"{self.path}: changed while being read", "run the same command again")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def read(self, tensor: TensorInfo, start: int, stop: int) -> np.ndarray:
        """Bytes ``[start, stop)`` of ``tensor`` as a read-only ``uint8`` view."""
        m = self._map()
        begin = self.data_start + tensor.begin
        return np.frombuffer(m, dtype=np.uint8, count=stop - start, offset=begin + start)

    def release(self, tensor: TensorInfo, start: int, stop: int) -> None:
        """Drop the pages of a consumed range from our resident set.

        The mapping is read-only and file-backed, so the kernel can re-read the
        pages if we ever touch them again; this only keeps RSS flat.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = self.data_start + tensor.begin + start
        hi = self.data_start + tensor.begin + stop
        lo_page = lo - lo % page
        if hi > lo_page:
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED, lo_page, hi - lo_page)
            except OSError:
                pass  # advisory only

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a numpy view still points at it; the GC will unmap
            self._mmap = None


class Arrival(Protocol):
    """A safetensors file still downloading: its first bytes fetched ahead, and a wait for the whole."""

    prefix: bytes  # the 8-byte header length and the header, as fetched
    size: int  # of the whole file

    def wait(self) -> None:
        """Return once the file is in place; raise the download's error if it failed."""


class ArrivingSafetensorsFile(SafetensorsFile):
    """A safetensors file whose header is known before the file is there; reads wait for it.

    The tensors are planned from the fetched header. The first read waits for
    the download, then opens the file as :class:`SafetensorsFile` does and
    refuses it unless its size and header are the ones planned from.
    """

    def __init__(self, path: Path, folder: InputFolder, arrival: Arrival) -> None:
        self.path = path
        self.folder = folder
        self.arrival = arrival
        self.size = arrival.size
        where = f"{path} (header fetched ahead)"
        if len(arrival.prefix) < 8 or struct.unpack("<Q", arrival.prefix[:8])[0] != len(arrival.prefix) - 8:
            raise InputFileError(f"{where}: not a safetensors header", "re-download the base")
        self.header_bytes = arrival.prefix[8:]
        self.data_start = len(arrival.prefix)
        self.tensors, self.metadata = parse_header(self.header_bytes, self.size - self.data_start, where)
        self.by_name = {t.name: t for t in self.tensors}
        self._mmap = None
        self._arrived = False
        self._lock = threading.Lock()

    def _map(self) -> mmap.mmap:
        with self._lock:  # frames of one file are read on several threads; the first waits for it
            if not self._arrived:
                self.arrival.wait()
                f, size = self.folder.open(self.path)
                with f:
                    head = f.read(self.data_start)
                    if size != self.size or head != self.arrival.prefix:
                        raise InputFileError(
                            f"{self.path}: downloaded, but not the file whose header was fetched ahead",
                            "the base repo changed while it was downloaded; run the same command again",
                        )
                    self._identity = _identity(f)
                self._arrived = True
        return super()._map()


def _identity(f: BinaryIO) -> tuple[int, int, int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[TensorInfo]]:
    """Build the 8-byte length prefix plus header for tensors laid out in order.

    Returns the bytes to write before the data and the planned layout, so a
    streaming writer can emit the data afterwards and check the byte counts.
    The header is padded with spaces to a multiple of 8, as safetensors does.
    """
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    layout: list[TensorInfo] = []
    position = 0
    for name, dtype, shape in tensors:
        n = tensor_nbytes(dtype, shape)
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + n]}
        layout.append(TensorInfo(name, dtype, tuple(shape), position, position + n))
        position += n
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(len(body)) % _ALIGN)
    return struct.pack("<Q", len(body)) + body, layout
