"""The float casts of xorweights/readers/dtypes.py against torch on this machine, over every 16-bit pattern.

The guarantee (docs/format.md, "Casts between float dtypes"): every finite
value and both infinities come out bit-identical to torch's ``tensor.to``; a
NaN stays a NaN, with the payload the format's integer rules give (torch's
payloads differ by CPU, so they are not compared).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xorweights.readers.dtypes import cast_bytes

TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
BITS = {"F16": "<u2", "BF16": "<u2", "F32": "<u4"}
SIGNED = {"F16": torch.int16, "BF16": torch.int16, "F32": torch.int32}
ALL_16 = np.arange(1 << 16, dtype=np.uint32).astype("<u2")


def _f32_sample() -> np.ndarray:
    """Random F32 bit patterns of every kind, then ones in F16's range, and exact rounding ties for F16 and BF16."""
    rng = np.random.default_rng(2026)
    anything = rng.integers(0, 1 << 32, size=1 << 21, dtype=np.uint64).astype("<u4")
    # Exponents around F16's range (subnormals up to overflow), any sign and mantissa.
    exponent = rng.integers(95, 147, size=1 << 20, dtype=np.uint64).astype("<u4")
    near_f16 = (rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype("<u4") & 0x807FFFFF) | (exponent << 23)
    # Halfway between neighbouring finite F16 values (exact in F32): ties to even.
    f16 = ALL_16[(ALL_16 & 0x7C00) != 0x7C00].view("<f2").astype("<f4")
    f16 = np.sort(f16[f16 >= 0])
    ties_f16 = ((f16[:-1].astype(np.float64) + f16[1:]) / 2).astype("<f4").view("<u4")
    # Low 16 bits exactly 0x8000: halfway between two BF16 values.
    ties_bf16 = (rng.integers(0, 1 << 16, size=1 << 16, dtype=np.uint64).astype("<u4") << 16) | 0x8000
    edges = np.array(
        [0, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7F7F8000, 0x7F7F7FFF, 0x477FF000, 0x477FEFFF,
         0x00000001, 0x33000000, 0x33000001, 0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7FBFFFFF],
        dtype="<u4",
    )  # fmt: skip
    return np.concatenate([edges, anything, near_f16, ties_f16, ties_bf16, -ties_f16.view("<f4").view("<u4")])


SOURCES = {"F16": ALL_16, "BF16": ALL_16, "F32": _f32_sample()}


def _torch_cast(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    t = torch.from_numpy(bits.view(BITS[src].replace("u", "i")).copy()).view(TORCH[src])
    return t.to(TORCH[dst]).view(SIGNED[dst]).numpy().view(BITS[dst])


def _is_nan(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return (bits & 0x7FFFFFFF) > 0x7F800000
    if dtype == "BF16":
        return (bits & 0x7FFF) > 0x7F80
    return (bits & 0x7FFF) > 0x7C00


def _nan_rule(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """The NaN each source NaN becomes, by the rules written in docs/format.md, in plain integers."""
    bits = bits.astype(np.uint64)
    if src == "F16":  # to F32: sign kept, the 10 payload bits at the top of F32's 23
        f32 = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x3FF) << 13)
    elif src == "BF16":
        f32 = bits << 16
    else:
        f32 = bits
    if dst == "F32":
        return f32
    if dst == "BF16":
        return np.full_like(bits, 0x7FC0)
    payload = (f32 >> 13) & 0x3FF
    return ((f32 >> 16) & 0x8000) | 0x7C00 | np.maximum(payload, 1)


@pytest.mark.parametrize(
    ("src", "dst"), [(s, d) for s in ("F16", "BF16", "F32") for d in ("F16", "BF16", "F32") if s != d]
)
def test_casts_are_torch_for_every_non_nan_and_the_format_rule_for_nan(src: str, dst: str) -> None:
    source = SOURCES[src]
    ours = cast_bytes(source.view(np.uint8), src, dst).view(BITS[dst])
    theirs = _torch_cast(source, src, dst)
    nan_in = _is_nan(source, src)
    assert nan_in.any() and (~nan_in).any()
    # Finite values and infinities: bit for bit, signed zeros, subnormals and overflow to infinity included.
    mismatched = np.flatnonzero((ours != theirs) & ~nan_in)
    assert mismatched.size == 0, [hex(int(source[i])) for i in mismatched[:10]]
    # NaN-ness: exactly where torch has a NaN, so do we (no finite value ever becomes NaN, nor a NaN a number).
    assert np.array_equal(_is_nan(ours, dst), _is_nan(theirs, dst))
    assert np.array_equal(_is_nan(ours, dst), nan_in)
    # NaN payloads: the documented integer rule, whatever this CPU's torch does with them.
    assert np.array_equal(ours[nan_in].astype(np.uint64), _nan_rule(source[nan_in], src, dst))


def test_every_nan_cast_to_bf16_is_the_canonical_quiet_nan() -> None:
    for src, source in SOURCES.items():
        if src != "BF16":
            ours = cast_bytes(source.view(np.uint8), src, "BF16").view("<u2")
            assert set(np.unique(ours[_is_nan(source, src)]).tolist()) == {0x7FC0}


def test_casts_do_not_depend_on_how_the_input_is_chunked() -> None:
    source = SOURCES["F32"][: 1 << 16]
    whole = cast_bytes(source.view(np.uint8), "F32", "F16")
    parts = [cast_bytes(c.view(np.uint8), "F32", "F16") for c in np.array_split(source, 7)]
    assert np.array_equal(whole, np.concatenate(parts))
