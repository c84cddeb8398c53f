"""Safetensors dtypes and the deterministic casts between float formats.

Everything here works on raw little-endian bytes held in numpy ``uint8``
arrays, so bf16 never needs numpy (or torch) to understand it. The casts are
part of the delta format (docs/format.md, "Casts between float dtypes"):

* widening (F16 -> F32, BF16 -> F32) is exact;
* F32 -> F16 rounds to nearest, ties to even (IEEE 754, numpy's ``astype``);
  values too large become infinity;
* F32 -> BF16 rounds to nearest, ties to even, on the top 16 bits;
* F16 <-> BF16 goes through F32, which is exact on the way in.

What matches torch's ``tensor.to(dtype)`` bit for bit, on every CPU, is every
finite value and both infinities; a NaN stays a NaN (tests/test_casts.py
checks all of it against the installed torch). NaN *payloads* are not torch's:
torch's own kernels give different ones on different CPUs (0xFFFF for an F32
NaN cast to BF16 on an AVX-512 CPU, 0x7FC0 elsewhere). Ours are fixed by
integer rules, never by numpy's or the CPU's float conversion:

* to BF16: every NaN becomes the canonical 0x7FC0;
* F16 -> F32: sign kept, the 10 payload bits become the top of F32's 23;
* F32 -> F16: sign kept, the top 10 payload bits kept (0x7C01 with the sign
  when those are all zero);
* BF16 -> F32: the 16 bits become the top half, as for any BF16 value.
"""

from __future__ import annotations

import math

import numpy as np

# Byte width of every safetensors dtype xorweights handles: every dtype that
# safetensors (0.8) writes whose elements are whole bytes. Their tensors are
# XORed, framed and hashed byte for byte, whatever the bytes mean.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

# Bits per element of the safetensors dtypes that pack elements into shared
# bytes. They are refused as unsupported (never as a damaged file), even when a
# tensor's total happens to be whole bytes: the delta format counts, frames and
# reports unprotected rows in whole elements, and an element boundary inside a
# byte would break each of those promises.
SUBBYTE_BITS: dict[str, int] = {
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

# safetensors dtype -> the torch dtype attribute, as safetensors.torch maps them:
# how a .bin's tensors are named, and what load_state_dict hands out.
TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor of ``dtype`` and ``shape`` takes."""
    return math.prod(shape) * ITEMSIZE[dtype]


def unsupported(dtype: str) -> str | None:
    """Why xorweights cannot handle the safetensors dtype ``dtype``, or None if it can (or does not know it)."""
    bits = SUBBYTE_BITS.get(dtype)
    if bits is None:
        return None
    return f"dtype {dtype} is unsupported: its {bits}-bit elements are packed into shared bytes"


FLOAT_CASTABLE = frozenset({"F16", "BF16", "F32"})

# CLI / API spellings of the dtypes decode can convert to.
NAMED: dict[str, str] = {
    "float16": "F16",
    "fp16": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float32": "F32",
    "fp32": "F32",
}


def can_cast(src: str, dst: str) -> bool:
    """True when base bytes of dtype ``src`` can stand in for ``dst``."""
    return src == dst or (src in FLOAT_CASTABLE and dst in FLOAT_CASTABLE)


def _to_f32(raw: np.ndarray, src: str) -> np.ndarray:
    if src == "F32":
        return raw.view("<f4")
    if src == "F16":
        half = raw.view("<u2")
        values = half.view("<f2").astype("<f4")
        nan = (half & 0x7FFF) > 0x7C00
        if nan.any():  # numpy's hardware path may set the quiet bit; the format does not
            h = half[nan].astype("<u4")
            values.view("<u4")[nan] = ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x03FF) << 13)
        return values
    # BF16 is the top half of an F32.
    return (raw.view("<u2").astype("<u4") << 16).view("<f4")


def _from_f32(values: np.ndarray, dst: str) -> np.ndarray:
    if dst == "F32":
        return values.view(np.uint8)
    if dst == "F16":
        with np.errstate(over="ignore", invalid="ignore"):
            half = values.astype("<f2").view("<u2")
        nan = np.isnan(values)
        if nan.any():  # the payload by the integer rule, whatever numpy's conversion does with it
            b = values.view("<u4")[nan]
            payload = (b >> 13) & 0x3FF
            half[nan] = (((b >> 16) & 0x8000) | 0x7C00 | np.maximum(payload, 1)).astype("<u2")
        return half.view(np.uint8)
    bits = values.view("<u4")
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    out = rounded.astype("<u2")
    out[np.isnan(values)] = 0x7FC0
    return out.view(np.uint8)


def cast_bytes(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast a flat ``uint8`` array of ``src`` elements to ``dst`` elements."""
    if src == dst:
        return raw
    if not (src in FLOAT_CASTABLE and dst in FLOAT_CASTABLE):
        raise ValueError(f"no cast from {src} to {dst}")
    return _from_f32(_to_f32(raw, src), dst)
