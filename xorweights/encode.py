"""encode: plan which base tensor covers each fine-tune tensor, then write the frames.

The plan is pure data (:class:`EncodePlan`), built before a byte is written,
so it can be printed, tested and split. Execution streams one frame at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .delta.base_stream import _EMPTY, BaseStream
from .delta.coding import CODINGS, DEFAULT_CODING, LITERAL_XOR, encode_into
from .delta.kernel import (
    DEFAULT_FRAME_BYTES,
    MAX_FRAME_BYTES,
    ZSTD_LEVEL,
    ZSTD_LEVEL_V3,
    FrameCodec,
    frame_spans,
    new_tensor_hash,
)
from .delta.manifest import (
    CODING_VERSION,
    DELTA_VERSION,
    MANIFEST_NAME,
    SHIPPED_DIR,
    BaseRef,
    BaseTensor,
    ExposureRecord,
    Manifest,
    OtherFile,
    TensorEntry,
    WeightFile,
    parse_manifest,
    parse_weight_file,
)
from .delta.pipeline import BufferPool, ordered, resolve_jobs
from .delta.summary import delta_size
from .encode_plan import EncodePlan, FilePlan, TensorPlan, plan_encode
from .errors import InputFileError, OutputError, UsageError, XorWeightsError
from .exposure import DEFAULT_MAX_UNPROTECTED_PCT, Exposure, assess, enforce
from .hub.resolve import resolve_checkpoint
from .inputs import MAX_MANIFEST_BYTES
from .locks import LOCK_NAME, FolderLock
from .outdir import WORK_DIR, OutputDir
from .overlap import refuse_overlap
from .progress import byte_bar
from .readers.checkpoint import Checkpoint


@dataclass(frozen=True)
class EncodeResult:
    manifest: Manifest | None  # None after a dry run
    plan: EncodePlan
    exposure: Exposure
    delta_bytes: int


def _fingerprint(plan: FilePlan, compression: str, coding: str, frame_bytes: int) -> dict[str, object]:
    """What must not have changed for a finished data file to be reused on resume."""
    stats = {str(plan.source): plan.source.stat()}
    for t in plan.tensors:
        if t.base is not None:
            where = Path(t.base.where)
            stats[str(where)] = where.stat()
    return {
        "compression": compression,
        "coding": coding,
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

    def __init__(self, out: OutputDir, codec: FrameCodec, coding: str, frame_bytes: int, jobs: int, bar: tqdm) -> None:
        self.out = out
        self.codec = codec
        self.coding = coding
        self.frame_bytes = frame_bytes
        self.jobs = jobs
        self.pool = BufferPool(frame_bytes)
        self.bar = bar

    def encode_file(self, plan: FilePlan) -> WeightFile:
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
            encode_into(self.coding, raw, cast, chunk, target.itemsize)
            return raw, base, self.codec.encode(chunk, target.itemsize, buffers[1]), buffers

        file_hash = hashlib.sha256(plan.prefix)
        target_hashes = [new_tensor_hash() for _ in tensors]
        sizes: list[list[tuple[int, int]]] = [[] for _ in tensors]
        writer = self.out.writer(plan.data_file, replace=True)  # an earlier run's, whose state was lost
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
                _entry(t, target_hashes[i].hexdigest(), streams[i], sizes[i], self.coding)
                for i, t in enumerate(tensors)
            )
            writer.commit()
        return WeightFile(
            plan.name, plan.size, file_hash.hexdigest(), plan.prefix[8:].decode(), plan.data_file, entries
        )


def _entry(
    tp: TensorPlan, xxh3: str, stream: BaseStream | None, frames: list[tuple[int, int]], coding: str
) -> TensorEntry:
    base = None
    if tp.base is not None and stream is not None:
        base = BaseTensor(tp.base.name, tp.base.dtype, tp.base.shape, stream.finish())
    t = tp.target
    return TensorEntry(t.name, t.dtype, t.shape, xxh3, tp.method, base, tp.xor_bytes, tuple(frames), coding)


def encode(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    exclude: list[str] | tuple[str, ...] = (),
    compress: bool = True,
    codec: str = DEFAULT_CODING,
    frame_bytes: int = DEFAULT_FRAME_BYTES,
    base_description: str = "",
    base_repo_id: str | None = None,
    base_revision: str | None = None,
    progress: bool = False,
    jobs: int | None = None,
    renames: list[str] | tuple[str, ...] = (),
    max_unprotected: float = DEFAULT_MAX_UNPROTECTED_PCT,
    allow_unprotected: bool = False,
    dry_run: bool = False,
) -> EncodeResult:
    """Write a delta folder ``out`` such that ``decode(out, base)`` rebuilds ``finetuned``.

    Before writing anything, it refuses (:class:`UnprotectedError`) a delta that
    would store more than ``max_unprotected`` percent of the tensor bytes in the
    clear, or that leaves a tensor unpaired while the base holds one like it,
    unless ``allow_unprotected``. ``dry_run`` plans, checks and writes nothing.
    ``renames`` (``FROM=TO`` regexes) map base tensor names onto the fine-tune's.
    A second run with the same inputs reuses the data files already finished.
    ``jobs`` threads make frames (default: one per core); the bytes do not depend on it.
    ``codec`` is how frames store the XOR: ``zigzag-diff`` (format 3, smaller)
    or ``xor``, the literal XOR of format 2, which older xorweights decode.
    ``finetuned`` and ``base`` are folders or Hub repos, ``org/name[@revision]``; a
    Hub base's repo id and commit are recorded unless ``base_repo_id`` names another repo.
    """
    delta = Path(out)
    if not 1 <= frame_bytes <= MAX_FRAME_BYTES or frame_bytes % 8:
        raise UsageError(f"frame size {frame_bytes} must be a multiple of 8 up to {MAX_FRAME_BYTES}")
    if not dry_run and (delta / MANIFEST_NAME).exists():  # a dry run writes nothing, so it still plans
        raise OutputError(
            f"{delta}: already holds a finished delta", "choose a new output folder or remove the old delta"
        )
    ft_ref = resolve_checkpoint(finetuned, "fine-tune", progress=progress)
    base_ref = resolve_checkpoint(base, "base", progress=progress)
    finetuned, base = ft_ref.path, base_ref.path
    if base_ref.repo_id is not None and base_repo_id in (None, base_ref.repo_id):
        base_repo_id, base_revision = base_ref.repo_id, base_revision or base_ref.revision
    refuse_overlap(delta, {"fine-tune": finetuned, "base": base})
    if codec not in CODINGS:
        raise UsageError(f"--codec {codec}: not one of {', '.join(CODINGS)}")
    compression = "zstd" if compress else "none"
    frames = FrameCodec(compression, ZSTD_LEVEL if codec == LITERAL_XOR else ZSTD_LEVEL_V3)
    if not 0 <= max_unprotected <= 100:
        raise UsageError(f"--max-unprotected {max_unprotected}: must be a percentage from 0 to 100")
    with Checkpoint(finetuned) as ft, Checkpoint(base) as bs:
        plan = plan_encode(ft, bs, exclude, renames)
        exposure = assess(plan, bs)
        if dry_run:
            return EncodeResult(None, plan, exposure, 0)
        enforce(exposure, max_unprotected, allow_unprotected)
        _refuse_foreign_entries(delta, delta, plan)  # before OutputDir adds its work folder
        with OutputDir(delta) as od, FolderLock(od):
            refuse_overlap(delta, {"fine-tune": finetuned, "base": base})  # again, now that it exists
            if od.lstat(MANIFEST_NAME) is not None:  # another encode finished while we planned
                raise OutputError(f"{delta}: already holds a finished delta", "choose a new output folder")
            _refuse_foreign_entries(od.fd, delta, plan)
            bar = byte_bar(sum(t.target.nbytes for t in plan.tensors()), "encode", progress)
            encoder = _Encoder(od, frames, codec, frame_bytes, resolve_jobs(jobs), bar)
            weight_files = []
            for fp in plan.weight_files:
                state_name = f"{fp.data_file}.json"
                fingerprint = _fingerprint(fp, compression, codec, frame_bytes)
                done = _resume(od, state_name, fingerprint, fp.data_file)
                if done is None:
                    done = encoder.encode_file(fp)
                    record = {"fingerprint": fingerprint, "file": asdict(done)}
                    od.write_work(state_name, json.dumps(record).encode())
                else:
                    bar.update(sum(t.nbytes for t in done.tensors))
                weight_files.append(done)
            bar.close()
            for of in plan.other_files:
                rel = f"{SHIPPED_DIR}/{of.name}"
                if of.name in plan.generated:
                    od.write_bytes(rel, plan.generated[of.name], replace=True)  # an earlier run's
                elif of.mode == "ship":
                    _ship(ft, od, of)
            manifest = Manifest(
                BaseRef(
                    base_description or f"the base checkpoint used at encode time ({base_ref.name})",
                    base_repo_id,
                    base_revision,
                ),
                compression,
                frame_bytes,
                tuple(weight_files),
                tuple(plan.other_files),
                exposure=ExposureRecord(allow_unprotected, max_unprotected, exposure.unprotected_bytes),
                format_version=DELTA_VERSION if codec != LITERAL_XOR else CODING_VERSION - 1,
            )
            text = manifest.to_json()
            parse_manifest(text, str(delta / MANIFEST_NAME))  # never publish a manifest our own decoder refuses
            od.write_bytes(MANIFEST_NAME, text.encode())
            od.sweep(_written_names(plan) + [f"{WORK_DIR}/{fp.data_file}.json" for fp in plan.weight_files])
            od.remove_work([f"{fp.data_file}.json" for fp in plan.weight_files] + [LOCK_NAME])
        return EncodeResult(manifest, plan, exposure, delta_size(delta))


def _written_names(plan: EncodePlan) -> list[str]:
    """Every path encode writes below the delta folder, the manifest included."""
    shipped = [f"{SHIPPED_DIR}/{of.name}" for of in plan.other_files if of.mode == "ship"]
    return [fp.data_file for fp in plan.weight_files] + shipped + [MANIFEST_NAME]


def _refuse_foreign_entries(folder: int | Path, where: Path, plan: EncodePlan) -> None:
    """Refuse to write into a folder holding anything but an xorweights delta in progress.

    A delta in progress holds only our work folder, data files and shipped
    files; encode may replace those (its own earlier output), never anything else.
    """
    ours = {WORK_DIR, SHIPPED_DIR} | {fp.data_file for fp in plan.weight_files}
    try:
        with os.scandir(folder) as entries:
            foreign = sorted(e.name for e in entries if e.name not in ours)
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there yet; OutputDir reports a file in the way
    if foreign:
        raise OutputError(
            f"{where}: holds {foreign[0]}"
            + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
            + ", which is not part of an xorweights delta in progress",
            "encode into a new, empty folder",
        )


def _resume(od: OutputDir, state_name: str, fingerprint: dict[str, object], data_file: str) -> WeightFile | None:
    """The finished entry for a data file, if an earlier run made it from the same inputs."""
    try:
        data = od.read_work(state_name, MAX_MANIFEST_BYTES)
        if data is None:
            return None
        record = json.loads(data)
        if record["fingerprint"] != fingerprint:
            return None
        wf = parse_weight_file(record["file"], str(od.path / WORK_DIR / state_name))
    except (OSError, ValueError, KeyError, TypeError, RecursionError, XorWeightsError):
        return None
    st = od.lstat(data_file)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != sum(s for t in wf.tensors for s, _ in t.frames):
        return None
    return wf


def _ship(ft: Checkpoint, od: OutputDir, of: OtherFile) -> None:
    """Copy a file of the fine-tune into ``files/``, as planned: same size, same sha256, read through its checks."""
    src = ft.root / of.name
    changed = InputFileError(f"{src}: changed while encoding", "run encode again once the fine-tune is final")
    f, size = ft.input.open(src)

    def check(found: str) -> None:
        if found != of.sha256:
            raise changed

    with f:
        if size != of.size:
            raise changed
        rel = f"{SHIPPED_DIR}/{of.name}"
        if od.holds(rel, of.size, of.sha256):
            return
        od.copy_in(rel, f, of.size, src, check, replace=True)
