"""Streaming decode of a Hub delta against downloading it, on a stand-in Hub with a bandwidth limit.

    .venv/bin/python bench/stream.py                       # 1 GB model, 100 and 400 MB/s, 3 rounds
    .venv/bin/python bench/stream.py --rates 100MB --rounds 1 --kills 1

It makes the synthetic pair (bench/synth.py), encodes the delta once, and
serves it as ``org/delta`` from tests/hub_server.py's FakeHub, in this
process, with data files redirected to its CDN port as on the real Hub. The
base stays a local folder. For each bandwidth (``--rates``, bytes per second
of all connections together) and round, each in its own child process with a
fresh Hugging Face cache and a fresh output folder:

- "download alone": huggingface_hub's ``snapshot_download("org/delta")``,
  the time the delta alone takes to arrive (the baseline);
- "stream": ``xorweights decode org/delta --base BASE -o OUT -q``;
- "download-first": the same with ``--download-first`` (today's sum).

Each round also times the write floor (bench/baselines.py ``floor``: read
the base, write and fsync the output's bytes), which no decode can beat.
Rounds alternate the order of all of these. For the stream run it also records
the child's peak RSS, the peak disk use under OUT plus the cache (sampled by
a thread every 50 ms), and the bytes the Hub sent. Then the kill test, at one
bandwidth: the stream decode is SIGKILLed at seeded random times and re-run
into the same OUT and cache, then run to the end; its output must equal the
fine-tune, and all the runs together should fetch little more than the delta.

The runs' outputs and caches go under --scratch (default: the work folder);
``--scratch /dev/shm`` takes the disk's page-cache cost out of every run.
Results go to bench/results/stream-<date>.json; the work folder is deleted
at the end unless --keep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
# bench/ is a folder of scripts, not a package; run.py is a sibling script and
# the stand-in Hub lives with the tests that check it.
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))
from hub_server import FakeHub, serve  # noqa: E402
from run import GB, PY, XW, Target, du, free_bytes, parse_size, target, timed, tree_hash  # noqa: E402

REPO = "org/delta"
CASES = ("download alone", "stream", "download-first")
# Not a target's baseline but what explains the stream's time: reading the base once and writing
# (and fsyncing) the output once, as any decode must. On the 2-core VM this was written on, a GB
# written to ext4 cost from 0.4 to 12 s of kernel time, depending on how recently memory was touched.
FLOOR = "write floor"
REDIRECT_MIN_BYTES = 1 << 20  # data files go through the CDN redirect, as LFS files do on the Hub
POLL_S = 0.05
DOWNLOAD = f"from huggingface_hub import snapshot_download; snapshot_download({REPO!r})"
# A child started with vfork shares this process's memory until it execs, and the kernel then
# carries this process's peak RSS into the child's ru_maxrss. The Hub here maps the delta and
# touches every page of it, so each child would report at least the delta's size. A forked
# child gets its own copy and reports only its own peak.
subprocess._USE_VFORK = False  # type: ignore[misc]


# ---------------------------------------------------------------- disk use


def disk_bytes(folders: list[Path]) -> int:
    """Bytes of data the files under ``folders`` hold on disk.

    A file counts for the smaller of its size and its allocated blocks: a
    sparse output file takes only what was written, while the block count of
    a dense one rounds up. Links are not followed, so the Hugging Face cache's
    snapshot links do not count its blobs twice. Files may vanish mid-walk
    (a rename, a cleanup): they are skipped.
    """
    total = 0
    stack = [str(f) for f in folders]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    total += min(st.st_size, st.st_blocks * 512)
            except FileNotFoundError:
                continue
    return total


class DiskPoller:
    """The peak of :func:`disk_bytes` over a ``with`` block, sampled in a thread.

    A peak that lasts less than ``interval`` can be missed; one sample is
    taken on entry and one on exit, so a block shorter than that is still seen.
    """

    def __init__(self, folders: list[Path], interval: float = POLL_S) -> None:
        self.folders = folders
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        self.peak = max(self.peak, disk_bytes(self.folders))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> DiskPoller:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ---------------------------------------------------------------- one run


@dataclass
class Paths:
    """The work folder's layout."""

    work: Path
    scratch: Path  # where each run's output folder and Hugging Face cache go

    @property
    def base(self) -> Path:
        return self.work / "base"

    @property
    def finetuned(self) -> Path:
        return self.work / "finetuned"

    @property
    def delta(self) -> Path:
        return self.work / "delta"

    @property
    def cwd(self) -> Path:
        return self.work / "cwd"  # empty, so "org/delta" never names a local folder

    def run_dir(self, name: str) -> Path:
        return self.runs / name.replace(" ", "-")

    @property
    def runs(self) -> Path:
        return self.scratch / f"xorweights-bench-stream-{os.getpid()}"


@dataclass
class Sample:
    """One timed child: what it cost, and what the Hub sent it."""

    case: str
    rate: float
    round: int
    seconds: float
    cpu_seconds: float  # user + system of the child
    max_rss_mib: float
    served: int  # body bytes the Hub sent for REPO while the child ran
    server_cpu_seconds: float  # this process (the Hub's threads and the poller) meanwhile
    disk_peak: int | None = None  # stream only: peak bytes under OUT + cache
    out_bytes: int | None = None  # stream only: bytes under OUT at the end
    disk_samples: int | None = None


def point_children_at(hub: FakeHub, run_dir: Path) -> None:
    """Make the next child use the stand-in Hub and a cache of its own.

    run.py's ``timed`` passes no environment, so children inherit ours; this
    process never imports huggingface_hub, so changing it here is safe.
    """
    for key in [k for k in os.environ if k.startswith(("HF_", "HUGGINGFACE_")) or "proxy" in k.lower()]:
        del os.environ[key]  # a token or proxy of the user's must not reach the stand-in Hub
    os.environ.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(run_dir / "cache"),
        HF_HOME=str(run_dir / "home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_OFFLINE="0",
        NO_PROXY="127.0.0.1,localhost",
    )


def case_argv(case: str, paths: Paths, out: Path, nbytes: int) -> list[str]:
    if case == "download alone":
        return [PY, "-c", DOWNLOAD]
    if case == FLOOR:
        inputs = [str(p) for p in sorted(paths.base.glob("*.safetensors"))]
        return [PY, str(HERE / "baselines.py"), "floor", str(out.parent / "floor.bin"), str(nbytes), *inputs]
    argv = [*XW, "decode", REPO, "--base", str(paths.base), "-o", str(out), "-q"]
    return argv + ["--download-first"] if case == "download-first" else argv


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_case(case: str, hub: FakeHub, paths: Paths, rnd: int, nbytes: int) -> Sample:
    """One timed run of ``case`` into a fresh cache and output folder, which are then deleted."""
    run_dir = paths.run_dir(case)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    out, cache = run_dir / "out", run_dir / "cache"
    point_children_at(hub, run_dir)
    os.sync()  # the previous run's writeback must not land on this one
    served, cpu = hub.served.get(REPO, 0), self_cpu()
    name = case if case == FLOOR else f"{case}, {(hub.rate or 0) / 1e6:.0f} MB/s"
    extra: dict[str, int] = {}
    if case == "stream":
        with DiskPoller([out, cache]) as poll:
            run = timed(name, case_argv(case, paths, out, nbytes), nbytes)
        extra = {"disk_peak": poll.peak, "out_bytes": disk_bytes([out]), "disk_samples": poll.samples}
    else:
        run = timed(name, case_argv(case, paths, out, nbytes), nbytes)
    served_now, cpu_now = hub.served.get(REPO, 0) - served, self_cpu() - cpu
    rate = 0.0 if case == FLOOR else hub.rate or 0.0
    return Sample(case, rate, rnd, run.seconds, run.cpu_seconds, run.max_rss_mib, served_now, cpu_now, **extra)


def check_output(out: Path, reference: str, what: str) -> None:
    if tree_hash(out) != reference:
        raise SystemExit(f"{what}: the decoded folder differs from the fine-tune")


# ---------------------------------------------------------------- rounds


def measure_rates(
    hub: FakeHub, paths: Paths, rates: list[float], rounds: int, nbytes: int, reference: str
) -> list[Sample]:
    """Every case at every rate, and the write floor, ``rounds`` times; odd rounds run them in reverse.

    Alternating the order keeps one case from always following another's
    writeback or warming the page cache for it. Each decode's output is
    compared with the fine-tune in the first round.
    """
    samples = []
    for rnd in range(rounds):
        steps = [(FLOOR, 0.0)] + [(case, rate) for rate in rates for case in CASES]
        for case, rate in steps if rnd % 2 == 0 else steps[::-1]:
            hub.rate = rate or None
            samples.append(run_case(case, hub, paths, rnd, nbytes))
            if case in ("stream", "download-first") and rnd == 0:
                check_output(paths.run_dir(case) / "out", reference, f"{case} at {rate / 1e6:.0f} MB/s")
            shutil.rmtree(paths.run_dir(case), ignore_errors=True)
    return samples


def summarize_rate(samples: list[Sample], rate: float, delta_bytes: int) -> dict[str, object]:
    """One bandwidth's medians, per-round ratios against "download alone", and the stream run's costs."""
    by_case = {c: sorted((s for s in samples if s.rate == rate and s.case == c), key=lambda s: s.round) for c in CASES}
    seconds = {c: [s.seconds for s in by_case[c]] for c in CASES}
    download = seconds["download alone"]
    medians = {c: statistics.median(seconds[c]) for c in CASES}
    row: dict[str, object] = {"rate_bytes_per_s": rate, "median_seconds": medians}
    for case, key in (("stream", "stream_over_download"), ("download-first", "download_first_over_download")):
        per_round = [a / b for a, b in zip(seconds[case], download, strict=True)]
        row[key] = {
            "ratio_of_medians": medians[case] / medians["download alone"],
            "median_per_round": statistics.median(per_round),
            "per_round": per_round,
        }
    stream = by_case["stream"]
    row["stream"] = {
        "max_rss_mib": max(s.max_rss_mib for s in stream),
        "median_cpu_seconds": statistics.median(s.cpu_seconds for s in stream),
        "disk_peak_over_output_fraction_of_delta": max(
            ((s.disk_peak or 0) - (s.out_bytes or 0)) / delta_bytes for s in stream
        ),
        "served_over_delta": max(s.served / delta_bytes for s in stream),
    }
    # The best overlap of fetching and writing: the slower of the two alone, in the same round.
    floor = [s.seconds for s in sorted((s for s in samples if s.case == FLOOR), key=lambda s: s.round)]
    if len(floor) == len(download):
        per_round = [a / max(b, c) for a, b, c in zip(seconds["stream"], download, floor, strict=True)]
        row["stream_over_slower_of_download_and_floor"] = {
            "median_per_round": statistics.median(per_round),
            "per_round": per_round,
        }
    row["download_alone_effective_mb_per_s"] = delta_bytes / medians["download alone"] / 1e6
    row["median_cpu_seconds"] = {c: statistics.median(s.cpu_seconds for s in by_case[c]) for c in CASES}
    row["median_server_cpu_seconds"] = {c: statistics.median(s.server_cpu_seconds for s in by_case[c]) for c in CASES}
    row["max_rss_mib"] = {c: max(s.max_rss_mib for s in by_case[c]) for c in CASES}
    return row


def summarize_floor(samples: list[Sample]) -> dict[str, object]:
    floor = sorted((s for s in samples if s.case == FLOOR), key=lambda s: s.round)
    return {
        "median_seconds": statistics.median(s.seconds for s in floor),
        "per_round": [s.seconds for s in floor],
        "median_cpu_seconds": statistics.median(s.cpu_seconds for s in floor),
    }


# ---------------------------------------------------------------- kill test


@dataclass
class KillResult:
    rate: float
    expected_seconds: float
    runs: int = 0
    kills: list[dict[str, float]] = field(default_factory=list)  # per killed run: when, and what it fetched
    finished_before_kill: int = 0
    final_seconds: float = 0.0
    final_max_rss_mib: float = 0.0
    served: int = 0
    served_over_delta: float = 0.0
    matches: bool = False


def kill_after(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """SIGKILL ``proc`` (our own child) after ``seconds``; False if it had finished by then."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    if proc.returncode:
        raise SystemExit(f"kill test: a stream decode failed on its own with exit code {proc.returncode}")
    return False


def kill_test(
    hub: FakeHub, paths: Paths, kills: int, expected: float, seed: int, delta_bytes: int, nbytes: int, reference: str
) -> KillResult:
    """Stream into one OUT and cache, SIGKILLed ``kills`` times, then to the end.

    Each kill falls uniformly between 10% and 90% of the time that run is
    expected to take: the full stream time scaled by the share of the delta
    not yet fetched, since a re-run only fetches what is left. A kill drawn
    on the full time would often come after a resumed run had finished.
    """
    rng = random.Random(seed)
    result = KillResult(hub.rate or 0.0, expected)
    run_dir = paths.run_dir("kill test")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    out = run_dir / "out"
    point_children_at(hub, run_dir)
    argv = case_argv("stream", paths, out, nbytes)
    start = hub.served.get(REPO, 0)
    for _ in range(kills):
        left = max(0.1, 1 - (hub.served.get(REPO, 0) - start) / delta_bytes)
        after = rng.uniform(0.1, 0.9) * expected * left
        before = hub.served.get(REPO, 0)
        killed = kill_after(subprocess.Popen(argv, stdout=subprocess.DEVNULL), after)
        result.runs += 1
        result.finished_before_kill += not killed
        result.kills.append({"after_seconds": after, "served": hub.served.get(REPO, 0) - before, "killed": killed})
        print(f"  kill test run {result.runs}: {'killed' if killed else 'finished'} after {after:.2f} s", flush=True)
    final = timed(f"kill test, final run {result.runs + 1}", argv, nbytes)
    result.runs += 1
    result.final_seconds, result.final_max_rss_mib = final.seconds, final.max_rss_mib
    result.served = hub.served.get(REPO, 0) - start
    result.served_over_delta = result.served / delta_bytes
    result.matches = tree_hash(out) == reference
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ---------------------------------------------------------------- targets and report


def targets(rows: list[dict[str, object]], kill: dict[str, object] | None) -> list[Target]:
    """The issue's targets, as (what, wanted, measured, met)."""
    out = []
    for row in rows:
        mb = f"{row['rate_bytes_per_s'] / 1e6:.0f} MB/s"  # type: ignore[operator]
        ratio, stream = row["stream_over_download"], row["stream"]
        assert isinstance(ratio, dict) and isinstance(stream, dict)
        for how, key in (("medians", "ratio_of_medians"), ("per round", "median_per_round")):
            out.append(target(f"stream / download alone, {mb}, {how}", "<= 1.1", ratio[key], ratio[key] <= 1.1))
        rss = stream["max_rss_mib"]
        out.append(target(f"stream peak RSS MiB, {mb}", "<= 300", rss, rss <= 300))
        disk = stream["disk_peak_over_output_fraction_of_delta"]
        out.append(target(f"stream (peak disk - output) / delta, {mb}", "<= 0.01", disk, disk <= 0.01))
    if kill is not None:
        out.append(
            target("kill test: output equals the fine-tune", "yes", float(bool(kill["matches"])), bool(kill["matches"]))
        )
        served = kill["served_over_delta"]
        assert isinstance(served, float)
        out.append(target("kill test: served / delta, all runs", "<= 1.1", served, served <= 1.1))
    return out


def case_line(label: str, runs: list[Sample]) -> str:
    """One case's median wall time, each round's, and the child's median CPU, Hub CPU and peak RSS."""
    runs = sorted(runs, key=lambda s: s.round)
    secs = " ".join(f"{s.seconds:.2f}" for s in runs)
    median = statistics.median(s.seconds for s in runs)
    cpu = statistics.median(s.cpu_seconds for s in runs)
    server = statistics.median(s.server_cpu_seconds for s in runs)
    rss = max(s.max_rss_mib for s in runs)
    return f"{label:<24} {median:>8.2f}  {secs:<20} {cpu:>6.2f} {server:>7.2f} {rss:>7.1f}"


def print_table(rows: list[dict[str, object]], samples: list[Sample], delta_bytes: int) -> None:
    print(f"\n{'case':<24} {'median s':>8}  {'rounds s':<20} {'cpu s':>6} {'hub cpu':>7} {'RSS MiB':>7}")
    print(case_line(FLOOR + ", local", [s for s in samples if s.case == FLOOR]))
    for row in rows:
        rate = row["rate_bytes_per_s"]
        assert isinstance(rate, float | int)
        for case in CASES:
            print(
                case_line(f"{case}, {rate / 1e6:.0f} MB/s", [s for s in samples if s.rate == rate and s.case == case])
            )
        for key, label in (
            ("stream_over_download", "stream / download"),
            ("download_first_over_download", "download-first / download"),
            ("stream_over_slower_of_download_and_floor", "stream / max(download, floor)"),
        ):
            r = row.get(key)
            if isinstance(r, dict):
                rounds = " ".join(f"{x:.2f}" for x in r["per_round"])
                medians = f"medians {r['ratio_of_medians']:.3f}, " if "ratio_of_medians" in r else ""
                print(f"  {label:<30} {medians}per round {r['median_per_round']:.3f} ({rounds})")
        st = row["stream"]
        assert isinstance(st, dict)
        print(
            f"  stream: peak disk - output = {st['disk_peak_over_output_fraction_of_delta']:.4%} of the delta,"
            f" served {st['served_over_delta']:.3f} x delta; download alone ran at"
            f" {row['download_alone_effective_mb_per_s']:.0f} MB/s ({delta_bytes / 1e6:.0f} MB)"
        )


def print_targets(checks: list[Target]) -> None:
    print(f"\n{'target':<48} {'wanted':<8} {'measured':>9}  met")
    for what, wanted, value, ok in checks:
        print(f"{what:<48} {wanted:<8} {value:>9.3f}  {'yes' if ok else 'NO'}")


# ---------------------------------------------------------------- setup


def prepare(paths: Paths, size: int) -> tuple[int, str]:
    """Make the pair and encode the delta; return the tensor bytes and the fine-tune's tree hash.

    A child makes the model, so this process stays small: it also serves the delta.
    """
    shutil.rmtree(paths.work, ignore_errors=True)
    paths.work.mkdir(parents=True)
    paths.cwd.mkdir()
    t0 = time.perf_counter()
    nbytes = int(subprocess.check_output([PY, str(HERE / "synth.py"), str(paths.work), str(size)]))
    print(f"  generated base + fine-tune ({nbytes / GB:.2f} GB of tensors each) in {time.perf_counter() - t0:.0f} s")
    encode = [*XW, "encode", str(paths.finetuned), "--base", str(paths.base), "-o", str(paths.delta), "-q"]
    subprocess.check_call(encode, stdout=subprocess.DEVNULL)
    return nbytes, tree_hash(paths.finetuned)


def check_space(paths: Paths, size: int) -> None:
    """Exit unless there is room for the model pair and delta, and for one run's output and cached delta."""
    work, scratch = paths.work.parent, paths.scratch
    need = {work: int(2.5 * size * 1.2) + GB}  # base, fine-tune, delta
    need[scratch] = need.get(scratch, 0) + int(1.5 * size * 1.2)  # output, cache, resume state
    if work != scratch and os.stat(work).st_dev == os.stat(scratch).st_dev:
        need = {work: sum(need.values())}
    for folder, wanted in need.items():
        if free_bytes(folder) < wanted:
            sys.exit(
                f"bench: {folder} has {free_bytes(folder) / GB:.1f} GB free; a {size / GB:.1f} GB run needs about"
                f" {wanted / GB:.1f} GB there. Free some space, or pass --work or --scratch."
            )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GB", help="model size (default 1GB; the synthetic minimum is about 0.93 GB)")
    ap.add_argument("--rates", default="100MB,400MB", help="bandwidths per second, comma-separated")
    ap.add_argument("--kill-rate", default="400MB", help="bandwidth of the kill test")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs in the kill test (0: no kill test)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the kill times")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/work/bench-stream"), help="model and delta")
    ap.add_argument(
        "--scratch",
        type=Path,
        help="where the outputs and caches of the runs go (default: --work); /dev/shm takes the disk out",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / f"stream-{dt.date.today().isoformat()}.json")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (model, delta) at the end")
    return ap.parse_args()


def serve_and_measure(args: argparse.Namespace, paths: Paths, size: int) -> tuple[dict[str, object], list[Sample]]:
    """Make the model, serve its delta, run every measurement; the work folder goes at the end unless --keep."""
    rates, kill_rate = [parse_size(r) for r in args.rates.split(",")], parse_size(args.kill_rate)
    cwd = Path.cwd()
    try:
        nbytes, reference = prepare(paths, size)
        os.chdir(paths.cwd)
        hub = FakeHub()
        hub.redirect_min_bytes = REDIRECT_MIN_BYTES
        sha = hub.commit(REPO, paths.delta)
        delta_bytes = sum(len(d) for d in hub.repos[REPO].commits[sha].values())
        print(f"  delta: {delta_bytes / 1e6:.0f} MB ({du(paths.delta) / 1e6:.0f} MB on disk)", flush=True)
        with serve(hub):
            samples = measure_rates(hub, paths, rates, args.rounds, nbytes, reference)
            rows = [summarize_rate(samples, r, delta_bytes) for r in rates]
            floor = summarize_floor(samples)
            kill = None
            if args.kills:
                hub.rate = kill_rate
                expected = expected_stream_seconds(hub, paths, rows, samples, nbytes)
                kill = kill_test(hub, paths, args.kills, expected, args.seed, delta_bytes, nbytes, reference)
    finally:
        os.chdir(cwd)
        shutil.rmtree(paths.runs, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(paths.work, ignore_errors=True)
    measured = {
        "model_tensor_bytes": nbytes,
        "delta_bytes": delta_bytes,
        "rates": rows,
        "write_floor": floor,
        "samples": [asdict(s) for s in samples],
        "kill_test": asdict(kill) if kill else None,
    }
    return measured, samples


def expected_stream_seconds(
    hub: FakeHub, paths: Paths, rows: list[dict[str, object]], samples: list[Sample], nbytes: int
) -> float:
    """The median stream time at the hub's current rate, or one stream run's when that rate was not measured."""
    times = [s.seconds for s in samples if s.case == "stream" and s.rate == hub.rate]
    if times:
        return statistics.median(times)
    seconds = run_case("stream", hub, paths, 0, nbytes).seconds
    shutil.rmtree(paths.run_dir("stream"), ignore_errors=True)
    return seconds


def report(measured: dict[str, object], samples: list[Sample], kill_rate: float) -> list[Target]:
    """Print the table, the kill test and the targets; return the targets."""
    rows, kill = measured["rates"], measured["kill_test"]
    assert isinstance(rows, list) and isinstance(measured["delta_bytes"], int)
    print_table(rows, samples, measured["delta_bytes"])
    if isinstance(kill, dict):
        print(
            f"\nkill test at {kill_rate / 1e6:.0f} MB/s: {kill['runs']} runs ({kill['finished_before_kill']} finished"
            f" before their kill), output {'equals' if kill['matches'] else 'DIFFERS from'} the fine-tune,"
            f" served {kill['served_over_delta']:.3f} x delta"
        )
    checks = targets(rows, kill if isinstance(kill, dict) else None)
    print_targets(checks)
    return checks


def main() -> None:
    args = parse_args()
    size = parse_size(args.size)
    work = args.work.resolve()
    paths, out_json = Paths(work, (args.scratch or work).resolve()), args.out.resolve()
    paths.work.parent.mkdir(parents=True, exist_ok=True)
    paths.scratch.mkdir(parents=True, exist_ok=True)
    check_space(paths, size)
    load_before = os.getloadavg()
    measured, samples = serve_and_measure(args, paths, size)
    checks = report(measured, samples, parse_size(args.kill_rate))
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "rounds": args.rounds,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        **measured,
        "targets": [dict(zip(("what", "wanted", "measured", "met"), c, strict=True)) for c in checks],
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out_json}")


if __name__ == "__main__":
    main()
