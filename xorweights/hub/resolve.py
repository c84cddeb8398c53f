"""hub: turn ``org/name`` or ``org/name@revision`` into a snapshot folder of the Hugging Face cache.

Everything that reads from huggingface_hub lives here. A reference that names
an existing local path is that path, untouched; anything else shaped like
``org/name[@revision]`` is a Hub repo, fetched with ``snapshot_download``.
That call honours HF_HUB_OFFLINE, HF_HUB_CACHE, HF_TOKEN and HF_ENDPOINT by
itself, serves what the cache already holds, and draws its own progress bars.

Only the files a command needs are fetched:

- a delta: every file;
- decode's base: one copy of the weights and the non-tensor files the delta
  takes from the base (its ``reference`` files), nothing else;
- encode's fine-tune and base: every file except weights in a second format.

"One copy of the weights" means the safetensors files if the repo has any,
else the ``pytorch_model*.bin`` files, else (Meta's ``consolidated.*.pth``,
say) no filter on weights at all. The choice is made from the repo's file
list when the Hub answers. Offline the list is unknown, so the safetensors
patterns are tried first and the .bin ones when the cache holds only those.

Every huggingface_hub error becomes one :class:`HubDownloadError` line that
names the repo and says what to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

from ..delta.manifest import DATA_SUFFIX, BaseRef, Manifest, load_manifest
from ..delta.source import DeltaData, LocalData
from ..errors import HubDownloadError, XorWeightsWarning
from ..inputs import InputFolder
from ..readers.checkpoint import SAFETENSORS_INDEX, read_index
from ..readers.safetensors_io import Arrival
from .refs import Resolved, parse_repo_ref

if TYPE_CHECKING:
    from .arrivals import BaseDownload  # imports huggingface_hub: loaded only for a repo id

# One copy of the weights, in the order Checkpoint prefers them.
SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")
WEIGHT_FORMATS = (SAFETENSORS_PATTERNS, BIN_PATTERNS)


def is_repo_id(text: str | Path) -> bool:
    """True when ``text`` is not an existing path and reads as ``org/name`` or ``org/name@revision``."""
    return parse_repo_ref(text) is not None


def resolve(
    ref: str | Path,
    role: str,
    allow_patterns: Sequence[str] | None = None,
    *,
    progress: bool = True,
) -> Resolved:
    """A local folder for ``ref``: the path itself, or a snapshot of the Hub repo it names.

    ``role`` ("delta", "base", ...) starts every error message;
    ``allow_patterns`` limits what is fetched (None: every file).
    """
    parsed = parse_repo_ref(ref)
    if parsed is None:
        return Resolved(Path(ref))
    from .client import fetch

    repo_id, revision = parsed
    return fetch(repo_id, revision, role, allow_patterns, None, progress)


def resolve_checkpoint(
    ref: str | Path,
    role: str,
    files: Sequence[str] | None = None,
    *,
    revision: str | None = None,
    progress: bool = True,
    revision_note: str = "",
) -> Resolved:
    """A checkpoint with one copy of its weights.

    With ``files``, only those non-tensor files come along (decode's base);
    without, every file does (encode). ``revision`` is used when ``ref`` names
    none; ``revision_note`` says where it came from in error messages.
    """
    parsed = parse_repo_ref(ref)
    if parsed is None:
        return Resolved(Path(ref))
    repo_id, asked = parsed
    revision = asked or revision
    note = "" if asked else revision_note
    from .client import fetch, repo_files

    choices = _weight_choices(repo_files(repo_id, revision))
    for i, weights in enumerate(choices):
        last = i + 1 == len(choices)
        if files is None:  # everything but the other formats' weights
            allow, ignore = None, [p for fmt in WEIGHT_FORMATS if weights is not None and fmt != weights for p in fmt]
        else:
            allow, ignore = ([*weights, *files] if weights is not None else None), None
        try:
            got = fetch(repo_id, revision, role, allow, ignore or None, progress, note)
        except HubDownloadError as exc:
            # huggingface_hub 2.x refuses a cached snapshot that lacks files the
            # patterns ask for; offline, the cache may hold the other format.
            if last or type(exc.__cause__).__name__ != "IncompleteSnapshotError":
                raise
            continue
        if last or weights is None or _holds(got.path, weights):
            return got
        # The format was a guess (no file list) and the snapshot has none of it: try the next one.
    raise AssertionError("no weight format tried")


def resolve_base(
    ref: str | Path,
    recorded: BaseRef,
    files: Sequence[str],
    *,
    progress: bool = True,
    order: Sequence[str] | None = None,
) -> tuple[Resolved, BaseDownload | None]:
    """Decode's base: pinned to the revision the delta records when ``ref`` names the recorded repo without one.

    Naming another repo, or a revision that resolves to another commit than
    the recorded one, works (every base tensor is checked anyway) but emits
    an :class:`XorWeightsWarning`. With ``order`` (the base tensors in the
    order decode reads them), safetensors shards not yet in the cache are
    fetched while decoding goes on: the second value is that download, not
    yet started (see :mod:`.arrivals`).
    """
    parsed = parse_repo_ref(ref)
    if parsed is None:
        return Resolved(Path(ref)), None
    repo_id, asked = parsed
    same_repo = recorded.repo_id is not None and recorded.repo_id.lower() == repo_id.lower()
    pinned = recorded.revision if same_repo and asked is None else None
    note = " (the revision this delta records)"
    early = _fetch_while_decoding(repo_id, asked or pinned, files, "" if asked else note, progress, order)
    if early is not None:
        got, download = early
    else:
        got = resolve_checkpoint(ref, "base", files, revision=pinned, progress=progress, revision_note=note)
        download = None
    made_from = f"{recorded.repo_id}@{recorded.revision}" if recorded.revision else f"{recorded.repo_id}"
    if recorded.repo_id is not None and not same_repo:
        _warn(f"base {repo_id}: this delta was made from {made_from}; decoding goes on and checks every base tensor")
    elif same_repo and asked is not None and recorded.revision not in (None, asked, got.revision):
        _warn(
            f"base {repo_id}@{asked} is commit {got.revision}, but this delta was made from revision "
            f"{recorded.revision}; decoding goes on and checks every base tensor "
            f"(leave out @{asked} to use the recorded revision)"
        )
    return got, download


def _fetch_while_decoding(
    repo_id: str,
    revision: str | None,
    files: Sequence[str],
    note: str,
    progress: bool,
    order: Sequence[str] | None,
) -> tuple[Resolved, BaseDownload | None] | None:
    """A safetensors base repo with its small files in the cache and its missing shards set to follow.

    None when that does not apply (offline, no file list, not safetensors):
    the base is then fetched whole before decoding, as without ``order``.
    """
    from huggingface_hub import constants

    if order is None or constants.HF_HUB_OFFLINE:
        return None
    from .client import fetch, repo_files

    listing = repo_files(repo_id, revision)
    if listing is None or _weight_choices(listing) != [SAFETENSORS_PATTERNS]:
        return None
    got = fetch(repo_id, revision, "base", [SAFETENSORS_PATTERNS[1], *files], None, progress, note)
    index = got.path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_index(index, InputFolder(got.path))
        shards = sorted(set(weight_map.values()))
    else:
        weight_map, shards = {}, sorted(f for f in listing if "/" not in f and fnmatch(f, SAFETENSORS_PATTERNS[0]))
    first_use: dict[str, int] = {}
    for k, name in enumerate(order):
        first_use.setdefault(weight_map.get(name, ""), k)
    missing = sorted((s for s in shards if not (got.path / s).is_file()), key=lambda s: first_use.get(s, len(order)))
    if not missing:
        return got, None
    from .arrivals import BaseDownload

    assert got.revision is not None
    return got, BaseDownload(repo_id, got.revision, missing)


def resolve_delta(ref: str | Path, *, stream: bool = True, progress: bool = True) -> tuple[Path, Manifest, DeltaData]:
    """The delta's folder (its manifest and shipped files), the manifest, and where its data files are read from.

    A local folder holds everything. A Hub repo with ``stream`` has every
    file but its data files fetched into the cache, and those read by range
    (:mod:`.ranges`) unless the cache already holds them all; without
    ``stream`` the whole repo is fetched first.
    """
    parsed = parse_repo_ref(ref)
    if parsed is None:
        return Path(ref), load_manifest(Path(ref)), LocalData(Path(ref))
    from .client import fetch

    repo_id, revision = parsed
    got = fetch(repo_id, revision, "delta", None, [f"*{DATA_SUFFIX}"] if stream else None, progress)
    manifest = load_manifest(got.path)
    # A download-first run left them all in the cache: read them there (their sizes are checked when opened).
    if not stream or all((got.path / wf.data_file).is_file() for wf in manifest.weight_files):
        return got.path, manifest, LocalData(got.path)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubDownloadError(
            f"delta {got.name}: its data files are not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids downloading them",
            "run once online, or set HF_HUB_OFFLINE=0, or pass a local folder",
        )
    from .ranges import RemoteData

    assert got.repo_id is not None and got.revision is not None
    return got.path, manifest, RemoteData(got.repo_id, got.revision)


@dataclass
class Sources:
    """What decode, load and check-base read: the delta's folder and manifest, where its data comes from, the base."""

    delta: Path
    base: Path
    manifest: Manifest
    data: DeltaData
    download: BaseDownload | None = None  # of base shards not yet in the cache
    arriving: dict[str, Arrival] = field(default_factory=dict)  # those shards, by file name

    def close(self) -> None:
        self.data.close()
        if self.download is not None:
            self.download.stop()


def resolve_delta_and_base(
    delta: str | Path, base: str | Path, *, progress: bool = True, stream: bool = True
) -> Sources:
    """Local folders for decode's DELTA and --base, the delta's manifest, and where its data files are read from.

    The delta comes first: its manifest says which of the base's files are
    needed and which base revision it was made from. With ``stream`` a Hub
    delta's data is read by range (see :func:`resolve_delta`), and a Hub
    base's missing shards are fetched while decoding goes on (see :func:`resolve_base`).
    """
    delta_path, manifest, data = resolve_delta(delta, stream=stream, progress=progress)
    referenced = [of.name for of in manifest.other_files if of.mode == "reference"]
    order = [t.base.name for wf in manifest.weight_files for t in wf.tensors if t.base is not None] if stream else None
    try:
        got, download = resolve_base(base, manifest.base, referenced, progress=progress, order=order)
    except BaseException:
        data.close()
        raise
    return Sources(delta_path, got.path, manifest, data, download, download.start() if download else {})


def _weight_choices(files: list[str] | None) -> list[tuple[str, ...] | None]:
    """Weight patterns to try in turn: the format the repo has, or safetensors then .bin when unknown."""
    if files is None:
        return list(WEIGHT_FORMATS)
    for patterns in WEIGHT_FORMATS:
        if any(fnmatch(f, p) for f in files for p in patterns):
            return [patterns]
    return [None]  # neither (Meta's .pth, say): no filter on weights


def _holds(folder: Path, patterns: Sequence[str]) -> bool:
    return any(fnmatch(p.relative_to(folder).as_posix(), pat) for p in folder.rglob("*") for pat in patterns)


def _warn(message: str) -> None:
    warnings.warn(message, XorWeightsWarning, stacklevel=3)
