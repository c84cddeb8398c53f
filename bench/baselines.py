"""Baselines the benchmark measures xorweights against, each run as its own process.

    python bench/baselines.py floor OUT N FILE...      read FILEs once, write N bytes to OUT, fsync
    python bench/baselines.py xor4k A_DIR B_DIR OUT_DIR  whole-file XOR in 4 KiB blocks, no checks
    python bench/baselines.py gzip9 SAMPLE_BYTES FILE... gzip level 9 on 1 MiB blocks spread evenly over FILEs

``xor4k`` follows the description of OpenAssistant's xor_codec.py in
shared/reference: every file of A is XORed with the file of the same name in
B, 4096 bytes at a time; where B is shorter it is padded with zeros, where it
is longer it is cut. It checks nothing. Unlike the original it fsyncs what it
writes, so that it does the same I/O as our decode.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

BLOCK = 16 << 20


def floor(out: Path, out_bytes: int, inputs: list[Path]) -> None:
    """The least any decode must do: read its inputs once and write its output once.

    The output is made of the input blocks just read (as `cp` would write
    them), so the floor pays the same cache misses as a real rebuild, not
    the cost of writing one hot buffer over and over.
    """
    buf = bytearray(BLOCK)
    left = out_bytes
    with out.open("wb", buffering=0) as fo:
        for p in inputs:
            with p.open("rb", buffering=0) as f:
                while n := f.readinto(buf):
                    if left:
                        left -= fo.write(memoryview(buf)[: min(n, left)])
        while left:  # only if the inputs were smaller than the output
            left -= fo.write(memoryview(buf)[: min(BLOCK, left)])
        os.fsync(fo.fileno())


def xor4k(a_dir: Path, b_dir: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for a in sorted(p for p in a_dir.iterdir() if p.is_file()):
        b = b_dir / a.name
        with a.open("rb") as fa, (out_dir / a.name).open("wb") as fo:
            fb = b.open("rb") if b.exists() else None
            while block := fa.read(4096):
                other = fb.read(len(block)) if fb else b""
                x = np.frombuffer(block, dtype=np.uint8)
                y = np.zeros(len(block), dtype=np.uint8)
                y[: len(other)] = np.frombuffer(other, dtype=np.uint8)
                fo.write(np.bitwise_xor(x, y).tobytes())
            if fb:
                fb.close()
            fo.flush()
            os.fsync(fo.fileno())


def gzip9(sample: int, paths: list[Path]) -> dict[str, float]:
    """gzip-9's ratio and speed on blocks taken evenly from every part of the files.

    An even spread matters: the start of a model (the embedding, with its
    untouched rows) compresses far better than the rest.
    """
    block = 1 << 20
    sizes = [p.stat().st_size for p in paths]
    total = sum(sizes)
    count = max(1, min(sample, total) // block)
    parts = []
    for k in range(count):
        offset = k * (total // count)
        for p, size in zip(paths, sizes, strict=True):
            if offset < size:
                with p.open("rb") as f:
                    f.seek(offset)
                    parts.append(f.read(block))
                break
            offset -= size
    data = b"".join(parts)
    start = time.perf_counter()
    packed = sum(len(gzip.compress(part, compresslevel=9)) for part in parts)
    seconds = time.perf_counter() - start
    return {"sample_bytes": len(data), "ratio": len(data) / packed, "bytes_per_s": len(data) / seconds}


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "floor":
        floor(Path(args[0]), int(args[1]), [Path(a) for a in args[2:]])
    elif mode == "xor4k":
        xor4k(Path(args[0]), Path(args[1]), Path(args[2]))
    elif mode == "gzip9":
        print(json.dumps(gzip9(int(args[0]), [Path(a) for a in args[1:]])))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
