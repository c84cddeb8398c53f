"""TensorRef: one tensor of a checkpoint, reached by byte range, whatever file format holds it.

It sits below every reader, so checkpoint, torch_pickle and meta_llama all
build TensorRefs without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .dtypes import ITEMSIZE, tensor_nbytes


class TensorSource(Protocol):
    def read(self, start: int, stop: int) -> np.ndarray:
        """Raw bytes ``[start, stop)`` of the tensor as ``uint8``."""

    def release(self, start: int, stop: int) -> None:
        """Let go of the memory behind a range already consumed."""


@dataclass(frozen=True)
class TensorRef:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorSource
    where: str  # the file that holds it, for messages

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)
