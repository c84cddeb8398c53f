"""checksum and verify: per-tensor xxh3-128 and per-file sha256 of a checkpoint.

Each weight file is read once: its bytes feed the file's sha256 and, tensor
by tensor, the tensors' xxh3-128. Expected values come from a checksum
manifest or from either side of a delta.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .delta.kernel import DEFAULT_FRAME_BYTES, new_tensor_hash
from .delta.manifest import CHECKSUMS_NAME, MANIFEST_NAME, Checksums, FileSum, TensorSum, load_checksums, load_manifest
from .errors import UsageError
from .hub.resolve import resolve
from .outdir import write_file
from .overlap import refuse_overlap
from .progress import byte_bar
from .readers.checkpoint import Checkpoint


def scan(path: Path, progress: bool = False) -> Checksums:
    """Checksums of every tensor and every file of the checkpoint at ``path``."""
    sums = Checksums()
    with Checkpoint(Path(path)) as ckpt:
        bar = byte_bar(sum(ckpt.tensors[n].nbytes for f in ckpt.weight_files for n in f.names), "checksum", progress)
        for f in ckpt.weight_files:
            # A safetensors file is read once: its bytes feed the file's sha256 and every tensor's xxh3.
            file_hash = hashlib.sha256(f.safetensors.prefix if f.safetensors is not None else b"")
            for name in f.names:
                ref = ckpt.tensors[name]
                h = new_tensor_hash()
                for lo in range(0, ref.nbytes, DEFAULT_FRAME_BYTES):
                    hi = min(lo + DEFAULT_FRAME_BYTES, ref.nbytes)
                    chunk = ref.source.read(lo, hi)
                    h.update(chunk)
                    if f.safetensors is not None:
                        file_hash.update(chunk)
                    ref.source.release(lo, hi)
                    bar.update(hi - lo)
                sums.tensors[name] = TensorSum(ref.dtype, ref.shape, h.hexdigest())
            if ckpt.format != "meta":  # Meta's shards are not files of the converted checkpoint
                rel = f.path.relative_to(ckpt.root).as_posix()
                if f.safetensors is not None:
                    sums.files[rel] = FileSum(f.safetensors.size, file_hash.hexdigest())
                else:
                    sums.files[rel] = FileSum(*ckpt.digest(rel))
        bar.close()
        for rel in ckpt.other_files():
            if rel == CHECKSUMS_NAME:
                continue  # a checksum file cannot list itself
            sums.files[rel] = FileSum(*ckpt.digest(rel))
    return sums


def checksum(path: str | Path, out: str | Path | None = None, progress: bool = False) -> Checksums:
    """Compute a checksum manifest of ``path``; write it to ``out`` when given."""
    if out is not None:
        refuse_overlap(Path(out), {"checkpoint": Path(path)}, out_is_file=True)
    sums = scan(Path(path), progress)
    if out is not None:
        write_file(Path(out), sums.to_json().encode())
    return sums


@dataclass
class VerifyReport:
    checked_tensors: int = 0
    checked_files: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "checked_tensors": self.checked_tensors,
            "checked_files": self.checked_files,
            "problems": self.problems,
        }


def expected_from_delta(delta: Path, side: str) -> tuple[Checksums, bool]:
    """What a checkpoint must hold to be the delta's target or its base.

    Returns the checksums and whether tensors the delta does not name are
    allowed (a base may hold tensors the fine-tune dropped).
    """
    manifest = load_manifest(delta)
    want = Checksums()
    if side == "target":
        for wf in manifest.weight_files:
            want.files[wf.name] = FileSum(wf.size, wf.sha256)
            for t in wf.tensors:
                want.tensors[t.name] = TensorSum(t.dtype, t.shape, t.xxh3)
        for of in manifest.other_files:
            want.files[of.name] = FileSum(of.size, of.sha256)
        return want, False
    if side == "base":
        for t in manifest.tensors():
            if t.base is not None:
                want.tensors[t.base.name] = TensorSum(t.base.dtype, t.base.shape, t.base.xxh3)
        for of in manifest.other_files:
            if of.mode == "reference":
                want.files[of.name] = FileSum(of.size, of.sha256)
        return want, True
    raise UsageError(f"unknown side {side!r}", "use --side target or --side base")


def compare(found: Checksums, want: Checksums, allow_extra_tensors: bool) -> VerifyReport:
    report = VerifyReport()
    for name, w in sorted(want.tensors.items()):
        f = found.tensors.get(name)
        report.checked_tensors += 1
        if f is None:
            report.problems.append(f"tensor {name}: missing")
        elif (f.dtype, tuple(f.shape)) != (w.dtype, tuple(w.shape)):
            report.problems.append(f"tensor {name}: expected {w.dtype}{list(w.shape)}, found {f.dtype}{list(f.shape)}")
        elif f.xxh3 != w.xxh3:
            report.problems.append(f"tensor {name}: expected xxh3-128 {w.xxh3}, found {f.xxh3}")
    if not allow_extra_tensors:
        for name in sorted(set(found.tensors) - set(want.tensors)):
            report.problems.append(f"tensor {name}: not expected")
    for name, wf in sorted(want.files.items()):
        report.checked_files += 1
        ff = found.files.get(name)
        if ff is None:
            report.problems.append(f"file {name}: missing")
        elif ff.sha256 != wf.sha256:
            report.problems.append(f"file {name}: expected sha256 {wf.sha256}, found {ff.sha256}")
    return report


def verify(
    path: str | Path,
    manifest: str | Path | None = None,
    delta: str | Path | None = None,
    side: str = "target",
    progress: bool = False,
) -> VerifyReport:
    """Check a checkpoint against a checksum manifest or a delta's target or base side.

    With neither, the folder's own ``xorweights-checksums.json`` (written by
    ``decode --dtype``) is used. ``delta`` is a folder or a Hub repo, ``org/name[@revision]``.
    """
    if manifest is not None and delta is not None:
        raise UsageError("pass either --manifest or --delta, not both")
    if delta is not None:
        # Only the manifest: a delta's data says nothing a checksum needs.
        manifest_only = [MANIFEST_NAME]
        want, allow_extra = expected_from_delta(resolve(delta, "delta", manifest_only, progress=progress).path, side)
    else:
        if manifest is None:
            manifest = Path(path) / CHECKSUMS_NAME
            if not Path(manifest).is_file():
                raise UsageError(
                    f"{path}: no {CHECKSUMS_NAME} to verify against",
                    "pass --manifest FILE or --delta DELTA",
                )
        want, allow_extra = load_checksums(Path(manifest)), False
    return compare(scan(Path(path), progress), want, allow_extra)
