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
from tqdm import tqdm

from .atomic import AtomicWriter, copy_atomic, refuse_overlap, remove_partials, write_atomic
from .base_stream import _EMPTY, BaseStream
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
from .pipeline import BufferPool, ordered, resolve_jobs
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


@dataclass(frozen=True)
class _Frame:
    tensor: int  # index into FilePlan.tensors
    lo: int  # byte range of the target tensor
    hi: int


class _Encoder:
    """Writes one data file per weight file; frames are made on ``jobs`` threads."""

    def __init__(self, delta: Path, codec: FrameCodec, frame_bytes: int, jobs: int, bar: tqdm) -> None:
        self.delta = delta
        self.codec = codec
        self.frame_bytes = frame_bytes
        self.jobs = jobs
        self.pool = BufferPool(frame_bytes)
        self.bar = bar

    def encode_file(self, plan: FilePlan) -> WeightFile:
        src = plan.source
        tensors = plan.tensors
        streams = [BaseStream(t.base, t.target.dtype, t.xor_bytes) if t.base else None for t in tensors]
        frames = [
            _Frame(i, lo, hi)
            for i, t in enumerate(tensors)
            for lo, hi in frame_spans(t.target.nbytes, self.frame_bytes, t.target.itemsize)
        ]

        def work(fr: _Frame) -> tuple[np.ndarray, np.ndarray, bytes | memoryview, tuple[np.ndarray, np.ndarray]]:
            target = tensors[fr.tensor].target
            stream = streams[fr.tensor]
            raw = target.source.read(fr.lo, fr.hi)
            base = stream.view(fr.lo, fr.hi) if stream else _EMPTY
            cast = stream.cast(base) if stream else _EMPTY
            buffers = (self.pool.get(), self.pool.get())
            chunk = buffers[0][: len(raw)]
            k = len(cast)
            np.bitwise_xor(raw[:k], cast, out=chunk[:k])
            chunk[k:] = raw[k:]
            return raw, base, self.codec.encode(chunk, target.itemsize, buffers[1]), buffers

        with src.path.open("rb") as f:
            file_hash = hashlib.sha256(f.read(src.data_start))
        target_hashes = [new_tensor_hash() for _ in tensors]
        sizes: list[list[tuple[int, int]]] = [[] for _ in tensors]
        writer = AtomicWriter(self.delta / plan.data_file)
        with writer as out:
            for fr, (raw, base, frame, buffers) in ordered(work, frames, self.jobs):
                file_hash.update(raw)
                target_hashes[fr.tensor].update(raw)
                stream = streams[fr.tensor]
                if stream is not None:
                    stream.consume(base)
                tensors[fr.tensor].target.source.release(fr.lo, fr.hi)
                out.write(frame)
                sizes[fr.tensor].append((len(frame), fr.hi - fr.lo))
                for b in buffers:
                    self.pool.put(b)
                self.bar.update(fr.hi - fr.lo)
            entries = tuple(
                _entry(t, target_hashes[i].hexdigest(), streams[i], sizes[i]) for i, t in enumerate(tensors)
            )
            writer.commit()
        return WeightFile(
            src.path.name, src.size, file_hash.hexdigest(), src.header_bytes.decode(), plan.data_file, entries
        )


def _entry(tp: TensorPlan, xxh3: str, stream: BaseStream | None, frames: list[tuple[int, int]]) -> TensorEntry:
    base = None
    if tp.base is not None and stream is not None:
        base = BaseTensor(tp.base.name, tp.base.dtype, tp.base.shape, stream.finish())
    t = tp.target
    return TensorEntry(t.name, t.dtype, t.shape, xxh3, tp.method, base, tp.xor_bytes, tuple(frames))


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
    jobs: int | None = None,
) -> EncodeResult:
    """Write a delta folder ``out`` such that ``decode(out, base)`` rebuilds ``finetuned``.

    A second run with the same inputs reuses the data files already finished.
    ``jobs`` threads make frames (default: one per core); the bytes do not depend on it.
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
        bar = byte_bar(sum(t.target.nbytes for t in plan.tensors()), "encode", progress)
        encoder = _Encoder(delta, codec, frame_bytes, resolve_jobs(jobs), bar)
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
                bar.update(sum(t.nbytes for t in done.tensors))
            weight_files.append(done)
        bar.close()
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
