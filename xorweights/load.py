"""load: rebuild the fine-tune straight into torch tensors, one tensor at a time, writing no files.

The same plan and checks as :func:`xorweights.decode`: the base is matched
by name, dtype and shape before any work, and every tensor's base and target
xxh3-128 must match before it is handed out. Each tensor's frames are decoded
into its final buffer, so memory holds the tensors the caller keeps plus
about one frame.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .decode import FileJob, TensorJob, check_tensor, named_dtype, plan_decode
from .delta.base_stream import _EMPTY, BaseStream
from .delta.kernel import FrameCodec, new_tensor_hash
from .delta.manifest import TensorEntry
from .delta.source import DataFile, decode_frame
from .errors import NotEnoughMemoryError
from .hub.resolve import Sources, resolve_delta_and_base
from .readers.checkpoint import Checkpoint
from .readers.dtypes import FLOAT_CASTABLE, ITEMSIZE, TORCH_NAMES, cast_bytes
from .sizes import human_bytes
from .torch_import import require_torch

if TYPE_CHECKING:
    import torch


def _resolve(delta: str | Path, base: str | Path) -> Sources:
    """Local folders for ``delta`` and ``base`` (folders or Hub repos, as for decode), the delta's manifest,
    and where its data files are read from: a delta on the Hub is streamed into memory, never written to disk."""
    return resolve_delta_and_base(delta, base)


def iter_state_dict(
    delta: str | Path, base: str | Path, dtype: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the fine-tune, rebuilt from ``delta`` and ``base``.

    Nothing is written to disk. The base is checked against the manifest
    (names, dtypes, shapes) when this is called, before any tensor is built;
    each tensor is yielded only after its base and rebuilt xxh3-128 both
    matched, with the same errors as decode. ``dtype`` ("float16",
    "bfloat16" or "float32") converts float tensors after that check.
    Tensors are built as they are asked for, so a caller that drops each
    one holds about one tensor and one frame at a time.
    """
    require_torch("iter_state_dict")  # before any download or planning
    target = named_dtype(dtype)
    tensors = _rebuild(_resolve(delta, base), target)
    next(tensors)  # plan now, so a base that does not fit is refused by this call
    return tensors


def available_memory() -> int | None:
    """Bytes of memory the kernel says can be had without swapping (Linux MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(need: int, what: str) -> None:
    free = available_memory()
    if free is not None and need > free:
        raise NotEnoughMemoryError(
            f"{what} needs {human_bytes(need)} in memory, and only {human_bytes(free)} is available"
        )


def load_state_dict(delta: str | Path, base: str | Path, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The whole fine-tune as a ``name -> tensor`` dict, ready for ``module.load_state_dict``.

    See :func:`iter_state_dict`; this keeps every tensor, so it needs the
    fine-tune's size in memory. The size the manifest declares is compared
    with the memory available before any tensor is built
    (:class:`NotEnoughMemoryError`).
    """
    require_torch("load_state_dict")  # before any download or planning
    target = named_dtype(dtype)
    tensors = _rebuild(_resolve(delta, base), target, keep_all=True)
    next(tensors)
    return dict(tensors)


def _rebuild(sources: Sources, target: str | None, keep_all: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Plan, yield once (a marker: planning passed), then yield each verified tensor.

    Being a generator keeps the base open exactly as long as tensors may
    still be asked for: it is closed at the end, on an error, or when the
    caller drops the iterator. The memory each tensor (or, with
    ``keep_all``, all of them) will take is checked against what is available.
    """
    delta, manifest, data = sources.delta, sources.manifest, sources.data
    codec = FrameCodec(manifest.compression)
    with contextlib.closing(sources), Checkpoint(sources.base, sources.arriving) as bs:
        files = plan_decode(manifest, delta, bs, data)

        def size(entry: TensorEntry) -> int:
            width = ITEMSIZE[target] if target and entry.dtype in FLOAT_CASTABLE else ITEMSIZE[entry.dtype]
            return entry.nbytes // ITEMSIZE[entry.dtype] * width

        entries = [tj.entry for job in files for tj in job.tensors]
        if keep_all:
            _check_memory(sum(map(size, entries)), f"the fine-tune in {delta}")
        else:
            largest = max(entries, key=size, default=None)
            if largest is not None:
                _check_memory(size(largest), f"tensor {largest.name}")
        yield None  # type: ignore[misc]
        data.plan([(job.file.data_file, src, stored) for job in files for src, stored in _stored_frames(job)])
        for job in files:
            with contextlib.closing(data.open(job.file.data_file, job.stored)) as data_file:
                src = 0
                for tj in job.tensors:
                    out_dtype = target if target and tj.entry.dtype in FLOAT_CASTABLE else tj.entry.dtype
                    where = f"{data_file.where}: tensor {tj.entry.name}"
                    raw = _tensor_bytes(tj, data_file, src, codec, out_dtype, where)
                    src += sum(stored for stored, _ in tj.entry.frames)
                    tensor = _as_torch(raw, out_dtype, tj.entry.shape)
                    del raw
                    yield tj.entry.name, tensor
                    del tensor  # only the caller keeps it alive while the next one is built


def _as_torch(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``raw`` seen as a torch tensor, without a copy.

    from_numpy keeps ``raw`` alive for as long as the tensor lives, and unlike
    frombuffer it accepts empty tensors. Viewing uint8 bytes is what lets bf16
    through, which numpy has no dtype for.
    """
    torch = require_torch("load_state_dict and iter_state_dict")  # only for loading: the rest works on bytes
    return torch.from_numpy(raw).view(getattr(torch, TORCH_NAMES[dtype])).reshape(shape)


def _stored_frames(job: FileJob) -> Iterator[tuple[int, int]]:
    """Where each frame of ``job``'s data file starts, and its stored size, in order."""
    src = 0
    for tj in job.tensors:
        for stored, _ in tj.entry.frames:
            yield src, stored
            src += stored


def _tensor_bytes(tj: TensorJob, data: DataFile, src: int, codec: FrameCodec, out_dtype: str, where: str) -> np.ndarray:
    """Decode, XOR and check one tensor into a buffer allocated once, in ``out_dtype``."""
    entry = tj.entry
    width, out_width = ITEMSIZE[entry.dtype], ITEMSIZE[out_dtype]
    out = np.empty(entry.nbytes // width * out_width, dtype=np.uint8)
    converting = out_dtype != entry.dtype
    # Converted tensors are decoded into one frame of scratch, then cast into place.
    scratch = np.empty(max((raw for _, raw in entry.frames), default=0) if converting else 0, dtype=np.uint8)
    stream = BaseStream(tj.base, entry.dtype, entry.xor_bytes) if tj.base else None
    target_hash = new_tensor_hash()
    lo = 0
    for k, (stored, raw) in enumerate(entry.frames):
        hi = lo + raw
        chunk = scratch[:raw] if converting else out[lo:hi]
        base = stream.view(lo, hi) if stream else _EMPTY
        cast = stream.cast(base) if stream else _EMPTY
        decode_frame(codec, data, src, stored, width, chunk, f"{where} frame {k}", cast, entry.coding)
        src += stored
        del cast  # at most one stored frame and one cast base frame are held at a time
        if stream is not None:
            stream.consume(base)
        target_hash.update(chunk)
        if converting:
            out[lo // width * out_width : hi // width * out_width] = cast_bytes(chunk, entry.dtype, out_dtype)
        lo = hi
    check_tensor(tj, stream, target_hash.hexdigest())
    return out
