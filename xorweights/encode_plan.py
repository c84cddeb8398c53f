"""Plan an encode: which base tensor covers each fine-tune tensor, and which files ship.

The plan is pure data, built before a byte is written, so it can be printed
(encode --dry-run), checked for exposure (:mod:`xorweights.exposure`) and
tested without touching disk.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .delta.manifest import DATA_SUFFIX, OtherFile
from .readers.checkpoint import BIN_INDEX, SAFETENSORS_INDEX, Checkpoint, TensorRef, is_foreign_weight
from .readers.dtypes import can_cast
from .readers.safetensors_io import build_header
from .renames import auto_renames, base_name_map

# What a training run leaves beside the weights, never part of a release, and
# why: optimizer and scheduler states are as large as the weights and derived
# from them, and pickles run code when loaded. A pattern ending in "/" matches
# a folder anywhere in the path (reported once, before what it holds); any
# other, a file's name. Checked after --exclude, before the other formats' weights.
NEVER_SHIPPED: tuple[tuple[str, str], ...] = (
    ("training_args.bin", "training arguments, a pickle"),
    ("optimizer*.pt", "optimizer state"),
    ("optimizer*.bin", "optimizer state"),
    ("optimizer*.pth", "optimizer state"),
    ("optimizer*.safetensors", "optimizer state"),
    ("scheduler*.pt", "learning-rate scheduler state"),
    ("scheduler*.bin", "learning-rate scheduler state"),
    ("scaler*.pt", "mixed-precision scaler state"),
    ("rng_state*.pth", "random number generator state"),
    ("trainer_state.json", "the trainer's progress log"),
    ("events.out.tfevents.*", "a TensorBoard log"),
    ("*.ckpt", "a training checkpoint"),
    ("zero_to_fp32.py", "a DeepSpeed checkpoint script"),
    ("checkpoint-*/", "an intermediate training checkpoint"),
    ("global_step*/", "DeepSpeed training state"),
    ("runs/", "TensorBoard logs"),
    ("wandb/", "Weights & Biases run files"),
    ("*.bin", "a pickle, which may hold weights and runs code when loaded"),
)


def never_shipped(rel: str) -> tuple[str, str] | None:
    """``(what, reason)`` when ``rel`` is a training leftover or a pickle: the file, or its folder."""
    *folders, name = rel.split("/")
    for i, part in enumerate(folders):  # the outermost leftover folder first: one line for all it holds
        for pattern, reason in NEVER_SHIPPED:
            if pattern.endswith("/") and fnmatch.fnmatch(part, pattern[:-1]):
                return "/".join(folders[: i + 1]) + "/", reason
    for pattern, reason in NEVER_SHIPPED:
        if not pattern.endswith("/") and fnmatch.fnmatch(name, pattern):
            return rel, reason
    return None


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
    """One output safetensors file: its name, the bytes before its data, and its tensors in order.

    For a safetensors source the prefix is its own header, so decode rebuilds
    the file byte for byte; other sources get a header built here.
    """

    name: str
    prefix: bytes  # 8-byte length + JSON header
    source: Path  # the file the tensors come from, for resume fingerprints
    data_file: str
    tensors: tuple[TensorPlan, ...]

    @property
    def size(self) -> int:
        return len(self.prefix) + sum(t.target.nbytes for t in self.tensors)


@dataclass
class EncodePlan:
    weight_files: list[FilePlan]
    other_files: list[OtherFile]
    not_shipped: list[str] = field(default_factory=list)  # weight files in other formats, excluded files
    aliases: dict[str, str] = field(default_factory=dict)  # shipped file -> base file with the same bytes
    generated: dict[str, bytes] = field(default_factory=dict)  # files made by encode and shipped (a new index)
    auto_renames: list[str] = field(default_factory=list)  # a prefix mapping found on its own, to report

    def tensors(self) -> list[TensorPlan]:
        return [t for f in self.weight_files for t in f.tensors]


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


def plan_encode(
    finetuned: Checkpoint, base: Checkpoint, exclude: Sequence[str] = (), renames: Sequence[str] = ()
) -> EncodePlan:
    """Plan the whole delta without writing anything.

    Each fine-tune tensor pairs with the base tensor of the same name or,
    failing that, with the base tensor that ``renames`` map onto its name.
    """
    automatic = [] if renames else auto_renames(finetuned.tensors, base.tensors)
    renamed = base_name_map(base.tensors, list(renames) or automatic)

    def counterpart(name: str) -> TensorRef | None:
        ref = base.tensors.get(name)
        if ref is None and name in renamed:
            ref = base.tensors[renamed[name]]
        return ref

    files = []
    count = len(finetuned.weight_files)
    for i, f in enumerate(finetuned.weight_files, 1):
        tensors = tuple(plan_tensor(finetuned.tensors[n], counterpart(n)) for n in f.names)
        if f.safetensors is not None:
            name, prefix = f.path.name, f.safetensors.prefix
        else:
            name = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            prefix, _ = build_header(
                [(t.target.name, t.target.dtype, t.target.shape) for t in tensors], {"format": "pt"}
            )
        files.append(FilePlan(name, prefix, f.path, f"tensors-{i:05d}{DATA_SUFFIX}", tensors))
    generated = _converted_index(files) if finetuned.format != "safetensors" else {}
    base_digests: dict[str, set[str]] = {}
    for rel in base.other_files():
        base_digests.setdefault(base.digest(rel)[1], set()).add(rel)
    others: list[OtherFile] = []
    not_shipped: list[str] = []
    aliases: dict[str, str] = {}
    for rel in finetuned.other_files():
        if any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(rel.rsplit("/", 1)[-1], g) for g in exclude):
            not_shipped.append(f"{rel} (excluded)")
            continue
        if rel == BIN_INDEX and finetuned.format == "bin":
            not_shipped.append(f"{rel} (the delta rebuilds the weights as safetensors)")
            continue
        leftover = never_shipped(rel)
        if leftover is not None:
            what, reason = leftover
            line = f"{what} ({reason})"
            if line not in not_shipped:  # a folder is listed once
                not_shipped.append(line)
            continue
        if is_foreign_weight(rel):
            not_shipped.append(f"{rel} (weights in a format the delta does not carry)")
            continue
        size, digest = finetuned.digest(rel)
        twins = base_digests.get(digest, set())
        # An index describes the fine-tune's own shards: ship it, so a base in another container still decodes.
        mode = "reference" if rel in twins and rel != SAFETENSORS_INDEX else "ship"
        if twins and mode == "ship":
            aliases[rel] = min(twins)
        others.append(OtherFile(rel, size, digest, mode))
    for rel, data in generated.items():
        others.append(OtherFile(rel, len(data), hashlib.sha256(data).hexdigest(), "ship"))
    return EncodePlan(files, others, not_shipped, aliases, generated, automatic)


def _converted_index(files: list[FilePlan]) -> dict[str, bytes]:
    """A model.safetensors.index.json for weights rebuilt from another format, when sharded."""
    if len(files) < 2:
        return {}
    weight_map = {t.target.name: f.name for f in files for t in f.tensors}
    total = sum(t.target.nbytes for f in files for t in f.tensors)
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return {SAFETENSORS_INDEX: (json.dumps(doc, indent=2) + "\n").encode()}
