"""What earlier decodes finished in OUT, so a re-run resumes instead of redoing: an append-only log.

``OUT/.xorweights/decode-state.jsonl`` holds one JSON line naming the delta
(the sha256 of its manifest) and the ``--dtype``, then one line per finished
weight file: its name, size and mtime as written, its sha256 and, after a
conversion, its tensors' checksums. Finishing a file appends one line, so the
cost grows with the number of tensors, not with files times tensors.

While a file is rebuilt, a line every few MiB records the tensors written
and checked so far in its partial file (``OUT/.xorweights/*.partial``), with
the xxh3-128 of each tensor's bytes as written, and (without a conversion)
how many frames of the next tensor are written, with the xxh3-128 of their
bytes: a re-run reads those bytes back, checks them, and rebuilds or fetches
only the rest. A record that leaves a gap after the one before it restarts
the file.

A line cut short by a crash is dropped; anything else that does not parse is
a damaged file, refused with :class:`OutputError`, never trusted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .delta.manifest import TensorSum
from .errors import OutputError
from .outdir import WORK_DIR, OutputDir
from .readers.dtypes import ITEMSIZE

STATE_NAME = "decode-state.jsonl"


@dataclass(frozen=True)
class Finished:
    """One weight file an earlier run wrote and verified."""

    name: str
    stat: tuple[int, int]  # size and mtime_ns as written, to notice a file changed since
    sha256: str
    tensors: dict[str, TensorSum] | None  # only after a conversion; else the manifest's


def _hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_sum(value: Any) -> TensorSum | None:
    if not (isinstance(value, list) and len(value) == 3):
        return None
    dtype, shape, xxh3 = value
    if dtype not in ITEMSIZE or not isinstance(shape, list) or not all(map(_count, shape)) or not _hex(xxh3, 32):
        return None
    return TensorSum(dtype, tuple(shape), xxh3)


def _finished(obj: Any) -> Finished | None:
    if not isinstance(obj, dict) or not {"file", "stat", "sha256"} <= set(obj) <= {"file", "stat", "sha256", "tensors"}:
        return None
    name, st, sha, tensors = obj["file"], obj["stat"], obj["sha256"], obj.get("tensors")
    if not isinstance(name, str) or not (isinstance(st, list) and len(st) == 2 and all(map(_count, st))):
        return None
    if not _hex(sha, 64):
        return None
    sums = None
    if tensors is not None:
        if not isinstance(tensors, dict):
            return None
        sums = {}
        for k, v in tensors.items():
            s = _tensor_sum(v)
            if s is None:
                return None
            sums[k] = s
    return Finished(name, (st[0], st[1]), sha, sums)


@dataclass(frozen=True)
class Progress:
    """What a partial file holds, checked: its first tensors, and maybe the first frames of the next."""

    hashes: list[str]  # the xxh3-128 of each whole tensor as written
    part: tuple[int, str] | None = None  # frames of tensor len(hashes) written, and the xxh3-128 of their bytes


def _progress(obj: Any) -> tuple[str, int, list[str], tuple[int, str] | None] | None:
    """A partial file's record: its name, the first tensor it covers, their hashes, and the next one's part."""
    if not isinstance(obj, dict) or not {"partial", "from", "xxh3"} <= set(obj) <= {"partial", "from", "xxh3", "part"}:
        return None
    name, first, hashes, part = obj["partial"], obj["from"], obj["xxh3"], obj.get("part")
    if not (isinstance(name, str) and _count(first) and isinstance(hashes, list)):
        return None
    if part is not None and not (isinstance(part, list) and len(part) == 2 and _count(part[0]) and _hex(part[1], 32)):
        return None
    return (name, first, hashes, (part[0], part[1]) if part else None) if all(_hex(h, 32) for h in hashes) else None


def parse_state(data: bytes, where: str) -> tuple[dict[str, Any] | None, dict[str, Finished], dict[str, Progress], int]:
    """The header, the finished files, the partial files' checked tensors, and the length of the whole lines.

    A torn last line is excluded from that length.
    """

    def damaged(line: int, why: str) -> OutputError:
        return OutputError(
            f"{where}: damaged at line {line} ({why})",
            f"delete {where} and run the same command again; files already in OUT are checked again and kept",
        )

    end = data.rfind(b"\n") + 1  # past the last newline: what follows was cut short by a crash
    header: dict[str, Any] | None = None
    files: dict[str, Finished] = {}
    partials: dict[str, Progress] = {}
    for number, raw in enumerate(data[:end].splitlines(), 1):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise damaged(number, "not a JSON line") from None
        if number == 1:
            if not (
                isinstance(obj, dict)
                and set(obj) == {"delta", "dtype"}
                and _hex(obj["delta"], 64)
                and (obj["dtype"] is None or obj["dtype"] in ITEMSIZE)
            ):
                raise damaged(number, "expected the delta and dtype it belongs to")
            header = obj
            continue
        progress = _progress(obj)
        if progress is not None:
            name, first, hashes, part = progress
            done = partials[name].hashes if name in partials else []
            # It replaces what it overlaps; one that leaves a gap restarts the file.
            partials[name] = Progress(done[:first] + hashes, part) if first <= len(done) else Progress([])
            continue
        entry = _finished(obj)
        if entry is None:
            raise damaged(number, "expected a finished file or a partial one's progress")
        files[entry.name] = entry
        partials.pop(entry.name, None)
    return header, files, partials, end


class DecodeState:
    """The log of one OUT, opened for appending; refuses OUT holding another delta's files."""

    def __init__(self, out: OutputDir, delta_id: str, dtype: str | None, cap: int) -> None:
        self.where = out.path / WORK_DIR / STATE_NAME
        header = {"delta": delta_id, "dtype": dtype}
        self.delta_id, self.dtype = delta_id, dtype
        data = out.read_work(STATE_NAME, cap) or b""
        old, files, partials, end = parse_state(data, str(self.where))
        self.files: dict[str, Finished] = files if old == header else {}
        # Per weight file being rebuilt: what its partial file holds, written and checked.
        self.partials: dict[str, Progress] = partials if old == header else {}
        if old not in (None, header) and files:
            raise OutputError(
                f"{out.path}: holds files decoded from another delta or with another --dtype",
                "decode into a new, empty folder",
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        try:
            self.fd = os.open(STATE_NAME, flags, 0o644, dir_fd=out.work_fd)
        except OSError as exc:
            raise OutputError(
                f"{self.where}: cannot write the decode state ({exc.strerror})", f"delete {self.where}"
            ) from None
        if os.fstat(self.fd).st_nlink != 1:  # a hard link planted at our name: truncating it would harm its other name
            os.close(self.fd)
            raise OutputError(f"{self.where}: has other names (hard links); not ours", f"delete {self.where}")
        if old == header:
            os.ftruncate(self.fd, end)  # drop a torn last line before appending
        else:
            os.ftruncate(self.fd, 0)
            self._append(header)

    def _append(self, obj: dict[str, Any]) -> None:
        # Not fsynced: the state only saves work. A line lost in a crash makes
        # the next run check that file by its sha256 and adopt it.
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        os.write(self.fd, line)

    def add(self, name: str, st: os.stat_result, sha256: str, tensors: dict[str, TensorSum] | None) -> Finished:
        entry = Finished(name, (st.st_size, st.st_mtime_ns), sha256, tensors)
        record: dict[str, Any] = {"file": name, "stat": list(entry.stat), "sha256": sha256}
        if tensors is not None:
            record["tensors"] = {k: [v.dtype, list(v.shape), v.xxh3] for k, v in tensors.items()}
        self._append(record)
        self.files[name] = entry
        self.partials.pop(name, None)
        return entry

    def progress(self, name: str, first: int, hashes: list[str], part: tuple[int, str] | None = None) -> None:
        """Record that tensors ``first`` onwards of ``name``'s partial file, and ``part`` of the next, are written."""
        done = self.partials[name].hashes if name in self.partials else []
        if first > len(done):
            raise ValueError(f"progress of {name} from tensor {first}, after {len(done)}")
        record: dict[str, Any] = {"partial": name, "from": first, "xxh3": hashes}
        if part is not None:
            record["part"] = list(part)
        self._append(record)
        self.partials[name] = Progress(done[:first] + hashes, part)

    def __enter__(self) -> DecodeState:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
