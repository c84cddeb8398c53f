"""Byte counts in words people read: 640 B, 16.2 KiB, 2.5 MiB, 61.4 GiB."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
