"""encode: plan which base tensor covers each fine-tune tensor, then write the frames.

The plan is pure data (:class:`EncodePlan`), built before a byte is written,
so it can be printed, tested and split. Execution streams one frame at a time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .atomic import AtomicWriter, copy_atomic, refuse_overlap, remove_partials, write_atomic
from .base_stream import BaseStream
from .checkpoint import Checkpoint, TensorRef, is_foreign_weight
from .dtypes import can_cast
from .errors import InputFileError, OutputError, UsageError, XorWeightsError
from .kernel import DEFAULT_FRAME_BYTES, MAX_FRAME_BYTES, FrameCodec, frame_spans, new_tensor_hash, sha256_file
from .manifest import (
    DATA_SUFFIX,
    MANIFEST_NAME,
    SHIPPED_DIR,
    BaseRef,
    BaseTensor,
    Manifest,
    OtherFile,
    TensorEntry,
    WeightFile,
    parse_manifest,
    parse_weight_file,
)
from .progress import byte_bar
from .report import delta_size
from .safetensors_io import SafetensorsFile

STATE_DIR = ".xorweights"


@dataclass(frozen=True)
class TensorPlan:
    target: TensorRef
    base: TensorRef | None
    method: str  # "xor", "partial_xor" or "raw"
    xor_bytes: int
    note: str = ""  # why some bytes are unprotected, for the summary

    @property
    def unprotected_bytes(self) -> int:
        return self.target.nbytes - self.xor_bytes


@dataclass(frozen=True)
class FilePlan:
    source: SafetensorsFile
    data_file: str
    tensors: tuple[TensorPlan, ...]


@dataclass
class EncodePlan:
    weight_files: list[FilePlan]
    other_files: list[OtherFile]
    not_shipped: list[str] = field(default_factory=list)  # weight files in other formats, excluded files

    def tensors(self) -> list[TensorPlan]:
        return [t for f in self.weight_files for t in f.tensors]


@dataclass(frozen=True)
class EncodeResult:
    manifest: Manifest
    plan: EncodePlan
    delta_bytes: int


def plan_tensor(target: TensorRef, base: TensorRef | None) -> TensorPlan:
    """Decide how one fine-tune tensor is stored against its base counterpart."""
    if base is None:
        return TensorPlan(target, None, "raw", 0, "no tensor of that name in the base")
    if not can_cast(base.dtype, target.dtype):
        return TensorPlan(target, None, "raw", 0, f"base is {base.dtype}, which cannot be cast to {target.dtype}")
    if base.shape == target.shape:
        return TensorPlan(target, base, "xor", target.nbytes)
    if len(base.shape) == len(target.shape) >= 1 and base.shape[1:] == target.shape[1:] and target.nbytes:
        rows = min(base.shape[0], target.shape[0])
        xor_bytes = target.nbytes // target.shape[0] * rows if target.shape[0] else 0
        extra = target.shape[0] - rows
        note = f"{extra} rows of {target.name} are stored unprotected" if extra else ""
        return TensorPlan(target, base, "partial_xor", xor_bytes, note)
    return TensorPlan(target, None, "raw", 0, f"shape {list(target.shape)} does not fit the base's {list(base.shape)}")


def plan_encode(finetuned: Checkpoint, base: Checkpoint, exclude: list[str]) -> EncodePlan:
    """Plan the whole delta without writing anything."""
    files = []
    for i, f in enumerate(finetuned.files, 1):
        tensors = tuple(plan_tensor(finetuned.tensors[t.name], base.tensors.get(t.name)) for t in f.tensors)
        files.append(FilePlan(f, f"tensors-{i:05d}{DATA_SUFFIX}", tensors))
    base_others = set(base.other_files())
    others: list[OtherFile] = []
    not_shipped: list[str] = []
    for rel in finetuned.other_files():
        if any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(rel.rsplit("/", 1)[-1], g) for g in exclude):
            not_shipped.append(f"{rel} (excluded)")
            continue
        if is_foreign_weight(rel):
            not_shipped.append(f"{rel} (weights in a format the delta does not carry)")
            continue
        path = finetuned.root / rel
        digest = sha256_file(path)
        same = rel in base_others and sha256_file(base.root / rel) == digest
        others.append(OtherFile(rel, path.stat().st_size, digest, "reference" if same else "ship"))
    return EncodePlan(files, others, not_shipped)


def _fingerprint(plan: FilePlan, compression: str, frame_bytes: int) -> dict[str, object]:
    """What must not have changed for a finished data file to be reused on resume."""
    stats = {str(plan.source.path): plan.source.path.stat()}
    for t in plan.tensors:
        if t.base is not None:
            where = Path(t.base.where)
            stats[str(where)] = where.stat()
    return {
        "compression": compression,
        "frame_bytes": frame_bytes,
        "files": {k: [s.st_size, s.st_mtime_ns] for k, s in sorted(stats.items())},
    }


class _Encoder:
    def __init__(self, delta: Path, codec: FrameCodec, frame_bytes: int, show_progress: bool, total: int) -> None:
        self.delta = delta
        self.codec = codec
        self.frame_bytes = frame_bytes
        self.buffer = np.empty(frame_bytes, dtype=np.uint8)
        self.bar = byte_bar(total, "encode", show_progress)

    def encode_file(self, plan: FilePlan) -> WeightFile:
        src = plan.source
        file_hash = hashlib.sha256()
        with src.path.open("rb") as f:
            file_hash.update(f.read(src.data_start))
        entries = []
        writer = AtomicWriter(self.delta / plan.data_file)
        with writer as out:
            for tp in plan.tensors:
                entries.append(self._encode_tensor(tp, out, file_hash))
            writer.commit()
        return WeightFile(
            src.path.name,
            src.size,
            file_hash.hexdigest(),
            src.header_bytes.decode("utf-8"),
            plan.data_file,
            tuple(entries),
        )

    def _encode_tensor(self, tp: TensorPlan, out: object, file_hash: hashlib._Hash) -> TensorEntry:
        target = tp.target
        width = target.itemsize
        base = BaseStream(tp.base, target.dtype, tp.xor_bytes) if tp.base is not None else None
        target_hash = new_tensor_hash()
        frames = []
        for lo, hi in frame_spans(target.nbytes, self.frame_bytes, width):
            chunk = self.buffer[: hi - lo]
            raw = target.source.read(lo, hi)
            file_hash.update(raw)
            target_hash.update(raw)
            chunk[:] = raw
            target.source.release(lo, hi)
            if base is not None:
                other = base.chunk(lo, hi)
                np.bitwise_xor(chunk[: len(other)], other, out=chunk[: len(other)])
                base.done_with(lo, hi)
            frame = self.codec.encode(chunk, width)
            out.write(frame)  # type: ignore[attr-defined]
            frames.append((len(frame), hi - lo))
            self.bar.update(hi - lo)
        base_entry = None
        if tp.base is not None and base is not None:
            base_entry = BaseTensor(tp.base.name, tp.base.dtype, tp.base.shape, base.finish())
        return TensorEntry(
            target.name,
            target.dtype,
            target.shape,
            target_hash.hexdigest(),
            tp.method,
            base_entry,
            tp.xor_bytes,
            tuple(frames),
        )


def encode(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    exclude: list[str] | tuple[str, ...] = (),
    compress: bool = True,
    frame_bytes: int = DEFAULT_FRAME_BYTES,
    base_description: str = "",
    base_repo_id: str | None = None,
    base_revision: str | None = None,
    progress: bool = False,
) -> EncodeResult:
    """Write a delta folder ``out`` such that ``decode(out, base)`` rebuilds ``finetuned``.

    A second run with the same inputs reuses the data files already finished.
    """
    delta = Path(out)
    if not 1 <= frame_bytes <= MAX_FRAME_BYTES or frame_bytes % 8:
        raise UsageError(f"frame size {frame_bytes} must be a multiple of 8 up to {MAX_FRAME_BYTES}")
    refuse_overlap(delta, {"fine-tune": Path(finetuned), "base": Path(base)})
    if (delta / MANIFEST_NAME).exists():
        raise OutputError(
            f"{delta}: already holds a finished delta", "choose a new output folder or remove the old delta"
        )
    compression = "zstd" if compress else "none"
    codec = FrameCodec(compression)
    with Checkpoint(Path(finetuned)) as ft, Checkpoint(Path(base)) as bs:
        plan = plan_encode(ft, bs, list(exclude))
        state_dir = delta / STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        total = sum(t.target.nbytes for t in plan.tensors())
        encoder = _Encoder(delta, codec, frame_bytes, progress, total)
        weight_files = []
        for fp in plan.weight_files:
            state_path = state_dir / f"{fp.data_file}.json"
            fingerprint = _fingerprint(fp, compression, frame_bytes)
            done = _resume(state_path, fingerprint, delta / fp.data_file)
            if done is None:
                done = encoder.encode_file(fp)
                record = {"fingerprint": fingerprint, "file": asdict(done)}
                write_atomic(state_path, json.dumps(record).encode())
            else:
                encoder.bar.update(sum(t.nbytes for t in done.tensors))
            weight_files.append(done)
        encoder.bar.close()
        for of in plan.other_files:
            if of.mode == "ship":
                _ship(ft.root / of.name, delta / SHIPPED_DIR / of.name, of)
    manifest = Manifest(
        BaseRef(
            base_description or f"the base checkpoint used at encode time ({Path(base).name})",
            base_repo_id,
            base_revision,
        ),
        compression,
        frame_bytes,
        tuple(weight_files),
        tuple(plan.other_files),
    )
    text = manifest.to_json()
    parse_manifest(text, str(delta / MANIFEST_NAME))  # never publish a manifest our own decoder refuses
    write_atomic(delta / MANIFEST_NAME, text.encode())
    shutil.rmtree(state_dir, ignore_errors=True)
    remove_partials(delta)
    return EncodeResult(manifest, plan, delta_size(delta))


def _resume(state_path: Path, fingerprint: dict[str, object], data_path: Path) -> WeightFile | None:
    """The finished entry for a data file, if an earlier run made it from the same inputs."""
    try:
        record = json.loads(state_path.read_text())
        if record["fingerprint"] != fingerprint:
            return None
        wf = parse_weight_file(record["file"], str(state_path))
    except (OSError, ValueError, KeyError, TypeError, XorWeightsError):
        return None
    if not data_path.is_file() or data_path.stat().st_size != sum(s for t in wf.tensors for s, _ in t.frames):
        return None
    return wf


def _ship(src: Path, dst: Path, of: OtherFile) -> None:
    def check(found: str) -> None:
        if found != of.sha256:
            raise InputFileError(f"{src}: changed while encoding", "run encode again once the fine-tune is final")

    copy_atomic(src, dst, check)
