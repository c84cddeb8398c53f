"""Read HF ``pytorch_model*.bin`` pickles as raw tensor bytes, never running their code.

``torch.load(weights_only=True)`` refuses any pickle that needs more than
tensors and plain containers, and ``mmap=True`` maps the storages from the
file instead of reading the whole shard into memory. Of the checkpoint
readers only this module and the Meta reader need torch (the ``xorweights[torch]`` extra, imported through
:func:`~xorweights.torch_import.require_torch`); the XOR path works on bytes alone.

Sizes come from the file, not from its own claims. torch trusts what the
pickle declares: a zip record may be deflated to any size, a storage may
claim more bytes than its record holds (torch then maps the records after
it), and a tensor may claim a shape its storage cannot hold (a stride-0
view of 4 bytes can claim 40000 x 40000 floats, 6.4 GB once copied). Every
such claim is checked against the bytes really in the file before anything
is copied or allocated.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import CheckpointError
from ..torch_import import require_torch
from .dtypes import TORCH_NAMES
from .tensor_ref import TensorRef

# str(tensor.dtype) -> safetensors dtype, for every torch dtype xorweights handles.
TORCH_DTYPES = {f"torch.{name}": dtype for dtype, name in TORCH_NAMES.items()}

_libc = ctypes.CDLL(None, use_errno=True) if hasattr(mmap, "MADV_DONTNEED") else None

# What torch's unpickler raises on a damaged or crafted pickle, besides UnpicklingError.
_UNPICKLER_ERRORS = (
    RuntimeError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    AssertionError,
    OverflowError,
    struct.error,
)
_ZIP_MAGIC = b"PK\x03\x04"  # what torch.load looks for to take the zip format path
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip local file header: signature, ..., name and extra lengths


def load_weights(path: Path, hint: str, allow_unmapped: bool = True) -> tuple[dict[str, Any], bool]:
    """The pickle's flat ``name -> tensor`` dict, and whether its storages are file-mapped.

    ``hint`` says where to get a good copy. Files older than torch 1.6's zip
    format cannot be mapped: they are read whole if ``allow_unmapped``,
    refused otherwise. Every size the file declares (zip records, storages,
    tensor shapes and strides) is checked against the bytes it really holds,
    so no tensor returned claims more memory than the file gives it.
    """
    torch = require_torch(f"{path}: reading a PyTorch .bin or Meta .pth checkpoint")

    try:
        with path.open("rb") as f:
            file_bytes = os.fstat(f.fileno()).st_size
            unchecked = _check_archive(path, f, file_bytes, hint) if f.read(4) == _ZIP_MAGIC else None
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({exc.strerror})", hint) from None
    try:
        try:
            obj, mapped = torch.load(path, map_location="cpu", mmap=True, weights_only=True), True
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            if not allow_unmapped:
                raise CheckpointError(
                    f"{path}: not a zip-format torch.save file, so it cannot be memory-mapped",
                    f"{hint}, or load and torch.save this one with torch >= 1.6",
                ) from None
            obj, mapped = torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: the pickle holds more than weights ({_refusal(str(exc))}), so it was not loaded",
            f"a file that needs more than tensors could run code and is refused; {hint}",
        ) from None
    except _UNPICKLER_ERRORS as exc:
        # A damaged pickle surfaces as whatever the unpickler tripped on.
        why = _first_line(str(exc)) or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({why})", hint) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(
            f"{path}: expected a flat dict of tensor names to tensors, found {type(obj).__name__}",
            "save the model's state_dict() as the weights file",
        )
    if unchecked is not None:
        # torch read what the size check could not: refuse rather than trust its storage sizes.
        raise CheckpointError(f"{path}: the storage sizes its pickle declares could not be checked ({unchecked})", hint)
    for name, tensor in obj.items():
        _check_layout(path, name, tensor, file_bytes, hint)
    return obj, mapped


# ------------------------------------------------------------------ sizes


def _check_archive(path: Path, f: IO[bytes], file_bytes: int, hint: str) -> str | None:
    """Refuse a zip-format file whose records or storages claim more bytes than the file holds.

    Runs before ``torch.load``: torch inflates a deflated record to the size
    its directory claims, and maps a storage over as many bytes as the pickle
    declares, whatever its record holds. Returns why the pickle could not be
    walked, if it could not (``torch.load`` then says what is wrong with it),
    or None once every storage is checked.
    """
    try:
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError, OverflowError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({exc})", hint) from None
    records: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        _check_record(path, info, file_bytes, hint)
        if info.filename in records:
            # torch and zipfile might pick different copies: the one checked must be the one read.
            raise CheckpointError(f"{path}: holds two records named {info.filename}; torch.save writes one", hint)
        records[info.filename] = info
    if not infos or "/" not in infos[0].filename:
        return "its records are not in a folder"  # torch.load refuses such an archive itself
    # torch names every record relative to the folder of the archive's first one.
    folder = infos[0].filename.split("/", 1)[0]
    pickled = records.get(f"{folder}/data.pkl")
    if pickled is None:
        return f"it has no record {folder}/data.pkl"
    return _check_storages(path, _record_bytes(path, f, pickled, file_bytes, hint), records, folder, hint)


def _check_record(path: Path, info: zipfile.ZipInfo, file_bytes: int, hint: str) -> None:
    # torch.save stores every record as is; a deflated one could expand to any size its directory claims.
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CheckpointError(
            f"{path}: record {info.filename} is compressed ({info.compress_size} bytes said to expand to "
            f"{info.file_size}); torch.save stores every record as is",
            hint,
        )
    if info.header_offset < 0 or info.header_offset + info.file_size > file_bytes:
        raise CheckpointError(
            f"{path}: record {info.filename} claims {info.file_size} bytes from offset {info.header_offset}, "
            f"outside the file ({file_bytes} bytes)",
            hint,
        )


def _record_bytes(path: Path, f: IO[bytes], info: zipfile.ZipInfo, file_bytes: int, hint: str) -> bytes:
    """A stored record's bytes, read past its local header (zipfile's reader would also demand a CRC)."""
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) == _LOCAL_HEADER.size:
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if signature == _ZIP_MAGIC and start + info.file_size <= file_bytes:
            f.seek(start)
            return f.read(info.file_size)
    raise CheckpointError(f"{path}: not a readable PyTorch weights file (damaged record {info.filename})", hint)


def _check_storages(
    path: Path, pickled: bytes, records: dict[str, zipfile.ZipInfo], folder: str, hint: str
) -> str | None:
    """Refuse a storage the pickle declares larger than the record that holds its bytes.

    Walks ``data.pkl`` with torch's own weights-only unpickler, handing it
    empty meta-device storages so that nothing is read or allocated. Returns
    why the walk failed, or None.
    """
    torch = require_torch(f"{path}: reading a PyTorch .bin or Meta .pth checkpoint")

    # torch.load's own unpickler, so the walk accepts exactly what it accepts; torch
    # offers no public way to see the storage ids a pickle declares.
    from torch._weights_only_unpickler import Unpickler

    def persistent_load(pid: tuple[Any, ...]) -> Any:
        # The same reading of the id as torch.serialization's zip loader.
        _, storage_type, key, _, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        declared = numel * dtype.itemsize
        record = records.get(f"{folder}/data/{key}")
        found = record.file_size if record is not None else 0
        if declared > found:
            held = f"holds {found}" if record is not None else "is missing"
            raise CheckpointError(
                f"{path}: the pickle declares storage {key} of {numel} {str(dtype).removeprefix('torch.')} "
                f"elements ({declared} bytes), but its record {folder}/data/{key} {held}",
                hint,
            )
        meta = torch.UntypedStorage(declared, device="meta")
        return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

    unpickler = Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    try:
        unpickler.load()
    except (pickle.UnpicklingError, *_UNPICKLER_ERRORS) as exc:
        return _first_line(str(exc)) or type(exc).__name__
    return None


def _check_layout(path: Path, name: str, tensor: Any, file_bytes: int, hint: str) -> None:
    """Refuse a tensor whose elements do not each have their own bytes inside its storage.

    ``.contiguous()`` allocates what the shape claims; this keeps that within
    what the file holds. A view that only reorders its storage (a transposed
    weight saved in a state dict) passes and is made contiguous later.
    """
    itemsize = tensor.element_size()
    storage = tensor.untyped_storage().nbytes()
    shape, strides = list(tensor.shape), list(tensor.stride())

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} {shape} {what}", hint)

    if storage > file_bytes:  # possible for pre-zip files, whose storages torch allocates as declared
        raise bad(f"has a storage of {storage} bytes, more than the whole file ({file_bytes} bytes)")
    needed = tensor.numel() * itemsize
    if needed == 0:
        return
    available = max(storage - tensor.storage_offset() * itemsize, 0)
    if needed > available:
        raise bad(f"needs {needed} bytes, but its storage holds {available} bytes from where the tensor starts")
    reach = (tensor.storage_offset() + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1) * itemsize
    if reach > storage:
        raise bad(f"has strides {strides} that reach {reach} bytes into its storage of {storage} bytes")
    if _overlaps(shape, strides):
        raise bad(f"has strides {strides}: its elements share storage bytes, so it holds less than it claims")


def _overlaps(shape: list[int], strides: list[int]) -> bool:
    """True unless every element has its own storage offset.

    Sufficient test: in order of stride, each dimension must step past
    everything the smaller-stride ones reach. Slices, transposes and
    permutes of a contiguous tensor always pass.
    """
    reach = 0
    for stride, size in sorted((s, n) for n, s in zip(shape, strides, strict=True) if n > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _refusal(text: str) -> str:
    """What torch's weights-only unpickler refused, in a few words, from its long message."""
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it references {found.group(1)}"
    # Past torch's boilerplate paragraphs comes the specific reason, e.g. "Unsupported operand 53".
    for paragraph in text.split("\n\n"):
        line = _first_line(paragraph)
        if line and not line.startswith(("Weights only load failed", "Check the documentation")):
            return line
    return "refused by torch's weights-only loader"


class TorchTensorSource:
    """Raw bytes of one torch tensor; pages of a file-mapped tensor are released after use."""

    def __init__(self, tensor: Any, mapped: bool) -> None:
        self._tensor = tensor if tensor.is_contiguous() else tensor.contiguous()
        self._mapped = mapped and tensor.is_contiguous()
        self._bytes: np.ndarray | None = None

    def _view(self) -> np.ndarray:
        if self._bytes is None:
            torch = require_torch("reading a PyTorch tensor")
            self._bytes = self._tensor.reshape(-1).view(torch.uint8).numpy()
        return self._bytes

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._view()[start:stop]

    def release(self, start: int, stop: int) -> None:
        # MADV_DONTNEED is safe only on a read-only file mapping: the pages come
        # back from the file if touched again. Memory torch allocated itself
        # would be zeroed, so it is left alone.
        if not self._mapped or _libc is None or stop <= start:
            return
        page = mmap.PAGESIZE
        lo = self._tensor.data_ptr() + start
        hi = self._tensor.data_ptr() + stop
        lo -= lo % page
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


def open_pickle(path: Path) -> tuple[list[Any], Callable[[], None]]:
    """TensorRefs for every tensor of a .bin file, in the file's order, and a close function."""
    weights, mapped = load_weights(path, "get the weights as safetensors, or re-download the .bin files")
    refs = []
    for name, tensor in weights.items():
        dtype = TORCH_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which xorweights does not handle")
        refs.append(TensorRef(name, dtype, tuple(tensor.shape), TorchTensorSource(tensor, mapped), str(path)))
    return refs, weights.clear
