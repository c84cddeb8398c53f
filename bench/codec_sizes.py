"""Delta size by codec, dtype and fine-tune strength, on real (tiny) fine-tunes.

    .venv/bin/python bench/codec_sizes.py                 # about 5 minutes on 2 cores
    .venv/bin/python bench/codec_sizes.py --steps 100     # shorter fine-tunes, all strengths alike

It pretrains bench/real.py's tiny LLaMA once (seed 0), then for each dtype
(float32, float16, bfloat16) and each strength (weak, medium, strong: AdamW at
lr 2e-6, 2e-5 and 2e-4 on real.py's fine-tune data) it rounds the pretrained
weights to the dtype (a fine-tune starts from the published checkpoint),
fine-tunes a copy, and writes base and fine-tune as ``model.safetensors`` in
that dtype. Each pair is encoded with both codecs: v2 (``--codec xor``, the
literal XOR) and v3 (``zigzag-diff``, the default); gzip-9 of the plain XOR
is the reference. A LLaMA-shaped synthetic pair (bench/synth.py) is one more
row. Both deltas of every row are decoded and checked against the fine-tune.

It prints a markdown table and writes bench/results/codecs-<date>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import xorweights

# bench/ is a folder of scripts, not a package; these are sibling scripts.
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import baselines  # noqa: E402
import real  # noqa: E402
import run  # noqa: E402
import synth  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Medium is real.py's default; weak and strong are a decade either side.
STRENGTHS = {"weak": 2e-6, "medium": 2e-5, "strong": 2e-4}
SYNTH_BYTES = 200 * 10**6  # the generator makes at least one 7B-sized layer, ~0.9 GB
GZIP_SAMPLE = 32 << 20  # gzip-9 runs at a few MB/s; its ratio settles well before this


@dataclass(frozen=True)
class Setup:
    """How big the model is and how long it trains."""

    model: dict[str, int]  # TinyLlama's keyword arguments; empty means real.py's size
    pretrain_steps: int
    steps: int
    batch: int
    seq: int


FULL = Setup({}, pretrain_steps=300, steps=300, batch=8, seq=32)
# For tests: a model of a few thousand parameters, a few steps.
QUICK = Setup(dict(vocab=200, hidden=32, intermediate=88, layers=1, heads=2), 5, 3, 2, 8)


@dataclass(frozen=True)
class Case:
    """One base and fine-tune pair and its deltas, in folders below ``root``."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def finetuned(self) -> Path:
        return self.root / "finetuned"

    @property
    def v2(self) -> Path:
        return self.root / "delta-v2"

    @property
    def v3(self) -> Path:
        return self.root / "delta-v3"

    @property
    def plain(self) -> Path:
        return self.root / "delta-plain"


@dataclass(frozen=True)
class Sizes:
    tensor_bytes: int  # of the fine-tune's safetensors files
    v2_bytes: int
    v3_bytes: int
    gzip9_bytes: int  # estimated from gzip-9's ratio on a sample of the plain XOR
    round_trips: bool  # both deltas decoded to the fine-tune, byte for byte

    @property
    def v3_over_v2(self) -> float:
        return self.v3_bytes / self.v2_bytes

    @property
    def gzip9_over_v2(self) -> float:
        return self.gzip9_bytes / self.v2_bytes


@dataclass(frozen=True)
class Row:
    dtype: str
    strength: str  # weak, medium, strong; "synthetic" for bench/synth.py's pair
    lr: float | None
    steps: int | None
    finetune_loss: float | None
    sizes: Sizes

    @property
    def label(self) -> str:
        return f"{self.dtype} {self.strength}"

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "v3_over_v2": self.sizes.v3_over_v2, "gzip9_over_v2": self.sizes.gzip9_over_v2}


# --- making the pairs ----------------------------------------------------------


@contextmanager
def one_thread() -> Iterator[None]:
    """Intra-op threading can reorder float reductions; one thread keeps runs bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretrain(setup: Setup, seed: int) -> real.TinyLlama:
    """real.py's pretraining, in fp32."""
    torch.manual_seed(seed)
    model = real.TinyLlama(**setup.model)
    data = real.MarkovChain(model.embed_tokens.num_embeddings, seed=1000 + seed)
    real._train(model, data.batches(setup.batch, setup.seq), setup.pretrain_steps, 1e-3, 0.01)
    return model


def finetune(
    pretrained: real.TinyLlama, dtype: torch.dtype, lr: float, setup: Setup, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Fine-tune a copy from the dtype-rounded checkpoint; return base and fine-tune in ``dtype``, and the loss."""
    model = copy.deepcopy(pretrained)
    # Fine-tunes start from the *published* checkpoint: rounding first keeps
    # updates below half an ulp from flipping bits through the fp32 start point.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    base = {n: p.detach().to(dtype).clone() for n, p in model.named_parameters()}
    # A fresh chain per fine-tune: every dtype and strength sees the same batches.
    vocab = model.embed_tokens.num_embeddings
    data = real.MarkovChain(vocab, seed=2000 + seed, tokens=int(vocab * 0.6))
    loss = real._train(model, data.batches(setup.batch, setup.seq), setup.steps, lr, 0.0)
    ft = {n: p.detach().to(dtype).clone() for n, p in model.named_parameters()}
    return base, ft, loss


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"})


# --- measuring a pair ------------------------------------------------------------


def encode_both(case: Case) -> None:
    """The v2 and v3 deltas, and the plain XOR that gzip-9 is measured on."""
    for out, codec, compress in ((case.v2, "xor", True), (case.v3, "zigzag-diff", True), (case.plain, "xor", False)):
        shutil.rmtree(out, ignore_errors=True)
        # The synthetic fine-tune adds 16 vocabulary rows; both codecs store them in the clear.
        xorweights.encode(case.finetuned, case.base, out, codec=codec, compress=compress, allow_unprotected=True)


def round_trips(case: Case) -> bool:
    """Decode both deltas and compare with the fine-tune; the rebuilds are deleted after."""
    original = run.tree_hash(case.finetuned)
    ok = True
    for delta in (case.v2, case.v3):
        out = case.root / "rebuilt"
        shutil.rmtree(out, ignore_errors=True)
        xorweights.decode(delta, case.base, out)
        ok &= run.tree_hash(out) == original
        shutil.rmtree(out)
    return ok


def gzip9_bytes(case: Case) -> int:
    """gzip-9's size for the plain XOR, from its ratio on an evenly spread sample."""
    data = sorted(case.plain.glob("*.xwd"))
    ratio = baselines.gzip9(GZIP_SAMPLE, data)["ratio"]
    return int(sum(p.stat().st_size for p in data) / ratio)


def measure(case: Case) -> Sizes:
    """Encode ``case`` both ways and check both deltas; the plain XOR is deleted after."""
    encode_both(case)
    sizes = Sizes(
        tensor_bytes=sum(p.stat().st_size for p in case.finetuned.glob("*.safetensors")),
        v2_bytes=run.du(case.v2),
        v3_bytes=run.du(case.v3),
        gzip9_bytes=gzip9_bytes(case),
        round_trips=round_trips(case),
    )
    shutil.rmtree(case.plain)
    return sizes


def progress(row: Row) -> None:
    s = row.sizes
    print(
        f"  {row.label:<20} v2 {s.v2_bytes / 1e6:8.2f} MB  v3 {s.v3_bytes / 1e6:8.2f} MB  v3/v2 {s.v3_over_v2:.3f}"
        f"  round trips: {'yes' if s.round_trips else 'NO'}",
        flush=True,
    )


def real_case(work: Path, dtype: str, strength: str) -> Case:
    return Case(work / f"{dtype}-{strength}")


def real_rows(work: Path, setup: Setup, seed: int = 0) -> list[Row]:
    """Every dtype x strength: fine-tune, write, encode with both codecs, check."""
    rows = []
    with one_thread():
        start = time.perf_counter()
        pretrained = pretrain(setup, seed)
        print(f"  pretrained in {time.perf_counter() - start:.0f} s", flush=True)
        for dtype_name, dtype in DTYPES.items():
            for strength, lr in STRENGTHS.items():
                case = real_case(work, dtype_name, strength)
                base, ft, loss = finetune(pretrained, dtype, lr, setup, seed)
                write_checkpoint(case.base, base)
                write_checkpoint(case.finetuned, ft)
                rows.append(Row(dtype_name, strength, lr, setup.steps, loss, measure(case)))
                progress(rows[-1])
    return rows


def synthetic_row(work: Path, size: int) -> Row:
    case = Case(work / "synthetic")
    synth.make_pair(case.root, size)
    row = Row("float16", "synthetic", None, None, None, measure(case))
    progress(row)
    return row


# --- report ------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        "| dtype | strength | model MB | v2 MB | v3 MB | v3/v2 | gzip-9/v2 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r.sizes
        lines.append(
            f"| {r.dtype} | {r.strength} | {s.tensor_bytes / 1e6:.2f} | {s.v2_bytes / 1e6:.2f} | {s.v3_bytes / 1e6:.2f}"
            f" | {s.v3_over_v2:.3f} | {s.gzip9_over_v2:.3f} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[tuple[str, str, float, bool]]:
    """The issue's size target: v3 <= 0.85x v2 on the synthetic model and real.py's fine-tune (medium) per dtype."""
    out = []
    for r in rows:
        if r.strength in ("medium", "synthetic"):
            ratio = r.sizes.v3_over_v2
            out.append((f"v3 / v2 size, {r.label}", "<= 0.85 (stretch 0.78)", round(ratio, 3), ratio <= 0.85))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where the checkpoints and deltas go (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=FULL.steps, help="fine-tune steps, the same for every strength")
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps, no synthetic row (for tests)")
    ap.add_argument("--synth-size", default="200MB", help="size asked of bench/synth.py (it makes at least ~0.9 GB)")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="folder for codecs-<date>.json")
    args = ap.parse_args()
    setup = QUICK if args.quick else Setup(FULL.model, FULL.pretrain_steps, args.steps, FULL.batch, FULL.seq)
    if setup.steps != FULL.steps and not args.quick:
        print(f"note: {setup.steps} fine-tune steps for every strength (real.py uses {FULL.steps})")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="xorweights-codecs-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        rows = real_rows(work, setup)
        if not args.quick:
            rows.append(synthetic_row(work, run.parse_size(args.synth_size)))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    print(
        f"\nDelta size by dtype and fine-tune strength ({setup.steps} steps; weak/medium/strong = lr {'/'.join(f'{lr:g}' for lr in STRENGTHS.values())}):\n"
    )
    print(table(rows))
    checks = targets(rows)
    print()
    for what, wanted, value, ok in checks:
        print(f"{what:<42} {wanted:<24} {value:>6.3f}  {'yes' if ok else 'NO'}")
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "setup": asdict(setup),
        "strengths_lr": STRENGTHS,
        "seconds": seconds,
        "rows": [r.to_json() for r in rows],
        "targets": [dict(zip(("what", "wanted", "measured", "met"), c, strict=True)) for c in checks],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"codecs-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path} in {seconds:.0f} s")
    if not all(r.sizes.round_trips for r in rows):
        sys.exit("some delta did not decode to its fine-tune: see the rows marked NO above")


if __name__ == "__main__":
    main()
