"""What a delta needs and what it holds, summarized from its manifest: the data inspect prints and the model card states."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .manifest import BaseRef, Manifest, TensorEntry


def unprotected_line(t: TensorEntry) -> str | None:
    """One line saying which bytes of ``t`` the base does not protect, if any."""
    extra = t.unprotected_bytes
    if not extra:
        return None
    if t.method == "partial_xor":
        rows = extra // (t.nbytes // t.shape[0])
        return f"{rows} rows of {t.name} are stored unprotected ({extra} bytes)"
    return f"{t.name} is stored unprotected: {extra} bytes with no base counterpart"


@dataclass(frozen=True)
class DeltaSummary:
    format_version: int
    tool_version: str
    base: BaseRef
    compression: str
    codings: list[str]  # how frames store what the base covers (delta.coding), over the tensors with a base
    tensors: int
    tensors_xored: int
    tensor_bytes: int
    delta_bytes: int
    unprotected_bytes: int
    unprotected_allowed: bool | None  # the releaser passed --allow-unprotected (None: format 1 did not record it)
    max_unprotected_pct: float | None
    unprotected: list[str]
    files_rebuilt: list[str]
    files_referenced: list[str]
    files_shipped: list[str]

    @property
    def unprotected_pct(self) -> float:
        return 100.0 * self.unprotected_bytes / self.tensor_bytes if self.tensor_bytes else 0.0

    def exposure_line(self) -> str:
        """The exposure in words, as inspect and the model card state it."""
        share = f"{self.unprotected_bytes} bytes ({self.unprotected_pct:.3f}% of tensor bytes) are stored unprotected"
        if self.unprotected_allowed:
            return f"{share}: the releaser allowed this explicitly with --allow-unprotected"
        if self.max_unprotected_pct is not None:
            return f"{share}, within the {self.max_unprotected_pct:g}% limit encode enforces"
        return f"{share} (format 1 did not record the releaser's limit)"

    @property
    def ratio(self) -> float:
        return round(self.tensor_bytes / self.delta_bytes, 3) if self.delta_bytes else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ratio": self.ratio}


def summarize(manifest: Manifest, delta_bytes: int) -> DeltaSummary:
    tensors = manifest.tensors()
    return DeltaSummary(
        format_version=manifest.format_version,
        tool_version=manifest.tool_version,
        base=manifest.base,
        compression=manifest.compression,
        codings=sorted({t.coding for t in tensors if t.base is not None}),
        tensors=len(tensors),
        tensors_xored=sum(1 for t in tensors if t.method != "raw"),
        tensor_bytes=sum(t.nbytes for t in tensors),
        delta_bytes=delta_bytes,
        unprotected_bytes=sum(t.unprotected_bytes for t in tensors),
        unprotected_allowed=manifest.exposure.allowed if manifest.exposure else None,
        max_unprotected_pct=manifest.exposure.max_unprotected_pct if manifest.exposure else None,
        unprotected=[line for t in tensors if (line := unprotected_line(t))],
        files_rebuilt=[f.name for f in manifest.weight_files],
        files_referenced=[f.name for f in manifest.other_files if f.mode == "reference"],
        files_shipped=[f.name for f in manifest.other_files if f.mode == "ship"],
    )


def delta_size(delta: Path) -> int:
    """Bytes a downloader fetches: every file of the delta folder."""
    return sum(p.stat().st_size for p in delta.rglob("*") if p.is_file() and ".xorweights" not in p.parts)
