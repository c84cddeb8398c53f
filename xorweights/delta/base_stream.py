"""The base side of one target tensor: views for the XOR, hashing in order.

Encode and decode both walk a target tensor frame by frame and need the base
bytes that line up with each frame. Workers take :meth:`BaseStream.view` and
:meth:`BaseStream.cast` on any thread; the consumer then calls
:meth:`BaseStream.consume` frame by frame, in order, so the base's xxh3-128 is
computed from the same single read and checking the base costs no extra pass.
"""

from __future__ import annotations

import numpy as np

from ..readers.checkpoint import TensorRef
from ..readers.dtypes import ITEMSIZE, cast_bytes
from .kernel import DEFAULT_FRAME_BYTES, new_tensor_hash

_EMPTY = np.empty(0, dtype=np.uint8)


class BaseStream:
    """The base tensor behind a target tensor whose first ``xor_bytes`` are XORed."""

    def __init__(self, ref: TensorRef, target_dtype: str, xor_bytes: int) -> None:
        self.ref = ref
        self.target_dtype = target_dtype
        self.xor_bytes = xor_bytes
        self._widths = (ref.itemsize, ITEMSIZE[target_dtype])
        self._hash = new_tensor_hash()
        self._pos = 0  # base bytes hashed so far

    def _base_offset(self, target_offset: int) -> int:
        base_w, target_w = self._widths
        return target_offset // target_w * base_w

    def view(self, lo: int, hi: int) -> np.ndarray:
        """Raw base bytes under target bytes ``[lo, min(hi, xor_bytes))``; may be empty."""
        hi = min(hi, self.xor_bytes)
        if hi <= lo:
            return _EMPTY
        return self.ref.source.read(self._base_offset(lo), self._base_offset(hi))

    def cast(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` (from :meth:`view`) in the target's dtype, ready to XOR."""
        return cast_bytes(raw, self.ref.dtype, self.target_dtype)

    def consume(self, raw: np.ndarray) -> None:
        """Hash the next viewed range, in order, and let go of its pages."""
        if not len(raw):
            return
        start = self._pos
        self._hash.update(raw)
        self._pos += len(raw)
        self.ref.source.release(start, self._pos)

    def finish(self) -> str:
        """Hash the base bytes past the overlap (a shrunk dim 0) and return the digest."""
        total = self.ref.nbytes
        while self._pos < total:
            self.consume(self.ref.source.read(self._pos, min(self._pos + DEFAULT_FRAME_BYTES, total)))
        return self._hash.hexdigest()
