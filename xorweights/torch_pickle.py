"""Read HF ``pytorch_model*.bin`` pickles as raw tensor bytes, never running their code.

``torch.load(weights_only=True)`` refuses any pickle that needs more than
tensors and plain containers, and ``mmap=True`` maps the storages from the
file instead of reading the whole shard into memory. Only this module and
the Meta reader import torch; the XOR path works on bytes alone.
"""

from __future__ import annotations

import ctypes
import mmap
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

TORCH_DTYPES = {
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.float32": "F32",
    "torch.float64": "F64",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}

_libc = ctypes.CDLL(None, use_errno=True) if hasattr(mmap, "MADV_DONTNEED") else None


def load_weights(path: Path, hint: str, allow_unmapped: bool = True) -> tuple[dict[str, Any], bool]:
    """The pickle's flat ``name -> tensor`` dict, and whether its storages are file-mapped.

    ``hint`` says where to get a good copy. Files older than torch 1.6's zip
    format cannot be mapped: they are read whole if ``allow_unmapped``,
    refused otherwise.
    """
    import torch

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
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        # A damaged pickle surfaces as whatever the unpickler tripped on.
        why = _first_line(str(exc)) or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({why})", hint) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(
            f"{path}: expected a flat dict of tensor names to tensors, found {type(obj).__name__}",
            "save the model's state_dict() as the weights file",
        )
    return obj, mapped


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
            import torch

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
    from .checkpoint import TensorRef

    weights, mapped = load_weights(path, "get the weights as safetensors, or re-download the .bin files")
    refs = []
    for name, tensor in weights.items():
        dtype = TORCH_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which xorweights does not handle")
        refs.append(TensorRef(name, dtype, tuple(tensor.shape), TorchTensorSource(tensor, mapped), str(path)))
    return refs, weights.clear
