"""Stream a base tensor into the XOR: cast to the target dtype, hash every byte once.

Encode and decode both walk a target tensor frame by frame and need the base
bytes that line up with each frame. The base is read once, in order, and its
xxh3-128 is computed on the way, so checking the base costs no extra pass.
"""

from __future__ import annotations

import numpy as np

from .checkpoint import TensorRef
from .dtypes import ITEMSIZE, cast_bytes
from .kernel import DEFAULT_FRAME_BYTES, new_tensor_hash


class BaseStream:
    """The base side of one target tensor whose first ``xor_bytes`` are XORed."""

    def __init__(self, ref: TensorRef, target_dtype: str, xor_bytes: int) -> None:
        self.ref = ref
        self.target_dtype = target_dtype
        self.xor_bytes = xor_bytes
        self._ratio = (ref.itemsize, ITEMSIZE[target_dtype])
        self._hash = new_tensor_hash()
        self._pos = 0  # base bytes hashed so far

    def _base_offset(self, target_offset: int) -> int:
        base_w, target_w = self._ratio
        return target_offset // target_w * base_w

    def _consume(self, stop: int) -> np.ndarray:
        raw = self.ref.source.read(self._pos, stop)
        self._hash.update(raw)
        self._pos = stop
        return raw

    def chunk(self, lo: int, hi: int) -> np.ndarray:
        """Base bytes, cast to the target dtype, for target bytes ``[lo, min(hi, xor_bytes))``.

        Frames must be asked for in order; the result may be empty.
        """
        hi = min(hi, self.xor_bytes)
        if hi <= lo:
            return np.empty(0, dtype=np.uint8)
        assert self._base_offset(lo) == self._pos, "frames must be streamed in order"
        return cast_bytes(self._consume(self._base_offset(hi)), self.ref.dtype, self.target_dtype)

    def done_with(self, lo: int, hi: int) -> None:
        """Release the base pages under target bytes ``[lo, hi)`` once they are XORed."""
        hi = min(hi, self.xor_bytes)
        if hi > lo:
            self.ref.source.release(self._base_offset(lo), self._base_offset(hi))

    def finish(self) -> str:
        """Hash the base bytes past the overlap (a shrunk dim 0) and return the digest."""
        total = self.ref.nbytes
        while self._pos < total:
            start = self._pos
            self._consume(min(start + DEFAULT_FRAME_BYTES, total))
            self.ref.source.release(start, self._pos)
        return self._hash.hexdigest()
