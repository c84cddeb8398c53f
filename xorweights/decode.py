"""decode: check the base against the manifest, rebuild every file, verify, then rename.

Plan: every base tensor's presence, dtype and shape is checked before any
work starts. Execute: each output file is rebuilt frame by frame into a
partial file while the base and target hashes are computed on the way; the
file gets its final name only when every hash of every tensor in it matched.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from .decode_state import STATE_NAME, DecodeState, Finished, Progress
from .delta.base_stream import _EMPTY, BaseStream
from .delta.kernel import MAX_FRAME_BYTES, FrameCodec, new_tensor_hash
from .delta.manifest import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    SHIPPED_DIR,
    BaseTensor,
    Checksums,
    FileSum,
    Manifest,
    OtherFile,
    TensorEntry,
    TensorSum,
    WeightFile,
    open_delta_file,
    parse_checksums,
)
from .delta.pipeline import BackgroundHash, BufferPool, ordered, resolve_jobs
from .delta.source import DeltaData, decode_frame
from .errors import BaseMismatchError, DeltaCorruptError, ManifestError, OutputError, UsageError
from .hub.resolve import Sources, resolve_delta_and_base
from .inputs import MAX_MANIFEST_BYTES, InputFolder, load_json, sha256_exact
from .locks import LOCK_NAME, FolderLock
from .outdir import OutputDir, start_writeback
from .overlap import refuse_overlap
from .progress import byte_bar
from .readers.checkpoint import SAFETENSORS_INDEX, Checkpoint, TensorRef
from .readers.dtypes import FLOAT_CASTABLE, ITEMSIZE, NAMED, TORCH_NAMES, cast_bytes
from .readers.safetensors_io import TensorInfo, build_header, parse_header
from .sizes import human_bytes

LOSSY_BF16_HINT = (
    "your base was saved as bf16, which loses precision against the fp16 weights this delta was made from; "
    "use Meta's original files or an fp16 conversion"
)
# A re-run reads back and checks what the state says a killed run wrote: a
# line every few MiB of checked tensors costs nothing next to them, and a
# kill loses at most that much work (plus the frames in flight).
CHECKPOINT_BYTES = 4 << 20
REPLAY_BLOCK = 1 << 20
CONFIG_NAME = "config.json"
# The key transformers reads the model's dtype from: `torch_dtype` up to 4.x, `dtype` from 5.0 on.
CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")


@dataclass(frozen=True)
class TensorJob:
    entry: TensorEntry
    base: TensorRef | None


@dataclass(frozen=True)
class FileJob:
    file: WeightFile
    data_path: Path
    tensors: tuple[TensorJob, ...]

    @property
    def stored(self) -> int:
        """Bytes of the data file, as its frames add up in the manifest."""
        return sum(s for t in self.file.tensors for s, _ in t.frames)


@dataclass(frozen=True)
class DecodeResult:
    out: Path
    written: list[str]
    skipped: list[str]
    dtype: str | None
    config_dtype: str | None = None  # the dtype --dtype wrote into config.json, when it changed it
    skipped_files: list[str] = field(default_factory=list)  # left out of the rebuild (--skip-file)
    unverified: list[str] = field(default_factory=list)  # copied from the user's base as is (--take-from-base)


# ---------------------------------------------------------------- plan


def _check_layout(wf: WeightFile, where: str) -> None:
    """The verbatim header must describe exactly the tensors the manifest lists."""
    header = wf.header_bytes
    data_size = wf.size - 8 - len(header)
    if data_size < 0:
        raise ManifestError(f"{where}: {wf.name} is {wf.size} bytes, smaller than its header")
    infos, _ = parse_header(header, data_size, f"{where} header of {wf.name}")
    listed = [(t.name, t.dtype, t.shape) for t in wf.tensors]
    if [(i.name, i.dtype, i.shape) for i in infos] != listed:
        raise ManifestError(f"{where}: the header of {wf.name} does not match its tensor list")
    for t in wf.tensors:
        width = ITEMSIZE[t.dtype]
        if any(raw % width or raw > MAX_FRAME_BYTES or (raw == 0) for _, raw in t.frames):
            raise ManifestError(
                f"{where}: tensor {t.name} has frames that are not whole elements up to {MAX_FRAME_BYTES} bytes"
            )


def _match_base(entry: TensorEntry, base: Checkpoint) -> TensorRef | None:
    """The base tensor for ``entry``, after checking its name, dtype and shape."""
    want = entry.base
    if want is None:
        return None
    ref = base.tensors.get(want.name)
    if ref is None:
        raise BaseMismatchError(
            f"base tensor {want.name}: expected {want.dtype}{list(want.shape)}, found no such tensor in {base.root}",
        )
    if ref.dtype != want.dtype:
        hint = LOSSY_BF16_HINT if (want.dtype, ref.dtype) == ("F16", "BF16") else None
        raise BaseMismatchError(
            f"base tensor {want.name}: expected dtype {want.dtype}, found {ref.dtype} in {ref.where}", hint
        )
    if ref.shape != want.shape:
        raise BaseMismatchError(
            f"base tensor {want.name}: expected shape {list(want.shape)}, found {list(ref.shape)} in {ref.where}"
        )
    return ref


def plan_decode(
    manifest: Manifest,
    delta: Path,
    base: Checkpoint,
    data: DeltaData,
    problems: list[BaseMismatchError] | None = None,
    leave_out: frozenset[str] = frozenset(),
) -> list[FileJob]:
    """Check everything that can be checked without reading tensor data.

    ``data`` is where the delta's data files are read from. A base that does
    not fit raises at once, unless ``problems`` is given (for --check-base):
    then every mismatch is collected and planning goes on. Non-tensor files
    named in ``leave_out`` (--skip-file) need not be in the base.
    """

    def match(entry: TensorEntry) -> TensorRef | None:
        try:
            return _match_base(entry, base)
        except BaseMismatchError as exc:
            if problems is None:
                raise
            problems.append(exc)
            return None

    where = str(delta / MANIFEST_NAME)
    folder = InputFolder(delta)
    files = []
    for wf in manifest.weight_files:
        _check_layout(wf, where)
        job = FileJob(wf, delta / wf.data_file, tuple(TensorJob(t, match(t)) for t in wf.tensors))
        data.check(wf.data_file, job.stored)
        files.append(job)
    base_files = set(base.other_files())
    for of in manifest.other_files:
        if of.mode == "reference" and of.name not in base_files and of.name not in leave_out:
            where_from = (
                "Meta's original files do not include it: it comes with the Hugging Face version of the base "
                "(its config and tokenizer files); copy it"
                if base.format == "meta"
                else f"copy {of.name} from the base model's original release"
            )
            missing = BaseMismatchError(
                f"{base.root}: missing {of.name}, which this delta takes from the base",
                f"{where_from} into {base.root}",
            )
            if problems is None:
                raise missing
            problems.append(missing)
        if of.mode == "ship":
            open_delta_file(folder, delta / SHIPPED_DIR / of.name, of.size).close()
    return files


# ---------------------------------------------------------------- execute


@dataclass(frozen=True)
class _Frame:
    tensor: int  # index into FileJob.tensors
    index: int  # frame number within the tensor, for messages
    lo: int  # byte range of the target tensor
    hi: int
    src: int  # offset of the stored frame in the data file
    stored: int
    dst: int  # offset of the frame's output bytes in the output file


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def check_tensor(tj: TensorJob, stream: BaseStream | None, target_xxh3: str) -> None:
    """Refuse a rebuilt tensor unless its base and target hashes both match (decode and load)."""
    entry = tj.entry
    if stream is not None and entry.base is not None:
        found = stream.finish()
        if found != entry.base.xxh3:
            raise BaseMismatchError(
                f"base tensor {entry.base.name}: expected xxh3-128 {entry.base.xxh3}, found {found}; "
                "your base differs from the one this delta was made from",
                "get the exact base named by `xorweights inspect DELTA`, "
                "or run `xorweights decode --check-base` to list every differing tensor",
            )
    if target_xxh3 != entry.xxh3:
        raise DeltaCorruptError(
            f"tensor {entry.name}: rebuilt xxh3-128 {target_xxh3} differs from the manifest's {entry.xxh3}, "
            "although its base matched",
        )


class _Rebuilder:
    """Rebuilds files frame by frame on ``jobs`` threads; checks run in order in the caller.

    Workers read, decompress, XOR and ``pwrite`` each frame at its final
    offset; the consumer hashes base and target bytes in order, and a thread
    of its own feeds the whole file's sha256, which must match the manifest's
    before the file gets its final name (with ``dtype`` it is recorded instead).
    Every few MiB of checked tensors, the decode state records them, so a
    re-run reads them back from the partial file instead of fetching them again.
    """

    def __init__(
        self, codec: FrameCodec, data: DeltaData, files: list[FileJob], dtype: str | None, jobs: int, bar: tqdm
    ) -> None:
        self.codec = codec
        self.data = data
        self.pool = BufferPool(max((raw for j in files for t in j.file.tensors for _, raw in t.frames), default=0))
        self.dtype = dtype
        self.jobs = jobs
        self.bar = bar
        self._layouts: dict[str, tuple[bytes, list[TensorInfo]]] = {}
        # Threads live as long as the decode: thousands of small files must not start threads each.
        self.workers = ThreadPoolExecutor(jobs, thread_name_prefix="xorweights") if jobs > 1 else None
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="xorweights-sha256")
        self._started = time.monotonic()

    def __enter__(self) -> _Rebuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.workers is not None:
            self.workers.shutdown()
        self.hasher.shutdown()

    def out_dtype(self, dtype: str) -> str:
        return self.dtype if self.dtype and dtype in FLOAT_CASTABLE else dtype

    def _layout(self, wf: WeightFile) -> tuple[bytes, list[TensorInfo]]:
        if wf.name not in self._layouts:
            infos, metadata = parse_header(wf.header_bytes, wf.size - 8 - len(wf.header_bytes), wf.name)
            if self.dtype is None:
                self._layouts[wf.name] = (len(wf.header_bytes).to_bytes(8, "little") + wf.header_bytes, infos)
            else:
                converted = [(i.name, self.out_dtype(i.dtype), i.shape) for i in infos]
                self._layouts[wf.name] = build_header(converted, {**metadata, "format": "pt"})
        return self._layouts[wf.name]

    def output_size(self, wf: WeightFile) -> int:
        prefix, layout = self._layout(wf)
        return len(prefix) + (layout[-1].end if layout else 0)

    def frames(self, job: FileJob, first: int = 0, skip: int = 0) -> list[_Frame]:
        """The frames of ``job``'s tensors from ``first`` on, but the ``skip`` first of that one.

        Each says where it is stored and where it is written.
        """
        prefix, layout = self._layout(job.file)
        frames = []
        src = 0
        for i, entry in enumerate(tj.entry for tj in job.tensors):
            ratio = (ITEMSIZE[entry.dtype], ITEMSIZE[layout[i].dtype])
            lo = 0
            for k, (stored, raw) in enumerate(entry.frames):
                if i > first or (i == first and k >= skip):
                    dst = len(prefix) + layout[i].begin + lo // ratio[0] * ratio[1]
                    frames.append(_Frame(i, k, lo, lo + raw, src, stored, dst))
                src, lo = src + stored, lo + raw
        return frames

    def resume_point(self, progress: Progress | None) -> tuple[int, int]:
        """Where the state says a file's rebuild takes up: its first tensor not whole, and the frames of it written.

        Frames of a tensor are taken up only without a conversion: its xxh3-128
        is then that of the bytes written, which can be read back.
        """
        if progress is None:
            return 0, 0
        part = progress.part if self.dtype is None else None
        return len(progress.hashes), part[0] if part else 0

    def _note_fetched(self) -> None:
        fetched = self.data.fetched()
        rate = fetched / max(time.monotonic() - self._started, 1e-3)
        self.bar.set_postfix_str(f"downloaded {human_bytes(fetched)} at {human_bytes(rate)}/s", refresh=False)

    def _replay(
        self, fd: int, job: FileJob, sha: Any, progress: Progress | None, written_hashes: list[Any]
    ) -> tuple[int, int, Any]:
        """How much of the file its partial file already holds as the state recorded it.

        The bytes of each recorded tensor (and frames of the next) are read
        back, their xxh3-128 compared with the recorded one, and fed to the
        file's sha256. Returns the first tensor not whole, the frames of it
        written, and the sha256 as it stood after the last part that matched.
        """
        if progress is None:
            return 0, 0, sha
        prefix, layout = self._layout(job.file)
        first, skip = self.resume_point(progress)
        for i, want in enumerate(progress.hashes[: len(layout)]):
            lo = len(prefix) + layout[i].begin
            h, read = self._read_back(fd, lo, len(prefix) + layout[i].end, want, sha)
            if h is None:
                return i, 0, read
            written_hashes[i], sha = h, read
        frames = job.tensors[first].entry.frames if first < len(layout) else []
        if skip == 0 or skip > len(frames) or progress.part is None:
            return min(first, len(layout)), 0, sha
        lo = len(prefix) + layout[first].begin
        h, read = self._read_back(fd, lo, lo + sum(raw for _, raw in frames[:skip]), progress.part[1], sha)
        if h is None:
            return first, 0, read
        written_hashes[first] = h
        return first, skip, read

    @staticmethod
    def _read_back(fd: int, lo: int, hi: int, want: str, sha: Any) -> tuple[Any, Any]:
        """Bytes ``[lo, hi)`` of the partial file: their xxh3-128 (None unless ``want``) and ``sha`` fed with them.

        On a mismatch the sha256 is returned as it was before them.
        """
        fed, h = sha.copy(), new_tensor_hash()
        while lo < hi:
            block = os.pread(fd, min(REPLAY_BLOCK, hi - lo), lo)
            if not block:
                return None, sha
            h.update(block)
            fed.update(block)
            lo += len(block)
        return (h, fed) if h.hexdigest() == want else (None, sha)

    def rebuild(self, job: FileJob, out: OutputDir, state: DecodeState) -> tuple[FileSum, dict[str, TensorSum]]:
        """Write ``job``'s file into ``out`` and return its checksum and those of its tensors as written."""
        prefix, layout = self._layout(job.file)
        entries = [tj.entry for tj in job.tensors]
        name = job.file.name
        converting = self.dtype is not None
        target_hashes = [new_tensor_hash() for _ in entries]
        written_hashes = [new_tensor_hash() for _ in entries] if converting else target_hashes
        sha = hashlib.sha256(prefix)
        final = out.path / name
        writer = out.writer(name, reopen=True)
        with writer as rebuilt, contextlib.closing(self.data.open(job.file.data_file, job.stored)) as data:
            out_fd = rebuilt.fileno()
            progress = state.partials.get(name) if writer.kept else None
            first, skip, sha = self._replay(out_fd, job, sha, progress, written_hashes)
            writer.keep = first + skip > 0  # a partial file is left behind only with checked bytes for a re-run
            if first + skip == 0:
                os.ftruncate(out_fd, 0)
            streams = [
                BaseStream(tj.base, tj.entry.dtype, tj.entry.xor_bytes) if tj.base and i >= first else None
                for i, tj in enumerate(job.tensors)
            ]
            lo = 0
            for _, raw in entries[first].frames[:skip] if skip else []:
                stream = streams[first]  # the base under the frames read back is hashed, as it would have been
                if stream is not None:
                    stream.consume(stream.view(lo, lo + raw))
                lo += raw
            self.bar.update(sum(e.nbytes for e in entries[:first]) + lo)
            frames = self.frames(job, first, skip)
            file_hash = BackgroundHash(sha, self.pool.put, self.hasher)

            def work(fr: _Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
                entry, stream = entries[fr.tensor], streams[fr.tensor]
                buffer = self.pool.get()
                chunk = buffer[: fr.hi - fr.lo]
                base = stream.view(fr.lo, fr.hi) if stream else _EMPTY
                cast = stream.cast(base) if stream else _EMPTY
                where = f"{data.where}: tensor {entry.name} frame {fr.index}"
                width = ITEMSIZE[entry.dtype]
                decode_frame(self.codec, data, fr.src, fr.stored, width, chunk, where, cast, entry.coding)
                written = cast_bytes(chunk, entry.dtype, layout[fr.tensor].dtype)
                _pwrite_all(out_fd, written, fr.dst)
                return buffer, chunk, base, written

            checked, saved, unsaved = first, first, 0

            def check_upto(end: int) -> None:
                nonlocal checked
                for i in range(checked, end):
                    check_tensor(job.tensors[i], streams[i], target_hashes[i].hexdigest())
                    checked = i + 1

            def save(fr: _Frame) -> None:
                """Record the tensors checked since the last record and, unconverted, the frames of ``fr``'s so far."""
                nonlocal saved, unsaved
                part = None if converting else (fr.index + 1, target_hashes[fr.tensor].hexdigest())
                if part is not None or checked > saved:
                    state.progress(name, saved, [h.hexdigest() for h in written_hashes[saved:checked]], part)
                    saved, unsaved, writer.keep = checked, 0, True

            with file_hash:
                _pwrite_all(out_fd, np.frombuffer(prefix, np.uint8), 0)
                # Streamed, frames also wait in the fetch window: fewer in flight here keeps memory under 300 MiB.
                depth = self.jobs + 1 if self.data.remote else None
                for fr, (buffer, chunk, base, written) in ordered(work, frames, self.jobs, self.workers, depth):
                    check_upto(fr.tensor)
                    stream = streams[fr.tensor]
                    if stream is not None:
                        stream.consume(base)
                    target_hashes[fr.tensor].update(chunk)
                    start_writeback(out_fd, fr.dst, len(written))
                    if converting:
                        written_hashes[fr.tensor].update(written)
                    file_hash.update(written, buffer)  # the buffer goes back to the pool once hashed
                    self.bar.update(fr.hi - fr.lo)
                    unsaved += fr.hi - fr.lo
                    if unsaved >= CHECKPOINT_BYTES:
                        save(fr)
                    if self.data.remote:
                        self._note_fetched()
                check_upto(len(entries))
                size = len(prefix) + (layout[-1].end if layout else 0)
                if os.fstat(out_fd).st_size != size:
                    raise DeltaCorruptError(f"{final.name}: rebuilt {os.fstat(out_fd).st_size} bytes, expected {size}")
                digest = file_hash.hexdigest()
            if not converting and digest != job.file.sha256:
                raise DeltaCorruptError(
                    f"{final}: rebuilt file's sha256 {digest} differs from the manifest's {job.file.sha256}, "
                    "although every tensor matched; the file was not kept",
                    "the delta's manifest is damaged or was edited; re-download the delta",
                )
            writer.commit()
        sums = {
            e.name: TensorSum(layout[i].dtype, e.shape, written_hashes[i].hexdigest()) for i, e in enumerate(entries)
        }
        return FileSum(size, digest), sums


def _open_other(
    folder: InputFolder, src: Path, of: OtherFile, *, from_base: bool
) -> tuple[BinaryIO, Callable[[str], None]]:
    """Open a non-tensor file of the base or the delta, with the check its sha256 must pass once read.

    The size is compared before a byte is read; a file of the delta that is
    not what the manifest declares is never read, so its hash is never printed.
    """
    if from_base:
        try:
            f, size = folder.open(src)
        except FileNotFoundError:
            raise BaseMismatchError(f"{src}: missing, and this delta takes it from the base") from None
        if size != of.size:
            f.close()
            raise BaseMismatchError(
                f"{src}: {size} bytes, the base this delta was made from has {of.size}",
                f"restore {of.name} from the base model's original release",
            )
    else:
        f = open_delta_file(folder, src, of.size)

    def check(found: str) -> None:
        if found == of.sha256:
            return
        if from_base:
            raise BaseMismatchError(
                f"{src}: sha256 {found} differs from the {of.sha256} of the base this delta was made from",
                f"restore {of.name} from the base model's original release",
            )
        raise DeltaCorruptError(f"{src}: sha256 differs from the manifest's {of.sha256}")

    return f, check


def _restore(folder: InputFolder, src: Path, out: OutputDir, of: OtherFile, *, from_base: bool) -> None:
    """Copy a non-tensor file into OUT, refusing it unless its size and sha256 are the releaser's."""
    f, check = _open_other(folder, src, of, from_base=from_base)
    with f:
        out.copy_in(of.name, f, of.size, src, check)


def _matching(names: list[str], globs: Sequence[str], option: str) -> set[str]:
    """The names any of ``globs`` matches (fnmatch on the relative path); a glob matching none is a UsageError."""
    chosen: set[str] = set()
    for glob in globs:
        hit = {name for name in names if fnmatch.fnmatch(name, glob)}
        if not hit:
            raise UsageError(
                f"{option} {glob}: matches none of the files it applies to ({', '.join(names) or 'none'})",
                f"{option} applies only to the non-tensor files this delta "
                + ("takes from the base" if option == "--take-from-base" else "rebuilds")
                + "; run `xorweights inspect DELTA` to list them",
            )
        chosen |= hit
    return chosen


def _leave_out(
    manifest: Manifest, skip_files: Sequence[str], take_from_base: Sequence[str]
) -> tuple[set[str], set[str]]:
    """The non-tensor files --skip-file leaves out, and those --take-from-base copies from the base unverified."""
    skipped = _matching([of.name for of in manifest.other_files], skip_files, "--skip-file")
    taken = _matching(
        [of.name for of in manifest.other_files if of.mode == "reference"], take_from_base, "--take-from-base"
    )
    both = sorted(skipped & taken)
    if both:
        raise UsageError(
            f"{', '.join(both)}: matched by both --skip-file and --take-from-base", "make each file match only one"
        )
    return skipped, taken


def _check_first_base_tensor(files: list[FileJob]) -> None:
    """Raise the first base tensor's mismatch, if it has one: --skip-file would then be the wrong advice."""
    tj = next((tj for job in files for tj in job.tensors if tj.base is not None), None)
    if tj is not None and tj.base is not None:
        check_tensor(tj, BaseStream(tj.base, tj.entry.dtype, 0), tj.entry.xxh3)


def check_referenced(manifest: Manifest, bs: Checkpoint, skipped: set[str], taken: set[str]) -> list[OtherFile]:
    """The non-tensor files to restore, each checked against the base (size, then sha256) before any is written.

    Every differing file is named in one :class:`BaseMismatchError`. A file in
    ``taken`` is not checked: it is returned with the size and sha256 of the
    user's copy, which the copy is then held to. Files in ``skipped`` are left out.
    """
    others, problems, differ = [], [], []
    for of in manifest.other_files:
        if of.name in skipped:
            continue
        if of.mode == "reference":
            src = bs.root / of.name
            try:
                if of.name in taken:
                    size, sha256 = bs.input.digest(src)
                    of = replace(of, size=size, sha256=sha256)
                else:
                    f, check = _open_other(bs.input, src, of, from_base=True)
                    with f:
                        check(sha256_exact(f, of.size, src))
            except BaseMismatchError as exc:
                problems.append(exc.message)
                differ.append(of.name)
            except FileNotFoundError:
                problems.append(f"{src}: missing, and this delta takes it from the base")
                differ.append(of.name)
        others.append(of)
    if problems:
        raise BaseMismatchError(
            f"{len(problems)} file(s) this delta takes from the base differ from the base it was made from: "
            + "; ".join(problems),
            f"restore {', '.join(differ)} from the base model's original release; or decode again with "
            "--skip-file GLOB to leave them out of the rebuild, or --take-from-base GLOB to keep your copies "
            f"as they are, unverified (e.g. --take-from-base '{differ[0]}')",
        )
    return others


def named_dtype(dtype: str | None) -> str | None:
    """The safetensors dtype for a ``--dtype`` name (None stays None); UsageError for an unknown one."""
    if dtype is None:
        return None
    if dtype not in NAMED:
        raise UsageError(f"unknown dtype {dtype!r}", f"use one of {', '.join(sorted(NAMED))}")
    return NAMED[dtype]


def decode(
    delta: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    progress: bool = False,
    jobs: int | None = None,
    skip_files: Sequence[str] = (),
    take_from_base: Sequence[str] = (),
    download_first: bool = False,
) -> DecodeResult:
    """Rebuild the fine-tune from ``delta`` and ``base`` into ``out``.

    Without ``dtype`` the files are byte-identical to the releaser's: every
    file's sha256 is checked against the manifest before it gets its final
    name. With ``dtype`` ("float16", "bfloat16" or "float32") float tensors
    are converted after verification, an index is written and the new
    checksums are recorded in ``out/xorweights-checksums.json`` for `verify`.
    ``jobs`` threads rebuild frames (default: one per core); the bytes do not
    depend on it. ``delta`` and ``base`` are folders or Hub repos,
    ``org/name[@revision]`` (see :mod:`xorweights.hub.resolve`).

    The non-tensor files taken from the base are checked before any weight is
    written. ``skip_files`` globs (fnmatch on the relative path) leave non-tensor
    files out of the rebuild; ``take_from_base`` globs copy the user's version
    of files taken from the base as it is, unverified. Both are listed in the result.

    A delta on the Hub is streamed: its data files are fetched by range
    requests as the rebuild goes and never written to disk (see
    :mod:`xorweights.hub.ranges`). ``download_first`` fetches the whole delta
    into the Hugging Face cache first instead.
    """
    out = Path(out)
    target_dtype = named_dtype(dtype)
    with contextlib.closing(resolve_delta_and_base(delta, base, progress=progress, stream=not download_first)) as src:
        return _decode(src, out, target_dtype, progress, jobs, skip_files, take_from_base)


def _decode(
    src: Sources,
    out: Path,
    target_dtype: str | None,
    progress: bool,
    jobs: int | None,
    skip_files: Sequence[str],
    take_from_base: Sequence[str],
) -> DecodeResult:
    delta, base, manifest, data = src.delta, src.base, src.manifest, src.data
    skipped, taken = _leave_out(manifest, skip_files, take_from_base)
    inputs = {"delta": delta, "base": Path(base)}
    refuse_overlap(out, inputs)
    with Checkpoint(base, src.arriving) as bs:
        files = plan_decode(manifest, delta, bs, data, leave_out=frozenset(skipped))
        try:
            others = check_referenced(manifest, bs, skipped, taken)  # before OUT holds a single weight
        except BaseMismatchError:
            _check_first_base_tensor(files)  # a wrong base altogether is named as such, not as a few changed files
            raise
        with OutputDir(out) as od, FolderLock(od):
            refuse_overlap(out, inputs)  # again, now that OUT exists: it cannot have been swapped for an input
            delta_in = InputFolder(delta)
            size, digest = delta_in.digest(delta / MANIFEST_NAME)  # which delta OUT's state is for
            bar = byte_bar(sum(t.entry.nbytes for j in files for t in j.tensors), "decode", progress)
            codec = FrameCodec(manifest.compression)
            # Progress records grow the state with each run that is stopped: room for many.
            with (
                DecodeState(od, digest, target_dtype, 8 * size + (16 << 20)) as state,
                _Rebuilder(codec, data, files, target_dtype, resolve_jobs(jobs), bar) as rebuilder,
            ):
                result = _rebuild_all(od, state, manifest, delta, delta_in, bs, files, rebuilder, bar, others, taken)
            # A finished OUT holds the release only, so `hf upload OUT` never uploads our bookkeeping. A re-run
            # adopts the files by the manifest's sha256 or, converted, by xorweights-checksums.json's.
            od.remove_work([STATE_NAME, LOCK_NAME])
            return result


def _rebuild_all(
    od: OutputDir,
    state: DecodeState,
    manifest: Manifest,
    delta: Path,
    delta_in: InputFolder,
    bs: Checkpoint,
    files: list[FileJob],
    rebuilder: _Rebuilder,
    bar: tqdm,
    restored: list[OtherFile],
    taken: set[str],
) -> DecodeResult:
    out, target_dtype = od.path, rebuilder.dtype
    left_out = sorted({of.name for of in manifest.other_files} - {of.name for of in restored})
    # With --dtype, the index and config.json's dtype are rewritten: their originals are checked before any work.
    originals = {
        of.name: _read_json_other(of, delta, delta_in, bs)
        for of in restored
        if target_dtype and of.name in (SAFETENSORS_INDEX, CONFIG_NAME)
    }
    config = _converted_config(originals.get(CONFIG_NAME), TORCH_NAMES[target_dtype]) if target_dtype else None
    rewritten = {CONFIG_NAME: config} if config is not None else {}
    converted = _converted_before(od, state)
    done = {job.file.name: _finished(od, job.file, state, target_dtype, converted) for job in files}
    pending = [job for job in files if done[job.file.name] is None]
    others = [of for of in restored if not (target_dtype and of.name == SAFETENSORS_INDEX) and of.name not in rewritten]
    present = {of.name for of in others if _already_there(od, of)}  # refuses foreign files up front
    need = sum(rebuilder.output_size(job.file) for job in pending)
    need += sum(of.size for of in others if of.name not in present) + sum(map(len, rewritten.values()))
    _check_free_space(out, need)
    # A streamed delta's frames are fetched ahead in the order they will be read, from where a killed run stopped.
    rebuilder.data.plan(
        [
            (job.file.data_file, fr.src, fr.stored)
            for job in pending
            for fr in rebuilder.frames(job, *rebuilder.resume_point(state.partials.get(job.file.name)))
        ]
    )
    written, skipped = [], []
    checksums = Checksums(source={"delta": state.delta_id, "dtype": target_dtype} if target_dtype else None)
    for job in files:
        name = job.file.name
        entry = done[name]
        if entry is None:
            try:
                file_sum, sums = rebuilder.rebuild(job, od, state)
            except OutputError as exc:
                raise _explain_full_disk(exc, out, need) from exc
            need -= rebuilder.output_size(job.file)
            st = od.lstat(name)
            assert st is not None
            entry = state.add(name, st, file_sum.sha256, sums if target_dtype else None)
            written.append(name)
        else:
            bar.update(sum(t.nbytes for t in job.file.tensors))
            skipped.append(name)
        checksums.files[name] = FileSum(entry.stat[0], entry.sha256)
        if entry.tensors is not None:
            checksums.tensors.update(entry.tensors)
        else:
            checksums.tensors.update({t.name: TensorSum(t.dtype, t.shape, t.xxh3) for t in job.file.tensors})
    bar.close()
    for of in others:
        if of.name in present:
            skipped.append(of.name)
        else:
            if of.mode == "reference":
                _restore(bs.input, bs.root / of.name, od, of, from_base=True)
            else:
                _restore(delta_in, delta / SHIPPED_DIR / of.name, od, of, from_base=False)
            written.append(of.name)
        checksums.files[of.name] = FileSum(of.size, of.sha256)
    if target_dtype is not None and SAFETENSORS_INDEX not in left_out:
        rewritten[SAFETENSORS_INDEX] = _converted_index(files, checksums, originals.get(SAFETENSORS_INDEX))
    if target_dtype is not None:
        for name, data in rewritten.items():
            checksums.files[name] = FileSum(len(data), hashlib.sha256(data).hexdigest())
        for name, data in (*rewritten.items(), (CHECKSUMS_NAME, checksums.to_json().encode())):
            (written if od.write_bytes(name, data) else skipped).append(name)
    od.sweep([job.file.name for job in files] + [of.name for of in manifest.other_files] + [CHECKSUMS_NAME])
    config_dtype = TORCH_NAMES[target_dtype] if target_dtype and config is not None else None
    unverified = sorted(taken)
    return DecodeResult(out, written, skipped, target_dtype, config_dtype, left_out, unverified)


def _converted_before(od: OutputDir, state: DecodeState) -> Checksums | None:
    """The checksums a finished ``--dtype`` decode of this same delta and dtype left in OUT, if any.

    A finished decode removes its state, so the converted files are vouched
    for by ``xorweights-checksums.json``, whose ``source`` names the delta and dtype.
    """
    if state.dtype is None or state.files:
        return None
    data = od.read(CHECKSUMS_NAME, MAX_MANIFEST_BYTES)
    if data is None:
        return None
    try:
        sums = parse_checksums(data.decode("utf-8"), str(od.path / CHECKSUMS_NAME))
    except (UnicodeDecodeError, ManifestError):
        return None  # not ours to trust: the files it lists are then refused as foreign
    return sums if sums.source == {"delta": state.delta_id, "dtype": state.dtype} else None


def _finished(
    od: OutputDir, wf: WeightFile, state: DecodeState, dtype: str | None, converted: Checksums | None
) -> Finished | None:
    """The state entry of a weight file an earlier run finished, or None to rebuild it.

    A file under its final name that the state does not vouch for is adopted
    only if it is exactly the one this delta rebuilds (by the manifest's
    sha256, or with ``--dtype`` by the checksums a finished decode of the same
    delta and dtype recorded); anything else is refused.
    """
    st = od.lstat(wf.name)
    entry = state.files.get(wf.name)
    if st is None:
        return None
    if entry is not None and stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == entry.stat:
        return entry
    recorded = converted.files.get(wf.name) if converted is not None else None
    if recorded is not None and od.digest(wf.name, size=recorded.size) == recorded.sha256:
        assert converted is not None
        tensors = {t.name: converted.tensors[t.name] for t in wf.tensors if t.name in converted.tensors}
        if len(tensors) == len(wf.tensors):
            return state.add(wf.name, st, recorded.sha256, tensors)
    if od.digest(wf.name, size=wf.size) == wf.sha256:
        if dtype is None:
            return state.add(wf.name, st, wf.sha256, None)
        # A finished decode without --dtype leaves no state to say so: the file itself does.
        raise OutputError(
            f"{od.path}: holds files decoded from another delta or with another --dtype",
            "decode into a new, empty folder",
        )
    raise _foreign_file(od.path / wf.name)


def _already_there(od: OutputDir, of: OtherFile) -> bool:
    """True if OUT already holds exactly this file; refuse anything else under its name."""
    there = od.holds(of.name, of.size, of.sha256)
    if there is None:
        raise _foreign_file(od.path / of.name)
    return there


def _check_free_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if need > free:
        raise OutputError(
            f"{out}: this decode needs about {human_bytes(need)} more, and only {human_bytes(free)} is free",
            "free some space or decode into a folder on a bigger disk",
        )


def _explain_full_disk(exc: OutputError, out: Path, need: int) -> OutputError:
    """Add how much space is still needed to a disk-full error; pass others on unchanged."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return OutputError(
            f"{out}: the disk filled up; this decode needs about {human_bytes(need)} more than was free",
            "free that much space and run the same command again: finished files are kept and it resumes",
        )
    return exc


def _foreign_file(final: Path) -> OutputError:
    return OutputError(
        f"{final}: already exists and is not the file this delta rebuilds",
        "decode into a new, empty folder, or remove that file",
    )


# ---------------------------------------------------------------- the JSON files --dtype rewrites


@dataclass(frozen=True)
class _JsonFile:
    """A release's JSON file as checked and parsed, and its text, whose layout a rewrite keeps."""

    obj: dict[str, Any]
    text: str


def _read_json_other(of: OtherFile, delta: Path, delta_in: InputFolder, bs: Checkpoint) -> _JsonFile | None:
    """A non-tensor JSON file of the release, read from the delta or the base and checked against its sha256.

    None when it is no JSON object, or too big to parse: it is then copied
    as it is (config.json) or written anew (the index), never half-rewritten.
    """
    if of.size > MAX_MANIFEST_BYTES:
        return None
    if of.mode == "reference":
        f, check = _open_other(bs.input, bs.root / of.name, of, from_base=True)
    else:
        f, check = _open_other(delta_in, delta / SHIPPED_DIR / of.name, of, from_base=False)
    with f:
        data = f.read(of.size + 1)
    check(hashlib.sha256(data).hexdigest())  # also refuses a file that grew or shrank since it was opened
    try:
        text = data.decode("utf-8")
        obj = load_json(text, of.name)
    except (ValueError, RecursionError, ManifestError):
        return None
    return _JsonFile(obj, text) if isinstance(obj, dict) else None


def dump_json_like(obj: Any, original: str) -> bytes:
    """``obj`` as JSON laid out like ``original``: its indentation, separators, trailing newline and escaping.

    Keys stay in their order, so a file written by transformers
    (``json.dumps(indent=2, sort_keys=True)``) comes back byte for byte when nothing changed.
    """
    indent = re.search(r"\n([ \t]+)\S", original)
    separators = (",", ":") if indent is None and '": ' not in original else None
    text = json.dumps(
        obj,
        indent=indent.group(1) if indent else None,
        separators=separators,
        ensure_ascii=original.isascii(),
    )
    return (text + "\n" * original.endswith("\n")).encode()


def _with_dtype(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``config`` with every dtype key that names a float dtype naming ``dtype`` instead."""
    floats = ("float16", "bfloat16", "float32")
    return {k: dtype if k in CONFIG_DTYPE_KEYS and v in floats else v for k, v in config.items()}


def _converted_config(original: _JsonFile | None, dtype: str) -> bytes | None:
    """config.json naming ``dtype`` (a torch name) wherever it named another float dtype; None if unchanged.

    Sub-configs (``text_config``, ``vision_config``) carry a dtype of their own:
    --dtype converted their weights too. Every other key and their order are kept.
    """
    if original is None:
        return None
    config = {k: _with_dtype(v, dtype) if isinstance(v, dict) else v for k, v in original.obj.items()}
    config = _with_dtype(config, dtype)
    return dump_json_like(config, original.text) if config != original.obj else None


def _converted_index(files: list[FileJob], checksums: Checksums, original: _JsonFile | None) -> bytes:
    """The index of the converted files: the release's own, with only ``total_size`` and ``weight_map`` new.

    Without an index in the release (or one that is no JSON object), a plain one is written.
    """
    weight_map = {t.entry.name: job.file.name for job in files for t in job.tensors}
    total = sum(
        ITEMSIZE[checksums.tensors[name].dtype] * int(np.prod(checksums.tensors[name].shape, dtype=np.int64))
        for name in weight_map
    )
    if original is None:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        return (json.dumps(index, indent=2) + "\n").encode()
    index = dict(original.obj)
    metadata = index.get("metadata")
    metadata = {**metadata, "total_size": total} if isinstance(metadata, dict) else {"total_size": total}
    old_map = index.get("weight_map")
    order = {name: k for k, name in enumerate(old_map)} if isinstance(old_map, dict) else {}
    # The release's order, then any name it did not list, sorted.
    names = sorted(weight_map, key=lambda name: (order.get(name, len(order)), name))
    if "metadata" not in index:
        index = {"metadata": metadata, **index}  # where transformers puts it; an existing one keeps its place
    index["metadata"], index["weight_map"] = metadata, {name: weight_map[name] for name in names}
    return dump_json_like(index, original.text)


def check_base(
    delta: str | Path,
    base: str | Path,
    progress: bool = False,
    skip_files: Sequence[str] = (),
    take_from_base: Sequence[str] = (),
) -> list[str]:
    """Hash every base tensor and referenced file the delta needs; write nothing.

    Returns one line per difference; an empty list means the base is the right one.
    ``delta`` and ``base`` are folders or Hub repos, as for :func:`decode`; the
    files ``skip_files`` and ``take_from_base`` select are not checked, as decode would not.
    """
    # Only the base is read: a delta on the Hub has just its manifest and shipped files fetched.
    with contextlib.closing(resolve_delta_and_base(delta, base, progress=progress)) as src:
        return _check_base(src, progress, skip_files, take_from_base)


def _check_base(src: Sources, progress: bool, skip_files: Sequence[str], take_from_base: Sequence[str]) -> list[str]:
    delta, manifest = src.delta, src.manifest
    skipped, taken = _leave_out(manifest, skip_files, take_from_base)
    mismatches: list[BaseMismatchError] = []
    with Checkpoint(src.base, src.arriving) as bs:
        files = plan_decode(manifest, delta, bs, src.data, mismatches, leave_out=frozenset(skipped | taken))
        problems = [e.message for e in mismatches]
        base_files = set(bs.other_files())
        needed: dict[str, tuple[BaseTensor, TensorRef]] = {}
        for job in files:
            for tj in job.tensors:
                if tj.base is not None and tj.entry.base is not None:
                    needed[tj.entry.base.name] = (tj.entry.base, tj.base)
        bar = byte_bar(sum(ref.nbytes for _, ref in needed.values()), "check base", progress)
        for name, (want, ref) in needed.items():
            found = BaseStream(ref, ref.dtype, 0).finish()
            bar.update(ref.nbytes)
            if found != want.xxh3:
                problems.append(f"base tensor {name}: expected xxh3-128 {want.xxh3}, found {found}")
        bar.close()
        for of in manifest.other_files:
            if of.name in skipped | taken:
                continue
            if of.mode == "reference" and of.name in base_files and bs.digest(of.name) != (of.size, of.sha256):
                problems.append(f"base file {of.name}: sha256 differs from the base this delta was made from")
    return problems
