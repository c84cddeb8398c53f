"""The one check every command makes before writing: the output never overlaps an input.

Paths are compared by identity (device and inode of each folder up the
chain), not by spelling, so a link, ``..``, a bind mount or a
case-insensitive file system cannot hide that the output folder is an input,
lies inside one, or holds one.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OutputError

_Id = tuple[int, int]


def _identity(path: Path) -> _Id | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[_Id]:
    """Identities of ``path`` (if it exists) and of every folder above it."""
    real = Path(os.path.realpath(path))
    return [i for p in (real, *real.parents) if (i := _identity(p)) is not None]


def refuse_overlap(out: Path, inputs: dict[str, Path], *, out_is_file: bool = False) -> None:
    """Refuse an output that is an input, lies inside one, or holds one.

    ``inputs`` maps a role ("delta", "base", ...) to its path, a folder or a
    single file. ``out`` is a folder, or with ``out_is_file`` a single file.
    """
    out = Path(out)
    what = "output file" if out_is_file else "output folder"
    out_chain = _chain(out)
    out_id = _identity(out)
    for role, path in inputs.items():
        path = Path(path)
        in_id = _identity(path)
        if in_id is None:
            continue
        if out_id is not None and out_id == in_id:
            raise OutputError(
                f"{out}: the {what} is the {role} {path}",
                "write to a new path outside every input; xorweights never writes into its inputs",
            )
        if in_id in out_chain:
            raise OutputError(
                f"{out}: the {what} lies inside the {role} {path}",
                "write to a folder outside every input; xorweights never writes into its inputs",
            )
        if out_id is not None and not out_is_file and out_id in _chain(path):
            raise OutputError(
                f"{out}: the {what} contains the {role} {path}",
                "write to a separate, new folder",
            )
