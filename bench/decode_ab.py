"""Decode time and CPU of a format 3 delta against the format 2 delta of the same model, paired round by round.

    .venv/bin/python bench/decode_ab.py --rounds 15      # about 7 minutes, 1 GB model

It makes the synthetic pair (bench/synth.py), encodes it with both codecs,
then runs, for each of tmpfs and disk output and ``--jobs 2`` and ``1``, one
decode of each delta per round, alternating which goes first (on this host
the second decode of a pair is slowed by the first one's writeback). It
reports medians of wall time, the median of the per-round ratios, and the
median CPU time (user + system of the child), which does not depend on the
order. Every decode output is compared with the fine-tune once. Results go
to bench/results/decode-ab-<date>.json; the model is deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/ is a folder of scripts, not a package; run.py is a sibling script.
sys.path.insert(0, str(HERE))
from run import PY, XW, Run, parse_size, timed, tree_hash  # noqa: E402

CODECS = ("xor", "zigzag-diff")  # format 2, format 3


def decode_once(delta: Path, base: Path, out: Path, jobs: int, nbytes: int) -> Run:
    """One timed decode into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    argv = [*XW, "decode", str(delta), "--base", str(base), "-o", str(out), "-q", "--jobs", str(jobs)]
    return timed(f"decode {delta.name}, --jobs {jobs}, {out.parent}", argv, nbytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GB")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--workdir", type=Path, default=HERE / "work-ab")
    ap.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"))
    args = ap.parse_args()
    root = args.workdir
    shutil.rmtree(root, ignore_errors=True)
    nbytes = int(subprocess.check_output([PY, str(HERE / "synth.py"), str(root), str(parse_size(args.size))]))
    base, ft = root / "base", root / "finetuned"
    original = tree_hash(ft)
    for codec in CODECS:
        subprocess.check_call(
            [*XW, "encode", str(ft), "--base", str(base), "-o", str(root / codec), "--codec", codec, "-q"]
        )
    outs = {"tmpfs": args.tmpfs / f"xorweights-ab-{os.getpid()}", "disk": root / "out"}
    cases = [(place, jobs) for place in outs for jobs in (2, 1)]
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    try:
        for r in range(args.rounds):
            for place, jobs in cases:
                for codec in CODECS if r % 2 == 0 else CODECS[::-1]:
                    key = f"{place} --jobs {jobs} {codec}"
                    run = decode_once(root / codec, base, outs[place], jobs, nbytes)
                    if r == 0 and tree_hash(outs[place]) != original:
                        raise SystemExit(f"{key}: output differs from the fine-tune")
                    wall.setdefault(key, []).append(run.seconds)
                    cpu.setdefault(key, []).append(run.cpu_seconds)
    finally:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    print(f"{'decode':18} {'v2 s':>6} {'v3 s':>6} {'medians':>8} {'paired':>7} {'v2 CPU':>7} {'v3 CPU':>7}")
    for place, jobs in cases:
        v2, v3 = (wall[f"{place} --jobs {jobs} {c}"] for c in CODECS)
        c2, c3 = (cpu[f"{place} --jobs {jobs} {c}"] for c in CODECS)
        row = {
            "place": place,
            "jobs": jobs,
            "v2_s": statistics.median(v2),
            "v3_s": statistics.median(v3),
            "ratio_of_medians": statistics.median(v3) / statistics.median(v2),
            "median_paired_ratio": statistics.median(b / a for a, b in zip(v2, v3, strict=True)),
            "v2_cpu_s": statistics.median(c2),
            "v3_cpu_s": statistics.median(c3),
            "samples": {"v2": v2, "v3": v3, "v2_cpu": c2, "v3_cpu": c3},
        }
        rows.append(row)
        print(
            f"{place + ', --jobs ' + str(jobs):18} {row['v2_s']:6.2f} {row['v3_s']:6.2f} {row['ratio_of_medians']:8.3f}"
            f" {row['median_paired_ratio']:7.3f} {row['v2_cpu_s']:7.2f} {row['v3_cpu_s']:7.2f}"
        )
    path = HERE / "results" / f"decode-ab-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"size": nbytes, "rounds": args.rounds, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
