"""Open a checkpoint folder as ``name -> TensorRef`` plus its other files.

A checkpoint is one ``*.safetensors`` file, or shards with or without a
``model.safetensors.index.json``. Every tensor is reached through a
:class:`TensorSource`, which reads raw bytes by range, so other containers
(``.bin`` pickles, Meta's ``consolidated.*.pth``) can slot in later behind the
same interface without the planner or the kernel changing.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ManifestError
from ..inputs import MAX_MANIFEST_BYTES, InputFolder, load_json
from .safetensors_io import Arrival, ArrivingSafetensorsFile, SafetensorsFile, TensorInfo
from .tensor_ref import TensorRef

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


@dataclass(frozen=True)
class WeightFileRef:
    """One weight file of a checkpoint and its tensors in data order.

    ``safetensors`` is set for safetensors files: their verbatim header lets
    a delta rebuild them byte for byte. Other formats (.bin, Meta's .pth) are
    rebuilt as safetensors files holding the same tensors.
    """

    path: Path
    names: tuple[str, ...]
    safetensors: SafetensorsFile | None = None


BIN_INDEX = "pytorch_model.bin.index.json"


class Checkpoint:
    """A checkpoint opened for reading: HF safetensors or .bin shards, or Meta's consolidated.*.pth.

    ``path`` is a folder (or a single .safetensors / .bin file). The format is
    detected in that order of preference, so a folder holding both safetensors
    and .bin copies reads the safetensors. ``arriving`` names safetensors files
    of the folder still downloading, by file name: they are planned from their
    header and read once they are there.
    """

    def __init__(self, path: Path, arriving: dict[str, Arrival] | None = None) -> None:
        path = Path(path)
        self.arriving = arriving or {}
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder", "check the path")
        self.is_folder = path.is_dir()
        self.root = path if self.is_folder else path.parent
        self.input = InputFolder(path)  # every file below is read through it: no links out, regular files only
        self.tensors: dict[str, TensorRef] = {}
        self.weight_files: list[WeightFileRef] = []
        self._closers: list[Callable[[], None]] = []
        self.format = self._open(path)
        if self.is_folder:
            self._check_index(path)

    def _add(self, path: Path, refs: list[TensorRef], st: SafetensorsFile | None = None) -> None:
        for ref in refs:
            if ref.name in self.tensors:
                raise CheckpointError(
                    f"{path}: tensor {ref.name!r} is also in {self.tensors[ref.name].where}",
                    "the folder holds two copies of the weights; keep one set of shards",
                )
            self.tensors[ref.name] = ref
        self.weight_files.append(WeightFileRef(path, tuple(r.name for r in refs), st))

    def _open(self, path: Path) -> str:
        paths = _weight_paths(path, self.input, SAFETENSORS_INDEX, "*.safetensors", set(self.arriving))
        if paths:
            for p in paths:
                arrival = self.arriving.get(p.name) if self.is_folder else None
                f = ArrivingSafetensorsFile(p, self.input, arrival) if arrival else SafetensorsFile(p, self.input)
                self._closers.append(f.close)
                refs = [TensorRef(i.name, i.dtype, i.shape, _SafetensorsSource(f, i), str(p)) for i in f.tensors]
                self._add(p, refs, f)
            return "safetensors"
        paths = _weight_paths(path, self.input, BIN_INDEX, "pytorch_model*.bin")
        if paths:
            from .torch_pickle import open_pickle  # torch is needed only for pickled weights

            for p in paths:
                self._checked(p)
                refs, close = open_pickle(p)
                self._closers.append(close)
                self._add(p, refs)
            return "bin"
        from . import meta_llama

        if self.is_folder and meta_llama.is_meta_checkpoint(path):
            for p in [path / meta_llama.PARAMS, *path.glob(meta_llama.SHARD_GLOB)]:
                self._checked(p)
            tensors, close = meta_llama.open_meta(path)
            self._closers.append(close)
            first = sorted(path.glob("consolidated.*.pth"))[0]
            self._add(first, list(tensors.values()))
            return "meta"
        others = sorted(p.name for p in path.iterdir() if is_foreign_weight(p.name)) if self.is_folder else []
        extra = f" (found {', '.join(others[:3])})" if others else ""
        raise CheckpointError(
            f"{path}: no weights xorweights can read{extra}",
            "point at a folder of model*.safetensors or pytorch_model*.bin shards, "
            "or at Meta's folder with params.json and consolidated.*.pth",
        )

    def _checked(self, path: Path) -> None:
        """Refuse a weight file torch would read that fails :class:`InputFolder`'s checks (a link out, a FIFO)."""
        f, _ = self.input.open(path)
        f.close()

    def _check_index(self, path: Path) -> None:
        index = path / (SAFETENSORS_INDEX if self.format == "safetensors" else BIN_INDEX)
        if not index.is_file() or self.format == "meta":
            return
        for name, shard in read_index(index, self.input).items():
            ref = self.tensors.get(name)
            if ref is None or Path(ref.where).name != shard:
                raise CheckpointError(
                    f"{index}: lists tensor {name!r} in {shard}, but it is not there",
                    "the index and the shards disagree; re-download the checkpoint",
                )

    def other_files(self) -> list[str]:
        """Entries below the root other than the weights read, as relative POSIX paths.

        Folders are walked without following links; a link or anything else
        that is not a folder is listed, so reading it applies the rules of
        :class:`InputFolder` (a link out of the folder, a FIFO: refused).
        """
        if not self.is_folder:
            return []
        weights = {f.path.name for f in self.weight_files}
        found: list[tuple[str, ...]] = []

        def walk(folder: Path, parts: tuple[str, ...]) -> None:
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        walk(Path(e.path), (*parts, e.name))
                    else:
                        found.append((*parts, e.name))

        walk(self.root, ())
        return [rel for rel in ("/".join(p) for p in sorted(found)) if rel not in weights]

    def digest(self, rel: str) -> tuple[int, str]:
        """Size and sha256 of a file below the root."""
        return self.input.digest(self.root / rel)

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _weight_paths(
    path: Path, folder: InputFolder, index_name: str, pattern: str, arriving: AbstractSet[str] = frozenset()
) -> list[Path]:
    """The weight files of one format: a single file, the shards an index names, or a glob.

    Files named in ``arriving`` count as there: they are still downloading.
    """
    if path.is_file():
        return [path] if path.suffix == pattern[pattern.rindex(".") :] else []
    index = path / index_name
    if index.is_file():
        shards = sorted(set(read_index(index, folder).values()))
        missing = [s for s in shards if s not in arriving and not (path / s).exists() and not (path / s).is_symlink()]
        if missing:
            raise CheckpointError(
                f"{index}: names shard {missing[0]}, which is not in {path}",
                "download every shard the index lists, or remove the stale index",
            )
        return [path / s for s in shards]
    found = {p.name for p in path.glob(pattern) if not p.name.startswith(".")}
    return sorted(path / name for name in found | {a for a in arriving if fnmatch.fnmatch(a, pattern)})


def read_index(index: Path, folder: InputFolder) -> dict[str, str]:
    """An index's weight_map (tensor name -> shard file name), checked; CheckpointError if it is not one."""
    try:
        text = folder.read(index, MAX_MANIFEST_BYTES).decode("utf-8")
        weight_map = load_json(text, str(index))["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
            for k, v in weight_map.items()
        ):
            raise ValueError("weight_map must map tensor names to file names in the same folder")
    except (OSError, ValueError, KeyError, TypeError, RecursionError, ManifestError) as exc:
        raise CheckpointError(
            f"{index}: not a valid safetensors index ({getattr(exc, 'message', exc)})",
            "re-download the index, or delete it to read every shard",
        ) from None
    return weight_map
