"""Release safety: which tensor bytes a delta would publish in the clear, and why.

A tensor the base cannot mask is stored as it is. Added-token rows are the
fine-tuner's own parameters, but a wrong base, a name prefix mismatch or a
dtype or shape mismatch would publish the base model's weights, which cannot
be undone once the delta is public. :func:`assess` works on the encode plan,
before a byte is written; :func:`enforce` refuses unless the releaser allows
it explicitly.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from .encode_plan import EncodePlan
from .errors import UnprotectedError
from .readers.checkpoint import Checkpoint, TensorRef
from .renames import KNOWN_PREFIXES
from .sizes import human_bytes

DEFAULT_MAX_UNPROTECTED_PCT = 1.0


@dataclass(frozen=True)
class Unprotected:
    name: str
    nbytes: int
    cause: str


@dataclass
class Exposure:
    tensor_bytes: int
    unprotected: list[Unprotected]  # largest first
    similar: dict[str, str] = field(default_factory=dict)  # target tensor -> unused base tensor like it
    rename_hint: str | None = None  # a --rename that would pair most unmatched names
    shipped: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # shipped file -> identical base file

    @property
    def unprotected_bytes(self) -> int:
        return sum(u.nbytes for u in self.unprotected)

    @property
    def share_pct(self) -> float:
        return 100.0 * self.unprotected_bytes / self.tensor_bytes if self.tensor_bytes else 0.0

    def likely_cause(self) -> str:
        causes = [u.cause for u in self.unprotected if not u.cause.startswith("added rows")]
        if self.rename_hint:
            return f"the base names its tensors with another prefix ({self.rename_hint} pairs them)"
        if self.similar:
            return "tensor names differ from the base's, which holds tensors of the same shape and dtype under similar names"
        if any(c.startswith(("dtype", "shape")) for c in causes):
            return "dtypes or shapes differ from the base's: is this the base the model was fine-tuned from?"
        if causes and len(causes) * 2 > len(self.unprotected) + 1 and self.share_pct > 50:
            return "most tensors have no counterpart: this looks like the wrong base"
        return "tensors the base does not have (new heads or layers) or added rows"


def _core(name: str) -> str:
    for p in sorted(KNOWN_PREFIXES, key=len, reverse=True):
        if name.startswith(p):
            return name[len(p) :]
    return name


def _rename_hint(unmatched: list[str], base_names: set[str]) -> str | None:
    """A --rename that pairs at least half the unmatched fine-tune tensors, if one exists."""
    best: tuple[int, str] | None = None
    for p in KNOWN_PREFIXES:
        added = sum(1 for n in unmatched if n.startswith(p) and n[len(p) :] in base_names)
        dropped = sum(1 for n in unmatched if p + n in base_names)
        for count, hint in ((added, f"--rename '^={p}'"), (dropped, f"--rename '^{re.escape(p)}='")):
            if count and count * 2 >= len(unmatched) and (best is None or count > best[0]):
                best = (count, hint)
    return best[1] if best else None


def assess(plan: EncodePlan, base: Checkpoint) -> Exposure:
    """What encoding ``plan`` would leave unprotected."""
    tensors = plan.tensors()
    used = {t.base.name for t in tensors if t.base is not None}
    unused = [ref for name, ref in base.tensors.items() if name not in used]
    unprotected: list[Unprotected] = []
    similar: dict[str, str] = {}
    unmatched: list[str] = []
    for t in tensors:
        if not t.unprotected_bytes:
            continue
        cause = t.note
        if t.base is None and t.target.name not in base.tensors:
            unmatched.append(t.target.name)
            twin = _similar(t.target, unused)
            if twin is not None:
                similar[t.target.name] = twin
                cause += f"; the base has {twin} with the same shape and dtype"
        unprotected.append(Unprotected(t.target.name, t.unprotected_bytes, cause))
    unprotected.sort(key=lambda u: (-u.nbytes, u.name))
    total = sum(t.target.nbytes for t in tensors)
    return Exposure(
        total,
        unprotected,
        similar,
        _rename_hint(unmatched, set(base.tensors)) if unmatched else None,
        [f.name for f in plan.other_files if f.mode == "ship"],
        dict(plan.aliases),
    )


def _similar(target: TensorRef, candidates: list[TensorRef]) -> str | None:
    """An unused base tensor of the same shape and dtype whose name is like ``target``'s."""
    best: tuple[float, str] | None = None
    for ref in candidates:
        if (ref.shape, ref.dtype) != (target.shape, target.dtype):
            continue
        a, b = target.name, ref.name
        score = 1.0 if _core(a) == _core(b) else difflib.SequenceMatcher(None, a, b).ratio()
        if score >= 0.8 and (best is None or score > best[0]):
            best = (score, b)
    return best[1] if best else None


def report_lines(e: Exposure) -> list[str]:
    """The unprotected report, one line per finding, for encode --dry-run and the summary."""
    lines = [
        f"{human_bytes(e.unprotected_bytes)} of {human_bytes(e.tensor_bytes)} of tensor bytes unprotected ({e.share_pct:.3f}%)"
    ]
    lines += [f"  {u.name}: {human_bytes(u.nbytes)} ({u.cause})" for u in e.unprotected]
    if e.rename_hint:
        lines.append(f"  names: {e.rename_hint} would pair the base's tensors with the fine-tune's")
    lines += [f"  shipped verbatim: {name}" for name in e.shipped]
    lines += [
        f"  warning: {name} is byte-identical to the base's {twin}: it ships the base's file under another name"
        for name, twin in e.aliases.items()
    ]
    return lines


def enforce(e: Exposure, max_pct: float, allow: bool) -> None:
    """Refuse a release that exposes more than ``max_pct`` or pairs names wrongly, unless allowed."""
    over = e.share_pct > max_pct
    if allow or not (over or e.similar):
        return
    top = ", ".join(f"{u.name} {human_bytes(u.nbytes)}" for u in e.unprotected[:3])
    more = f" and {len(e.unprotected) - 3} more" if len(e.unprotected) > 3 else ""
    if over:
        what = (
            f"{e.share_pct:.2f}% of tensor bytes ({human_bytes(e.unprotected_bytes)}) would be stored unprotected, "
            f"more than --max-unprotected {max_pct:g}%"
        )
    else:
        what = f"{len(e.similar)} fine-tune tensor(s) have no counterpart although the base has one like them"
    if e.rename_hint:
        fix = f"pass {e.rename_hint} to pair the names"
    else:
        fix = "use the base the model was fine-tuned from, or map names with --rename FROM=TO"
    raise UnprotectedError(
        f"encode refused: {what}: {top}{more}; likely cause: {e.likely_cause()}",
        f"{fix}, or pass --allow-unprotected to publish these bytes in the clear; "
        "encode --dry-run prints the full report",
    )
