"""Decode time against the number of files, at a fixed number of tensors.

    .venv/bin/python bench/many_files.py --tensors 100000 --files 10,4000

Makes a base and a fine-tune of ``--tensors`` tiny F16 tensors (16 elements
each) split into each number of files, encodes them, and times one decode per
layout in a child process. The per-file costs (the resume state, fsyncs,
opening shards) are what this measures: with the state rewritten whole after
each file, 4,000 files took 18x as long as 10; appended to, the ratio should
stay near the cost of the extra fsyncs. The ratio is printed, against the
fewest-files layout measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import xorweights
from xorweights.fixtures import Tensor, write_checkpoint


def layout(root: Path, tensors: int, files: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    base = {f"t{i:06d}.weight": Tensor("F16", rng.standard_normal(16).astype(np.float32)) for i in range(tensors)}
    ft = {n: Tensor("F16", t.values + np.float32(1e-3)) for n, t in base.items()}
    return (
        write_checkpoint(root / "base", base, shards=files, index=False),
        write_checkpoint(root / "ft", ft, shards=files, index=False),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--files", default="10,4000")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        times = {}
        for files in (int(f) for f in args.files.split(",")):
            root = work / f"{files}"
            base, ft = layout(root, args.tensors, files)
            xorweights.encode(ft, base, root / "delta")
            argv = [sys.executable, "-m", "xorweights", "decode", str(root / "delta")]
            argv += ["--base", str(base), "-o", str(root / "out"), "-q"]
            start = time.perf_counter()
            subprocess.run(argv, check=True)
            times[files] = time.perf_counter() - start
            print(f"{args.tensors} tensors in {files} files: decode {times[files]:.1f} s", flush=True)
            shutil.rmtree(root)
        fewest = min(times)
        for files, seconds in times.items():
            print(f"  {files} files / {fewest} files: {seconds / times[fewest]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
