"""inspect: what a delta needs and what it holds, as data the CLI can print or dump as JSON."""

from __future__ import annotations

from pathlib import Path

from .delta.manifest import MANIFEST_NAME, load_manifest
from .delta.summary import DeltaSummary, delta_size, summarize


def inspect(delta: str | Path, *, progress: bool = True) -> DeltaSummary:
    """Summarize the delta ``delta`` without reading its data.

    ``delta`` is a folder, or a Hub repo (``org/name[@revision]`` or its
    https://huggingface.co URL) of which only the manifest is fetched: the
    sizes of the other files are the ones it declares.
    """
    from .hub.refs import parse_repo_ref
    from .hub.resolve import resolve

    if parse_repo_ref(delta) is None:
        folder = Path(delta)
        return summarize(load_manifest(folder), delta_size(folder))
    folder = resolve(delta, "delta", [MANIFEST_NAME], progress=progress).path
    manifest = load_manifest(folder)
    declared = sum(s for wf in manifest.weight_files for t in wf.tensors for s, _ in t.frames)
    declared += sum(of.size for of in manifest.other_files if of.mode == "ship")
    return summarize(manifest, declared + (folder / MANIFEST_NAME).stat().st_size)
