"""Open a checkpoint folder as ``name -> TensorRef`` plus its other files.

A checkpoint is one ``*.safetensors`` file, or shards with or without a
``model.safetensors.index.json``. Every tensor is reached through a
:class:`TensorSource`, which reads raw bytes by range, so other containers
(``.bin`` pickles, Meta's ``consolidated.*.pth``) can slot in later behind the
same interface without the planner or the kernel changing.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .dtypes import ITEMSIZE
from .errors import CheckpointError
from .safetensors_io import SafetensorsFile, TensorInfo

SAFETENSORS_INDEX = "model.safetensors.index.json"

# Weight files in formats the delta does not carry. They are never shipped
# verbatim: that would publish weights in the clear.
FOREIGN_WEIGHT_PATTERNS = (
    "*.safetensors",
    "pytorch_model*.bin",
    "*.pth",
    "*.pt",
    "*.ckpt",
    "*.gguf",
    "tf_model*.h5",
    "flax_model*.msgpack",
    "*.onnx",
)


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
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _SafetensorsSource:
    file: SafetensorsFile
    info: TensorInfo

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.file.read(self.info, start, stop)

    def release(self, start: int, stop: int) -> None:
        self.file.release(self.info, start, stop)


def is_foreign_weight(relpath: str) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) for p in FOREIGN_WEIGHT_PATTERNS)


class Checkpoint:
    """A checkpoint folder (or a single safetensors file) opened for reading."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder", "check the path")
        self.is_folder = path.is_dir()
        self.root = path if self.is_folder else path.parent
        self.files = [SafetensorsFile(p) for p in self._weight_paths(path)]
        self.tensors: dict[str, TensorRef] = {}
        for f in self.files:
            for info in f.tensors:
                if info.name in self.tensors:
                    raise CheckpointError(
                        f"{f.path}: tensor {info.name!r} is also in {self.tensors[info.name].where}",
                        "the folder holds two copies of the weights; keep one set of shards",
                    )
                self.tensors[info.name] = TensorRef(
                    info.name, info.dtype, info.shape, _SafetensorsSource(f, info), str(f.path)
                )
        if self.is_folder:
            self._check_index(path)

    @staticmethod
    def _weight_paths(path: Path) -> list[Path]:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path}: expected a .safetensors file, found {path.suffix or 'no suffix'}")
            return [path]
        index = path / SAFETENSORS_INDEX
        if index.is_file():
            shards = sorted(set(_read_index(index).values()))
            missing = [s for s in shards if not (path / s).exists() and not (path / s).is_symlink()]
            if missing:
                raise CheckpointError(
                    f"{index}: names shard {missing[0]}, which is not in {path}",
                    "download every shard the index lists, or remove the stale index",
                )
            return [path / s for s in shards]
        found = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
        if not found:
            others = sorted(p.name for p in path.iterdir() if is_foreign_weight(p.name))
            extra = f" (found {', '.join(others[:3])})" if others else ""
            raise CheckpointError(
                f"{path}: no *.safetensors weights{extra}",
                "point at a folder holding model.safetensors or its shards; "
                "convert .bin weights with `safetensors` first",
            )
        return found

    def _check_index(self, path: Path) -> None:
        index = path / SAFETENSORS_INDEX
        if not index.is_file():
            return
        for name, shard in _read_index(index).items():
            ref = self.tensors.get(name)
            if ref is None or Path(ref.where).name != shard:
                raise CheckpointError(
                    f"{index}: lists tensor {name!r} in {shard}, but it is not there",
                    "the index and the shards disagree; re-download the checkpoint",
                )

    def other_files(self) -> list[str]:
        """Files below the root other than the weights read, as relative POSIX paths."""
        if not self.is_folder:
            return []
        weights = {f.path.name for f in self.files}
        out = []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            if rel.as_posix() not in weights:
                out.append(rel.as_posix())
        return out

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
            for k, v in weight_map.items()
        ):
            raise ValueError("weight_map must map tensor names to file names in the same folder")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(
            f"{index}: not a valid safetensors index ({exc})", "re-download the index, or delete it to read every shard"
        ) from None
    return weight_map
