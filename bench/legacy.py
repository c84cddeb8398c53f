"""decode-legacy against the steps OpenAssistant's whole-file XOR release asked users to run.

    .venv/bin/python bench/legacy.py --workdir /work/bench-legacy --size 1GB --rounds 5

It makes a LLaMA-shaped fp16 base and fine-tune (bench/synth.py), builds a
whole-file XOR release from them with the small encoder below (written from
the codec's documented semantics, independent of xorweights), writes md5 lists
of the base and of the fine-tune in md5sum's format, then times, interleaved
and repeated, each side in child processes with their peak RSS:

(a) the reference steps: the codec's decode (bench/baselines.py xor4k, a
    faithful re-implementation of xor_codec.py), then ``md5sum -c`` of the
    base files and then of the output files against the lists, one after the
    other, as the release's instructions have users do;
(b) ``python -m xorweights decode-legacy`` with both lists, which checks the
    same md5s itself.

The page cache cannot be dropped without root, so each side runs once to warm
it before the timed rounds: both read their inputs from memory alike. A sync
before every run keeps one run's writeback off the next. Results go to
bench/results/legacy-<date>.json; the multi-GB files are deleted at the end
(keep them with --keep).
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

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
# bench/ is a folder of scripts, not a package; run.py is a sibling script.
sys.path.insert(0, str(HERE))
from run import GB, parse_size  # noqa: E402

BLOCK = 16 << 20
# A file the fine-tune adds, with no counterpart in the base: the codec copies it as it is.
ADDED_TOKENS = b'{"<|prompter|>": 32000, "<|assistant|>": 32001, "<|system|>": 32002}'


# ---------------------------------------------------------------- the release


def legacy_encode(finetuned: Path, base: Path, payload: Path) -> None:
    """What ``xor_codec.py --encode`` does, file by file, streamed.

    Every top-level file of the fine-tune is XORed with the base file of the
    same name; where the base is shorter it counts as zeros (so the rest of the
    fine-tune is stored in the clear), where it is longer it is cut. A file
    with no counterpart in the base is copied as it is.
    """
    payload.mkdir(parents=True)
    for src in sorted(p for p in finetuned.iterdir() if p.is_file()):
        counterpart = base / src.name
        if not counterpart.is_file():
            shutil.copyfile(src, payload / src.name)
            continue
        with src.open("rb") as f, counterpart.open("rb") as b, (payload / src.name).open("wb") as out:
            while block := f.read(BLOCK):
                data = np.frombuffer(block, dtype=np.uint8)
                key = np.zeros(len(data), dtype=np.uint8)
                other = b.read(len(data))
                key[: len(other)] = np.frombuffer(other, dtype=np.uint8)
                out.write((data ^ key).tobytes())


def md5_list(folder: Path, dest: Path) -> Path:
    """``md5sum *`` of a folder's files, in md5sum's format."""
    lines = []
    for p in sorted(p for p in folder.iterdir() if p.is_file()):
        h = hashlib.md5(usedforsecurity=False)
        with p.open("rb") as f:
            while block := f.read(BLOCK):
                h.update(block)
        lines.append(f"{h.hexdigest()}  {p.name}\n")
    dest.write_text("".join(lines))
    return dest


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ---------------------------------------------------------------- timing


@dataclass
class Sample:
    seconds: float
    max_rss_mib: float  # the largest of the side's child processes
    parts: dict[str, float]  # seconds of each child, for the reference side


def run_children(steps: list[tuple[str, list[str], Path | None]]) -> Sample:
    """Run the children one after the other; wall time of them all, and the largest peak RSS among them."""
    parts, rss = {}, 0.0
    start = time.perf_counter()
    for name, argv, cwd in steps:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        if code:
            raise SystemExit(f"{name} failed with exit code {code}: {' '.join(argv)}")
        parts[name] = time.perf_counter() - t
        rss = max(rss, usage.ru_maxrss / 1024)
    return Sample(time.perf_counter() - start, rss, parts)


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-legacy"))
    ap.add_argument("--size", default="1GB", help="model size, e.g. 1GB or 500MB (default 1GB)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of each side (at least 5 is wise)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    size = parse_size(args.size)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # base, fine-tune, payload and one output at a time, each about `size`, with room to spare
    need = int(4 * size * 1.25)
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        sys.exit(
            f"bench: {args.workdir} has {free / GB:.1f} GB free; a {size / GB:.1f} GB run needs about "
            f"{need / GB:.1f} GB. Free some space, pass --workdir or a smaller --size."
        )
    root = args.workdir / f"legacy-{size // 10**6}MB"
    clear(root)
    try:
        result = bench(root, size, args.rounds)
    finally:
        if not args.keep:
            clear(root)
    result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"legacy-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")


def bench(root: Path, size: int, rounds: int) -> dict[str, object]:
    t0 = time.perf_counter()
    # A child makes the model, so this process stays small.
    nbytes = int(subprocess.check_output([PY, str(HERE / "synth.py"), str(root), str(size)]))
    base, ft = root / "base", root / "finetuned"
    (ft / "added_tokens.json").write_bytes(ADDED_TOKENS)
    payload = root / "payload"
    legacy_encode(ft, base, payload)
    base_md5, out_md5 = md5_list(base, root / "base.md5"), md5_list(ft, root / "out.md5")
    print(
        f"release: {du(payload) / GB:.2f} GB payload, {du(base) / GB:.2f} GB base "
        f"({len(list(payload.iterdir()))} files), made in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    out = root / "out"
    reference = [
        (
            "xor_codec decode (xor4k)",
            [PY, str(HERE / "baselines.py"), "xor4k", str(payload), str(base), str(out)],
            None,
        ),
        ("md5sum -c base", ["md5sum", "-c", "--quiet", str(base_md5)], base),
        ("md5sum -c output", ["md5sum", "-c", "--quiet", str(out_md5)], out),
    ]
    ours = [
        (
            "decode-legacy",
            [PY, "-m", "xorweights", "decode-legacy", str(payload), "--base", str(base), "-o", str(out)]
            + ["--base-md5", str(base_md5), "--out-md5", str(out_md5), "-q"],
            ROOT,
        )
    ]
    sides = {"reference": reference, "decode-legacy": ours}

    def once(name: str) -> Sample:
        clear(out)
        os.sync()
        sample = run_children(sides[name])
        clear(out)
        return sample

    for name in sides:  # warm the page cache for both alike; not counted
        once(name)
    samples: dict[str, list[Sample]] = {name: [] for name in sides}
    print(f"\n{'round':<6} {'reference s':>12} {'decode-legacy s':>16} {'ratio':>7} {'RSS MiB':>8}")
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate, so drift hits both sides alike
        for name in order:
            samples[name].append(once(name))
        a, b = samples["reference"][-1], samples["decode-legacy"][-1]
        print(f"{r + 1:<6} {a.seconds:>12.2f} {b.seconds:>16.2f} {a.seconds / b.seconds:>7.2f} {b.max_rss_mib:>8.1f}")
    ratios = [a.seconds / b.seconds for a, b in zip(samples["reference"], samples["decode-legacy"], strict=True)]
    med = {name: statistics.median(s.seconds for s in runs) for name, runs in samples.items()}
    parts = {
        part: statistics.median(s.parts[part] for s in samples["reference"]) for part in samples["reference"][0].parts
    }
    rss = max(s.max_rss_mib for s in samples["decode-legacy"])
    ratio = med["reference"] / med["decode-legacy"]
    print(f"{'median':<6} {med['reference']:>12.2f} {med['decode-legacy']:>16.2f} {ratio:>7.2f} {rss:>8.1f}")
    print("  reference parts (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    print(f"  median of the paired ratios {statistics.median(ratios):.2f}, range {min(ratios):.2f}..{max(ratios):.2f}")
    print(f"  target: reference / decode-legacy >= 1.5: {'met' if ratio >= 1.5 else 'NOT met'}")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model_tensor_bytes": nbytes,
        "payload_bytes": du(payload),
        "base_bytes": du(base),
        "rounds": rounds,
        "notes": [
            "page cache not dropped (no root): each side ran once untimed first, so both read warm inputs",
            "reference = xor4k decode, then md5sum -c of the base list, then of the output list, sequentially",
            "decode-legacy = python -m xorweights decode-legacy --base-md5 --out-md5 -q",
            "rounds alternate which side runs first; os.sync() before every run",
        ],
        "samples": {name: [asdict(s) for s in runs] for name, runs in samples.items()},
        "median_seconds": med,
        "reference_parts_median_seconds": parts,
        "paired_ratios": ratios,
        "median_paired_ratio": statistics.median(ratios),
        "ratio_of_medians": ratio,
        "decode_legacy_peak_rss_mib": rss,
        "target": {"what": "reference / decode-legacy", "wanted": ">= 1.5", "met": ratio >= 1.5},
    }


if __name__ == "__main__":
    main()
