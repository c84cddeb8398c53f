"""The xorweights benchmark: speed and memory as ratios against baselines from the same run.

    .venv/bin/python bench/run.py --sizes 1GB,4GB

For each size it makes a LLaMA-7B-shaped fp16 model and a fine-tune of it
(bench/synth.py), then times, each in its own process with its peak RSS:
encode and decode (compressed and --no-compress), the I/O floor (read the
inputs once, write the output once, fsync) on disk and on tmpfs, `cp`, the
prior art's whole-file XOR in 4 KiB blocks, and gzip-9 on the plain XOR
bytes. It prints a table, checks the targets of the performance issue,
writes bench/results/<date>.json and, with matplotlib, a plot beside it.
Every multi-GB file is deleted at the end.

"encode" and "decode" are the default codec, zigzag-diff (format 3, "v3").
Every size also gets a v2 delta (--codec xor), and v2 decodes run next to the
v3 ones (disk and tmpfs, --jobs 1 and 2) in the same interleaved rounds: the
codec targets are ratios v3/v2, both as a ratio of medians and as the median
of each round's own ratio, which cancels noise that hits a whole round.
The --no-compress delta is the literal XOR (--codec xor), so gzip-9 is timed
on the plain XOR bytes, as the issue defines it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
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
    cpu_seconds: float = 0.0  # user + system of the child, which the disk's noise does not move

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
    run = Run(name, seconds, usage.ru_maxrss / 1024, nbytes, usage.ru_utime + usage.ru_stime)
    print(f"  {name:<34} {seconds:7.2f} s  {run.gbps:6.2f} GB/s  {run.max_rss_mib:7.1f} MiB", flush=True)
    return run


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def du(folder: Path) -> int:
    """Bytes of the files in ``folder``, without an unfinished run's state in ``.xorweights/``."""
    return sum(p.stat().st_size for p in files(folder) if ".xorweights" not in p.relative_to(folder).parts)


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


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def measure(steps: list[Step], nbytes: int, repeats: int, original: str) -> dict[str, list[Run]]:
    """Run every step ``repeats`` times, interleaved; return each step's runs in round order.

    Interleaving spreads the machine's noise over all steps alike, and a sync
    before each run keeps one run's writeback from landing on the next. Every
    other round runs the steps in reverse, so of two neighbours (a v3 decode
    and its v2 twin) neither always goes first.
    """
    samples: dict[str, list[Run]] = {s.name: [] for s in steps}
    for rep in range(repeats):
        for step in steps if rep % 2 == 0 else steps[::-1]:
            _remove(step.out)
            os.sync()
            samples[step.name].append(timed(step.name, step.argv, nbytes))
            if step.check and rep == 0 and tree_hash(step.out) != original:
                raise SystemExit(f"{step.name}: output differs from the fine-tune")
            _remove(step.out)
    return samples


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


# The codec comparison: every (place, --jobs) is decoded from the v3 and the v2 delta.
PLACES = ("disk", "tmpfs")
COMPARED_JOBS = (2, 1)


def decode_name(codec: str, place: str, jobs: int, default_jobs: int) -> str:
    """A decode step's name; v3 keeps the names earlier results and docs/performance.md use."""
    if codec == "v2":
        return f"decode v2, {place}, --jobs {jobs}"
    if place == "tmpfs":
        return f"decode, tmpfs, --jobs {jobs}"
    return "decode" if jobs == default_jobs else f"decode, disk, --jobs {jobs}"


def codec_comparison(samples: dict[str, list[Run]], default_jobs: int) -> dict[str, dict[str, object]]:
    """v3 against v2 decodes, per (place, --jobs): medians, per-round ratios, peak RSS."""
    out: dict[str, dict[str, object]] = {}
    for place in PLACES:
        for n in COMPARED_JOBS:
            v3 = samples[decode_name("v3", place, n, default_jobs)]
            v2 = samples[decode_name("v2", place, n, default_jobs)]
            # Both ran in the same round, a few seconds apart: their ratio
            # cancels whatever slowed or sped up that whole round.
            per_round = [a.seconds / b.seconds for a, b in zip(v3, v2, strict=True)]
            out[f"{place}, --jobs {n}"] = {
                "v3_seconds": median_run(v3).seconds,
                "v2_seconds": median_run(v2).seconds,
                "ratio_of_medians": median_run(v3).seconds / median_run(v2).seconds,
                "paired_ratio": statistics.median(per_round),
                "per_round_ratios": per_round,
                "v3_max_rss_mib": max(r.max_rss_mib for r in v3),
                "v2_max_rss_mib": max(r.max_rss_mib for r in v2),
            }
    return out


def encode_steps(root: Path, ft: Path, base: Path, jobs: int) -> list[Step]:
    """The encodes, timed; their outputs are the deltas the decodes read."""
    j = ["--jobs", str(jobs)]

    def encode(name: str, folder: str, *options: str) -> Step:
        out = root / folder
        return Step(name, [*XW, "encode", str(ft), "--base", str(base), "-o", str(out), "-q", *j, *options], out)

    return [
        encode("encode", "delta"),
        encode("encode v2 (--codec xor)", "delta-v2", "--codec", "xor"),
        # The literal XOR, stored plainly: what gzip-9 and the I/O floor of an uncompressed delta see.
        encode("encode --no-compress", "delta-plain", "--codec", "xor", "--no-compress"),
        Step(
            "4 KiB whole-file encode",
            [PY, str(HERE / "baselines.py"), "xor4k", str(ft), str(base), str(root / "delta-4k")],
            root / "delta-4k",
        ),
    ]


def bench_size(size: int, work: Path, tmpfs: Path, jobs: int, gzip_sample: int, repeats: int) -> dict[str, object]:
    root = work / f"{size // 10**6}MB"
    shutil.rmtree(root, ignore_errors=True)
    print(f"\n== {size / GB:.1f} GB model in {root}", flush=True)
    # Other work on the machine shows up in every ratio; the load average says how much there was.
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    # A child makes the model, so this process stays small: a child's peak RSS
    # as the kernel reports it starts from its parent's size at fork.
    nbytes = int(subprocess.check_output([PY, str(HERE / "synth.py"), str(root), str(size)]))
    base, ft = root / "base", root / "finetuned"
    print(f"  generated base + fine-tune ({nbytes / GB:.2f} GB of tensors each) in {time.perf_counter() - t0:.0f} s")
    original = tree_hash(ft)
    encodes = encode_steps(root, ft, base, jobs)
    samples = measure(encodes, nbytes, repeats, original)
    # measure() deletes what it times; make each delta once more, untimed, to keep it.
    for step in encodes:
        subprocess.check_call(step.argv, stdout=subprocess.DEVNULL)
    delta, delta_v2, plain, whole = (s.out for s in encodes)
    base_files = [str(p) for p in files(base) if p.suffix == ".safetensors"]
    out, fast = root / "out", tmpfs / f"xorweights-bench-{os.getpid()}"
    fast.parent.mkdir(parents=True, exist_ok=True)

    def floor(name: str, target: Path, delta_dir: Path) -> Step:
        inputs = base_files + [str(p) for p in files(delta_dir)]
        return Step(name, [PY, str(HERE / "baselines.py"), "floor", str(target), str(nbytes), *inputs], target)

    def decode(name: str, target: Path, delta_dir: Path, n: int) -> Step:
        argv = [*XW, "decode", str(delta_dir), "--base", str(base), "-o", str(target), "-q", "--jobs", str(n)]
        return Step(name, argv, target, check=True)

    # v3 and v2 twins sit next to each other, so each pair runs close in time.
    compared = [
        decode(decode_name(codec, place, n, jobs), out if place == "disk" else fast, d, n)
        for place in PLACES
        for n in COMPARED_JOBS
        for codec, d in (("v3", delta), ("v2", delta_v2))
    ]
    if jobs not in COMPARED_JOBS:
        compared.append(decode("decode", out, delta, jobs))
    decodes = [
        floor("floor, disk", root / "floor.bin", delta),
        floor("floor, disk, plain delta", root / "floor.bin", plain),
        floor("floor, tmpfs", fast, delta),
        Step("cp -r fine-tune, disk", ["bash", "-c", f"cp -r {ft} {out} && sync -f {out}"], out),
        *compared,
        decode("decode --no-compress", out, plain, jobs),
        Step(
            "4 KiB whole-file decode",
            [PY, str(HERE / "baselines.py"), "xor4k", str(whole), str(base), str(out)],
            out,
            True,
        ),
    ]
    samples.update(measure(decodes, nbytes, repeats, original))
    runs = {name: median_run(r) for name, r in samples.items()}
    plain_data = [str(p) for p in sorted(plain.glob("*.xwd"))]
    g = json.loads(subprocess.check_output([PY, str(HERE / "baselines.py"), "gzip9", str(gzip_sample), *plain_data]))
    print(
        f"  gzip-9 on {g['sample_bytes'] / 1e6:.0f} MB of plain XOR: {g['ratio']:.3f}x at {g['bytes_per_s'] / 1e6:.1f} MB/s"
    )
    sizes = {
        "model_tensor_bytes": nbytes,
        "model_files_bytes": du(ft),
        "delta_bytes": du(delta),
        "delta_v2_bytes": du(delta_v2),
        "delta_plain_bytes": du(plain),
        "gzip9_estimated_bytes": int(du(plain) / g["ratio"]),
    }
    shutil.rmtree(root, ignore_errors=True)
    return {
        "size": size,
        "runs": {k: {**asdict(v), "gbps": v.gbps} for k, v in runs.items()},
        "samples_seconds": {k: [r.seconds for r in v] for k, v in samples.items()},
        "gzip9": g,
        "sizes": sizes,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "v3_vs_v2": {
            "delta_size_ratio": sizes["delta_bytes"] / sizes["delta_v2_bytes"],
            "decode": codec_comparison(samples, jobs),
        },
    }


Target = tuple[str, str, float, bool]


def target(what: str, wanted: str, value: float, ok: bool) -> Target:
    return (what, wanted, round(value, 3), ok)


def targets(result: dict[str, object]) -> list[Target]:
    """The performance issue's targets, as (what, wanted, measured, met)."""
    out = []
    by_size = result["sizes"]
    assert isinstance(by_size, list)
    big = by_size[-1]
    r = {k: v["seconds"] for k, v in big["runs"].items()}
    s = big["sizes"]

    def add(what: str, wanted: str, value: float, ok: bool) -> None:
        out.append(target(what, wanted, value, ok))

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
    jobs = result["jobs"]
    assert isinstance(jobs, int)
    return out + codec_targets(big, jobs)


def codec_targets(big: dict[str, object], jobs: int) -> list[Target]:
    """The v3 codec's targets, each against v2 on the same model in the same run."""
    runs, cmp = big["runs"], big["v3_vs_v2"]
    assert isinstance(runs, dict) and isinstance(cmp, dict)
    size = cmp["delta_size_ratio"]
    out = [
        target("v3 / v2 delta size, synthetic", "<= 0.85", size, size <= 0.85),
        target("v3 / v2 delta size, synthetic (stretch)", "<= 0.78", size, size <= 0.78),
    ]
    for config, c in cmp["decode"].items():
        out.append(
            target(f"v3 / v2 decode, {config}, medians", "<= 1.0", c["ratio_of_medians"], c["ratio_of_medians"] <= 1.0)
        )
        out.append(
            target(f"v3 / v2 decode, {config}, per round", "<= 1.0", c["paired_ratio"], c["paired_ratio"] <= 1.0)
        )
    floor = runs["floor, disk"]["seconds"]
    for n in COMPARED_JOBS:
        name = decode_name("v3", "disk", n, jobs)
        if name != "decode":  # "decode / floor, disk" above is this one
            t = runs[name]["seconds"] / floor
            out.append(target(f"v3 decode, disk, --jobs {n} / floor, disk", "<= 1.3", t, t <= 1.3))
    v3_rss = max(c["v3_max_rss_mib"] for c in cmp["decode"].values())
    rss_ratio = max(c["v3_max_rss_mib"] / c["v2_max_rss_mib"] for c in cmp["decode"].values())
    out.append(target("v3 decode peak RSS, MiB", "<= 300", v3_rss, v3_rss <= 300))
    out.append(target("v3 / v2 decode peak RSS, worst place+jobs", "<= 1.1", rss_ratio, rss_ratio <= 1.1))
    gzip_speed = big["gzip9"]["bytes_per_s"]  # type: ignore[index]
    v2_speed = runs["encode v2 (--codec xor)"]["gbps"] * GB
    out.append(
        target("encode v2 throughput / gzip-9 throughput", ">= 50", v2_speed / gzip_speed, v2_speed >= 50 * gzip_speed)
    )
    return out


def comparison_table(big: dict[str, object]) -> str:
    """v3 against v2 decodes of the largest model, as printed after the targets."""
    cmp = big["v3_vs_v2"]
    assert isinstance(cmp, dict)
    lines = [
        f"v3 / v2 delta size: {cmp['delta_size_ratio']:.3f}",
        f"{'decode':<18} {'v3 s':>7} {'v2 s':>7} {'medians':>8} {'per round':>10} {'rounds':<22} {'v3 MiB':>7} {'v2 MiB':>7}",
    ]
    for config, c in cmp["decode"].items():
        rounds = " ".join(f"{x:.2f}" for x in c["per_round_ratios"])
        lines.append(
            f"{config:<18} {c['v3_seconds']:>7.2f} {c['v2_seconds']:>7.2f} {c['ratio_of_medians']:>8.3f}"
            f" {c['paired_ratio']:>10.3f} {rounds:<22} {c['v3_max_rss_mib']:>7.1f} {c['v2_max_rss_mib']:>7.1f}"
        )
    return "\n".join(lines)


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
    print("\n" + comparison_table(result["sizes"][-1]))  # type: ignore[index]
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
