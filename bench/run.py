"""The xorweights benchmark: speed and memory as ratios against baselines from the same run.

    .venv/bin/python bench/run.py --sizes 1GB,4GB

For each size it makes a LLaMA-7B-shaped fp16 model and a fine-tune of it
(bench/synth.py), then times, each in its own process with its peak RSS:
encode and decode (compressed and --no-compress), the I/O floor (read the
inputs once, write the output once, fsync) on disk and on tmpfs, `cp`, the
prior art's whole-file XOR in 4 KiB blocks, and gzip-9 on the plain XOR
bytes. It prints a table, checks the targets of the performance issue,
writes bench/results/<date>.json and, with matplotlib, a plot beside it.
Every multi-GB file is deleted at the end (keep them with --keep).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
XW = [PY, "-m", "xorweights"]
GB = 10**9


@dataclass
class Run:
    name: str
    seconds: float
    max_rss_mib: float
    bytes: int  # the model's tensor bytes, for throughput

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / GB


def timed(name: str, argv: list[str], nbytes: int) -> Run:
    """Run ``argv`` as a child; measure wall time and that child's own peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{name} failed with exit code {proc.returncode}: {' '.join(argv)}")
    run = Run(name, seconds, usage.ru_maxrss / 1024, nbytes)
    print(f"  {name:<34} {seconds:7.2f} s  {run.gbps:6.2f} GB/s  {run.max_rss_mib:7.1f} MiB", flush=True)
    return run


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in files(folder))


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in files(folder):
        if ".xorweights" in p.parts:
            continue
        h.update(p.relative_to(folder).as_posix().encode())
        with p.open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def parse_size(text: str) -> int:
    units = {"GB": GB, "MB": 10**6, "GIB": 1 << 30, "MIB": 1 << 20}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    out: Path  # removed before and after every run
    check: bool = False  # the output must equal the fine-tune


def measure(steps: list[Step], nbytes: int, repeats: int, original: str) -> dict[str, Run]:
    """Run every step ``repeats`` times, interleaved, and keep each one's median run.

    Interleaving spreads the machine's noise over all steps alike, and a sync
    before each run keeps one run's writeback from landing on the next.
    """
    samples: dict[str, list[Run]] = {s.name: [] for s in steps}
    for rep in range(repeats):
        for step in steps:
            shutil.rmtree(step.out, ignore_errors=True) if step.out.is_dir() else step.out.unlink(missing_ok=True)
            os.sync()
            samples[step.name].append(timed(step.name, step.argv, nbytes))
            if step.check and rep == 0 and tree_hash(step.out) != original:
                raise SystemExit(f"{step.name}: output differs from the fine-tune")
            shutil.rmtree(step.out, ignore_errors=True) if step.out.is_dir() else step.out.unlink(missing_ok=True)
    return {name: sorted(runs, key=lambda r: r.seconds)[len(runs) // 2] for name, runs in samples.items()}


def bench_size(size: int, work: Path, tmpfs: Path, jobs: int, gzip_sample: int, repeats: int) -> dict[str, object]:
    root = work / f"{size // 10**6}MB"
    shutil.rmtree(root, ignore_errors=True)
    print(f"\n== {size / GB:.1f} GB model in {root}", flush=True)
    t0 = time.perf_counter()
    # A child makes the model, so this process stays small: a child's peak RSS
    # as the kernel reports it starts from its parent's size at fork.
    nbytes = int(subprocess.check_output([PY, str(HERE / "synth.py"), str(root), str(size)]))
    base, ft = root / "base", root / "finetuned"
    print(f"  generated base + fine-tune ({nbytes / GB:.2f} GB of tensors each) in {time.perf_counter() - t0:.0f} s")
    original = tree_hash(ft)
    delta, plain, whole = root / "delta", root / "delta-plain", root / "delta-4k"
    j = ["--jobs", str(jobs)]
    # The deltas the decodes read: made once, outside the timed runs.
    encodes = [
        Step("encode", [*XW, "encode", str(ft), "--base", str(base), "-o", str(root / "e1"), "-q", *j], root / "e1"),
        Step(
            "encode --no-compress",
            [*XW, "encode", str(ft), "--base", str(base), "-o", str(root / "e2"), "--no-compress", "-q", *j],
            root / "e2",
        ),
        Step(
            "4 KiB whole-file encode",
            [PY, str(HERE / "baselines.py"), "xor4k", str(ft), str(base), str(root / "e3")],
            root / "e3",
        ),
    ]
    runs = measure(encodes, nbytes, repeats, original)
    for step, folder in zip(encodes, (delta, plain, whole), strict=True):
        subprocess.check_call(step.argv, stdout=subprocess.DEVNULL)
        step.out.rename(folder)
    base_files = [str(p) for p in files(base) if p.suffix == ".safetensors"]
    out, fast = root / "out", tmpfs / f"xorweights-bench-{os.getpid()}"
    fast.parent.mkdir(parents=True, exist_ok=True)

    def floor(name: str, target: Path, delta_dir: Path) -> Step:
        inputs = base_files + [str(p) for p in files(delta_dir)]
        return Step(name, [PY, str(HERE / "baselines.py"), "floor", str(target), str(nbytes), *inputs], target)

    def decode(name: str, target: Path, delta_dir: Path, n: int) -> Step:
        argv = [*XW, "decode", str(delta_dir), "--base", str(base), "-o", str(target), "-q", "--jobs", str(n)]
        return Step(name, argv, target, check=True)

    decodes = [
        floor("floor, disk", root / "floor.bin", delta),
        floor("floor, disk, plain delta", root / "floor.bin", plain),
        floor("floor, tmpfs", fast, delta),
        Step("cp -r fine-tune, disk", ["bash", "-c", f"cp -r {ft} {out} && sync -f {out}"], out),
        decode("decode", out, delta, jobs),
        decode("decode --no-compress", out, plain, jobs),
        decode("decode, tmpfs, --jobs 2", fast, delta, 2),
        decode("decode, tmpfs, --jobs 1", fast, delta, 1),
        Step(
            "4 KiB whole-file decode",
            [PY, str(HERE / "baselines.py"), "xor4k", str(whole), str(base), str(out)],
            out,
            True,
        ),
    ]
    runs.update(measure(decodes, nbytes, repeats, original))
    plain_data = [str(p) for p in sorted(plain.glob("*.xwd"))]
    g = json.loads(subprocess.check_output([PY, str(HERE / "baselines.py"), "gzip9", str(gzip_sample), *plain_data]))
    print(
        f"  gzip-9 on {g['sample_bytes'] / 1e6:.0f} MB of plain XOR: {g['ratio']:.3f}x at {g['bytes_per_s'] / 1e6:.1f} MB/s"
    )
    sizes = {
        "model_tensor_bytes": nbytes,
        "model_files_bytes": du(ft),
        "delta_bytes": du(delta),
        "delta_plain_bytes": du(plain),
        "gzip9_estimated_bytes": int(du(plain) / g["ratio"]),
    }
    shutil.rmtree(root, ignore_errors=True)
    return {
        "size": size,
        "runs": {k: {**asdict(v), "gbps": v.gbps} for k, v in runs.items()},
        "gzip9": g,
        "sizes": sizes,
    }


def targets(result: dict[str, object]) -> list[tuple[str, str, float, bool]]:
    """The performance issue's targets, as (what, wanted, measured, met)."""
    out = []
    by_size = result["sizes"]
    assert isinstance(by_size, list)
    big = by_size[-1]
    r = {k: v["seconds"] for k, v in big["runs"].items()}
    s = big["sizes"]

    def add(what: str, wanted: str, value: float, ok: bool) -> None:
        out.append((what, wanted, round(value, 3), ok))

    add(
        "decode --no-compress / floor, disk",
        "<= 1.3",
        r["decode --no-compress"] / r["floor, disk, plain delta"],
        r["decode --no-compress"] <= 1.3 * r["floor, disk, plain delta"],
    )
    add("decode / floor, disk", "<= 1.3", r["decode"] / r["floor, disk"], r["decode"] <= 1.3 * r["floor, disk"])
    add(
        "4 KiB baseline decode / decode",
        ">= 1.2",
        r["4 KiB whole-file decode"] / r["decode"],
        r["4 KiB whole-file decode"] >= 1.2 * r["decode"],
    )
    add(
        "decode tmpfs --jobs 2 / floor, tmpfs",
        "<= 2",
        r["decode, tmpfs, --jobs 2"] / r["floor, tmpfs"],
        r["decode, tmpfs, --jobs 2"] <= 2 * r["floor, tmpfs"],
    )
    add(
        "decode tmpfs --jobs 1 / --jobs 2",
        ">= 1.6",
        r["decode, tmpfs, --jobs 1"] / r["decode, tmpfs, --jobs 2"],
        r["decode, tmpfs, --jobs 1"] >= 1.6 * r["decode, tmpfs, --jobs 2"],
    )
    peak = max(v["max_rss_mib"] for k, v in big["runs"].items() if k.startswith("decode"))
    add("decode peak RSS, MiB", "<= 300", peak, peak <= 300)
    if len(by_size) > 1:
        small = by_size[0]
        rss = [max(v["max_rss_mib"] for k, v in b["runs"].items() if k.startswith("decode")) for b in (small, big)]
        add("decode peak RSS, largest / smallest model", "0.9 .. 1.1", rss[1] / rss[0], 0.9 <= rss[1] / rss[0] <= 1.1)
        per_byte = [b["runs"]["decode"]["seconds"] / b["sizes"]["model_tensor_bytes"] for b in (small, big)]
        add(
            "decode s/byte, largest / smallest model",
            "~1 (linear)",
            per_byte[1] / per_byte[0],
            per_byte[1] / per_byte[0] <= 1.25,
        )
    add(
        "delta / gzip-9 size",
        "<= 0.9",
        s["delta_bytes"] / s["gzip9_estimated_bytes"],
        s["delta_bytes"] <= 0.9 * s["gzip9_estimated_bytes"],
    )
    add(
        "delta / model size",
        "<= 0.4",
        s["delta_bytes"] / s["model_files_bytes"],
        s["delta_bytes"] <= 0.4 * s["model_files_bytes"],
    )
    enc = big["runs"]["encode"]["gbps"] * GB
    add(
        "encode throughput / gzip-9 throughput",
        ">= 50",
        enc / big["gzip9"]["bytes_per_s"],
        enc >= 50 * big["gzip9"]["bytes_per_s"],
    )
    return out


def plot(result: dict[str, object], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_size = result["sizes"]
    assert isinstance(by_size, list)
    x = [b["sizes"]["model_tensor_bytes"] / GB for b in by_size]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (
        ("decode", "o-"),
        ("decode, tmpfs, --jobs 2", "s-"),
        ("floor, disk", "^--"),
        ("4 KiB whole-file decode", "x:k"),
    ):
        ax.plot(x, [b["runs"][name]["seconds"] for b in by_size], style, label=f"{name} (s)")
    ax.set_xlabel("model size, GB of tensors")
    ax.set_ylabel("wall time, s")
    ax2 = ax.twinx()
    ax2.plot(x, [b["runs"]["decode"]["max_rss_mib"] for b in by_size], "r*-", label="decode peak RSS (MiB)")
    ax2.set_ylabel("peak RSS, MiB")
    ax2.set_ylim(0, max(400, *[b["runs"]["decode"]["max_rss_mib"] * 1.2 for b in by_size]))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title("xorweights decode: time grows linearly, memory stays flat")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1GB,4GB", help="model sizes, comma-separated (default 1GB,4GB)")
    ap.add_argument("--size", help="a single model size (same as --sizes SIZE)")
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each step; the median is kept")
    ap.add_argument("--gzip-sample", default="128MB", help="bytes of plain XOR to time gzip-9 on")
    ap.add_argument(
        "--real", action="store_true", help="also compare the synthetic statistics with a real AdamW fine-tune"
    )
    args = ap.parse_args()
    sizes = [parse_size(s) for s in (args.size or args.sizes).split(",")]
    biggest = max(sizes)
    args.workdir.mkdir(parents=True, exist_ok=True)
    need_disk, need_tmpfs = int(6 * biggest * 1.1), int(biggest * 1.2)
    if free_bytes(args.workdir) < need_disk:
        sys.exit(
            f"bench: {args.workdir} has {free_bytes(args.workdir) / GB:.1f} GB free; a {biggest / GB:.1f} GB run needs about {need_disk / GB:.0f} GB. Free some space or pass --workdir."
        )
    if free_bytes(args.tmpfs) < need_tmpfs:
        sys.exit(
            f"bench: {args.tmpfs} has {free_bytes(args.tmpfs) / GB:.1f} GB free; it needs about {need_tmpfs / GB:.0f} GB. Pass --tmpfs or a smaller size."
        )
    result: dict[str, object] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "jobs": args.jobs,
        "repeats": args.repeats,
        "sizes": [
            bench_size(s, args.workdir, args.tmpfs, args.jobs, parse_size(args.gzip_sample), args.repeats)
            for s in sizes
        ],
    }
    if args.real:
        sys.path.insert(0, str(HERE))
        import real

        # lr 5e-7 gives the tiny model a median change (~0.25%) close to the synthetic layers' (~0.3%):
        # compressibility is then compared at equal change, which is what the generator models.
        result["statistics"] = {"real": real.real_finetune_stats(lr=5e-7), "synthetic": real.synthetic_stats()}
    checks = targets(result)
    result["targets"] = [dict(zip(("what", "wanted", "measured", "met"), c, strict=True)) for c in checks]
    print("\ntarget                                        wanted       measured  met")
    for what, wanted, value, ok in checks:
        print(f"{what:<45} {wanted:<12} {value:>8.3f}  {'yes' if ok else 'NO'}")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stem = out_dir / dt.date.today().isoformat()
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    drew = plot(result, stem.with_suffix(".png"))
    print(
        f"\nwrote {stem.with_suffix('.json')}"
        + (f" and {stem.with_suffix('.png')}" if drew else " (pip install matplotlib for the plot)")
    )


if __name__ == "__main__":
    main()
