"""The byte-level kernel: byte grouping, frames and tensor hashes.

A *frame* is one chunk of a tensor's stream (at most ``MAX_FRAME_BYTES``):
its XOR with the base, stored through the tensor's coding (:mod:`.coding`).
Compressed frames are independent zstd frames with the content size and
zstd's own checksum in their header, so each one decodes and checks alone.
Before compression the bytes are grouped by their position in an element
(all first bytes, then all second bytes, ...): in the stream of a fine-tune
against its base the high bytes are mostly zero and compress well.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import xxhash
import zstandard

from ..errors import DeltaCorruptError
from .coding import LITERAL_XOR, NO_BASE, decode_into

MAX_FRAME_BYTES = 64 * 1024 * 1024
DEFAULT_FRAME_BYTES = 16 * 1024 * 1024
# zstd levels, chosen by measurement (docs/performance.md, "Delta size"):
# on zigzag-diff frames level 1 is smaller than 3 as well as faster; literal
# XOR frames (format 2) keep the level they were always written with.
ZSTD_LEVEL = 3
ZSTD_LEVEL_V3 = 1


def new_tensor_hash() -> xxhash.xxh3_128:
    """The per-tensor checksum: xxh3-128 over the tensor's raw bytes."""
    return xxhash.xxh3_128()


def xor_into(target: np.ndarray, other: np.ndarray) -> None:
    """``target ^= other`` for the first ``len(other)`` bytes of ``target``."""
    n = len(other)
    if n:
        view = target[:n]
        np.bitwise_xor(view, other, out=view)


def _words(data: np.ndarray, width: int) -> np.ndarray:
    """View whole elements as little-endian unsigned integers of ``width`` bytes."""
    return data.view(f"<u{width}")


def group_bytes(data: np.ndarray, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Reorder ``data`` so byte k of every element comes together.

    Shifts over whole words run an order of magnitude faster than numpy's
    strided byte copies (11-15 GB/s against about 1 GB/s here).
    """
    if width == 1:
        return data
    words = _words(data, width)
    groups = (np.empty(len(data), dtype=np.uint8) if out is None else out[: len(data)]).reshape(width, -1)
    np.copyto(groups[0], words, casting="unsafe")
    for k in range(1, width):
        np.right_shift(words, 8 * k, out=groups[k], casting="unsafe")
    return groups.reshape(-1)


class FrameCodec:
    """Turns XOR chunks into frames and back. ``compression`` is "zstd" or "none"."""

    def __init__(self, compression: str, level: int = ZSTD_LEVEL) -> None:
        if compression not in ("zstd", "none"):
            raise ValueError(compression)
        self.compression = compression
        self.level = level
        # zstd contexts must not be shared by threads running at once.
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        if not hasattr(self._local, "compressor"):
            self._local.compressor = zstandard.ZstdCompressor(
                level=self.level, write_checksum=True, write_content_size=True
            )
        return self._local.compressor

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        if not hasattr(self._local, "decompressor"):
            self._local.decompressor = zstandard.ZstdDecompressor()
        return self._local.decompressor

    def encode(self, xor: np.ndarray, width: int, scratch: np.ndarray | None = None) -> bytes | memoryview:
        """One frame from XOR bytes; ``scratch`` (at least as long) avoids an allocation.

        Uncompressed frames are a view of ``xor`` itself: write them before reusing it.
        """
        if self.compression == "none":
            return memoryview(xor)
        return self._compressor().compress(group_bytes(xor, width, scratch))

    def decode(
        self,
        frame: bytes,
        width: int,
        out: np.ndarray,
        where: str,
        base: np.ndarray = NO_BASE,
        coding: str = LITERAL_XOR,
    ) -> None:
        """Decode ``frame`` into ``out`` (the target's bytes), whose length is the frame's declared size.

        ``base`` holds the base's bytes for the start of the frame, cast to
        the target's dtype; ``coding`` says how the frame stores the target
        against them. The declared size is checked before anything is
        allocated, so a frame that claims or expands to more than the
        manifest says is refused.
        """
        size = len(out)
        if self.compression == "none":
            if len(frame) != size:
                raise DeltaCorruptError(f"{where}: frame holds {len(frame)} bytes, the manifest says {size}")
            out[:] = np.frombuffer(frame, dtype=np.uint8)
            decode_into(coding, None, out, base, width)
            return
        try:
            claimed = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise DeltaCorruptError(f"{where}: not a zstd frame ({exc})") from None
        if claimed != size:
            told = "declares no size" if claimed < 0 else f"claims {claimed} bytes"
            raise DeltaCorruptError(f"{where}: frame {told}, the manifest says {size}")
        try:
            raw = self._decompressor().decompress(frame, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise DeltaCorruptError(f"{where}: frame does not decompress ({exc})") from None
        if len(raw) != size:
            raise DeltaCorruptError(f"{where}: frame expands to {len(raw)} bytes, the manifest says {size}")
        decode_into(coding, np.frombuffer(raw, dtype=np.uint8), out, base, width)


def frame_spans(nbytes: int, frame_bytes: int, width: int) -> list[tuple[int, int]]:
    """Cut ``[0, nbytes)`` into frames of whole elements, at most ``frame_bytes`` each."""
    step = max(width, frame_bytes - frame_bytes % width)
    return [(lo, min(lo + step, nbytes)) for lo in range(0, nbytes, step)]


def sha256_file(path: Path) -> str:
    """sha256 of a whole file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
