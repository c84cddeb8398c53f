"""How a frame stores the XOR of fine-tune and base: literally, or through a bijection that depends on the base.

Two codings, recorded per tensor in the manifest (docs/format.md, "Codings"):

- ``xor`` (formats 1 and 2): the stored element is ``f XOR b``.
- ``zigzag-diff`` (format 3): the stored element is ``zigzag((f - b) mod 2^n)``,
  on the elements' bit patterns as n-bit unsigned integers. A small change
  that carries across a mantissa boundary (0x3BFF -> 0x3C00) flips many bits
  of the XOR but is the integer 1 here, so the stored bytes are smaller
  numbers and compress better. For a fixed ``b`` it is a bijection of
  ``f XOR b``: it reveals nothing the XOR does not.

Only the elements the base covers are coded (the first ``len(base)`` bytes of
a frame); bytes past them are stored as they are, in both codings.

Decoding is fused with the byte ungrouping and done in blocks of
``BLOCK_BYTES``, so every temporary stays in the CPU cache: the extra
arithmetic of ``zigzag-diff`` then costs less than memory traffic would.
"""

from __future__ import annotations

import threading

import numpy as np

CODINGS = ("xor", "zigzag-diff")
LITERAL_XOR = "xor"
DEFAULT_CODING = "zigzag-diff"

# 1 MiB per array. Each numpy call in a block holds the GIL for its set-up,
# so with two decode threads small blocks serialize them: on a 16 MiB F16
# frame, 64 Ki-element blocks took 6.7 ms per frame with two threads against
# 3.2 ms for 1 MiB blocks. Whole frames at once spill every temporary to
# memory (5.2 ms).
BLOCK_BYTES = 1 << 20

NO_BASE = np.empty(0, dtype=np.uint8)  # a frame the base does not cover

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


class _Scratch(threading.local):
    """Per-thread temporaries of one block, so blocks allocate nothing."""

    def get(self, width: int) -> np.ndarray:
        key = f"w{width}"
        if not hasattr(self, key):
            setattr(self, key, np.empty(BLOCK_BYTES // width, _UNSIGNED[width]))
        block: np.ndarray = getattr(self, key)
        return block


_scratch = _Scratch()


def _words(data: np.ndarray, width: int) -> np.ndarray:
    return data.view(_UNSIGNED[width])


def _zigzag(d: np.ndarray, width: int, tmp: np.ndarray) -> None:
    """``d = zigzag(d)`` in place: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..., reading ``d`` as n-bit two's complement."""
    np.right_shift(d.view(_SIGNED[width]), 8 * width - 1, out=tmp.view(_SIGNED[width]))  # all ones where d < 0
    np.left_shift(d, 1, out=d)
    np.bitwise_xor(d, tmp, out=d)


def _unzigzag_add(z: np.ndarray, base: np.ndarray, tmp: np.ndarray) -> None:
    """``z = base + unzigzag(z)`` in place, modulo 2^n."""
    np.bitwise_and(z, 1, out=tmp)
    np.negative(tmp, out=tmp)  # 0 or all ones
    np.right_shift(z, 1, out=z)
    np.bitwise_xor(z, tmp, out=z)
    np.add(z, base, out=z)


def encode_into(coding: str, target: np.ndarray, base: np.ndarray, out: np.ndarray, width: int) -> None:
    """Write the coded form of ``target`` (bytes) into ``out``: the first ``len(base)`` bytes coded against ``base``.

    ``base`` holds whole elements of the target's dtype. The rest of
    ``target`` is copied as it is.
    """
    k = len(base)
    if coding == LITERAL_XOR:
        np.bitwise_xor(target[:k], base, out=out[:k])
    else:
        t, b, o = _words(target[:k], width), _words(base, width), _words(out[:k], width)
        tmp = _scratch.get(width)
        for lo in range(0, len(t), len(tmp)):
            hi = min(lo + len(tmp), len(t))
            np.subtract(t[lo:hi], b[lo:hi], out=o[lo:hi])
            _zigzag(o[lo:hi], width, tmp[: hi - lo])
    out[k : len(target)] = target[k:]


def decode_into(coding: str, grouped: np.ndarray | None, coded: np.ndarray, base: np.ndarray, width: int) -> None:
    """Turn a frame's stored elements back into the target's bytes, in ``coded`` itself.

    ``grouped`` holds the frame's bytes grouped by position in the element
    (as compressed frames store them), to be ungrouped into ``coded`` on the
    way; None when ``coded`` already holds them in element order. The first
    ``len(base)`` bytes are then decoded against ``base``; the rest are the
    target's own bytes.
    """
    n = len(coded) // width
    if width == 1 or grouped is None:
        if grouped is not None:
            coded[:] = grouped
        groups = None
    else:
        groups = grouped.reshape(width, n)
    words = _words(coded, width)
    based = len(base) // width
    b = _words(base, width)
    tmp = _scratch.get(width)
    for lo in range(0, n, len(tmp)):
        hi = min(lo + len(tmp), n)
        w = words[lo:hi]
        if groups is not None:
            np.copyto(w, groups[width - 1, lo:hi])
            for k in range(width - 2, -1, -1):
                np.left_shift(w, 8, out=w)
                np.bitwise_or(w, groups[k, lo:hi], out=w)
        if lo >= based:
            continue
        top = min(hi, based)
        part = w[: top - lo]
        if coding == LITERAL_XOR:
            np.bitwise_xor(part, b[lo:top], out=part)
        else:
            _unzigzag_add(part, b[lo:top], tmp[: top - lo])
