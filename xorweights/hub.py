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

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import unquote

from .errors import HubDownloadError, UsageError, XorWeightsWarning
from .manifest import BaseRef, Manifest, load_manifest

# One copy of the weights, in the order Checkpoint prefers them.
SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")
WEIGHT_FORMATS = (SAFETENSORS_PATTERNS, BIN_PATTERNS)


# A model repo's page, or its tree at a revision (a branch with a "/" is %2F-encoded
# in the URL). "https:/" too: a URL that went through pathlib (click.Path) lost a slash.
_HUB_URL = re.compile(
    r"https?:/{1,2}(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/?#@]+/[^/?#@]+)(?:/tree/(?P<rev>[^/?#]+))?/?"
)


@dataclass(frozen=True)
class Resolved:
    """A local folder, and the Hub repo and exact commit sha it is a snapshot of (None for a local path)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        """How to name it in messages and manifests."""
        return f"{self.repo_id}@{self.revision}" if self.repo_id else self.path.name


def parse_repo_ref(ref: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``ref`` names a Hub repo, None when it is a local path.

    An existing path always wins; otherwise ``org/name`` or ``org/name@revision``
    with a repo id huggingface_hub itself accepts, or the repo's page
    ``https://huggingface.co/org/name`` (``.../tree/REVISION`` for a revision).
    A bare ``name`` stays a local path: it is too easily a typo for a folder.
    """
    text = str(ref)
    if Path(text).exists() or Path(text).is_symlink():
        return None
    url = _HUB_URL.fullmatch(text)
    if url:
        text = url["repo"] + (f"@{unquote(url['rev'])}" if url["rev"] else "")
    repo_id, at, revision = text.partition("@")
    if (at and not revision) or repo_id.count("/") != 1:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # only for a would-be repo id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def repo_id_of(text: str) -> str:
    """``org/name`` for a Hub repo's page URL (``https://huggingface.co/org/name``); any other text as it is."""
    url = _HUB_URL.fullmatch(text)
    return url["repo"] if url and not url["rev"] else text


# The token every huggingface_hub call in this context uses; None: HF_TOKEN or the stored login.
_TOKEN: ContextVar[str | None] = ContextVar("xorweights_hub_token", default=None)


@contextlib.contextmanager
def hub_token(token: str | None) -> Iterator[None]:
    """Use ``token`` for every Hub call in the block instead of HF_TOKEN or `hf auth login` (None: those)."""
    reset = _TOKEN.set(token)
    try:
        yield
    finally:
        _TOKEN.reset(reset)


def current_token() -> str | None:
    """The token set by :func:`hub_token`, if any."""
    return _TOKEN.get()


def at_revision(ref: str | Path, revision: str | None, option: str = "--revision") -> str | Path:
    """``ref`` pinned to ``revision`` (``org/name@revision``), as ``hf download --revision`` does.

    UsageError when ``ref`` is a local path, or names another revision with ``@``.
    """
    if revision is None:
        return ref
    parsed = parse_repo_ref(ref)
    if parsed is None:
        raise UsageError(f"{option} {revision}: {ref} is a local path, not a Hub repo", f"leave out {option}")
    repo_id, asked = parsed
    if asked is not None and asked != revision:
        raise UsageError(
            f"{ref} names revision {asked}, and {option} names {revision}", f"pass one of @{asked} or {option}"
        )
    return f"{repo_id}@{revision}"


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
    from .hub_client import fetch

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
    from .hub_client import fetch, repo_files

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


def resolve_base(ref: str | Path, recorded: BaseRef, files: Sequence[str], *, progress: bool = True) -> Resolved:
    """Decode's base: pinned to the revision the delta records when ``ref`` names the recorded repo without one.

    Naming another repo, or a revision that resolves to another commit than
    the recorded one, works (every base tensor is checked anyway) but emits
    an :class:`XorWeightsWarning`.
    """
    parsed = parse_repo_ref(ref)
    if parsed is None:
        return Resolved(Path(ref))
    repo_id, asked = parsed
    same_repo = recorded.repo_id is not None and recorded.repo_id.lower() == repo_id.lower()
    pinned = recorded.revision if same_repo and asked is None else None
    got = resolve_checkpoint(
        ref, "base", files, revision=pinned, progress=progress, revision_note=" (the revision this delta records)"
    )
    made_from = f"{recorded.repo_id}@{recorded.revision}" if recorded.revision else f"{recorded.repo_id}"
    if recorded.repo_id is not None and not same_repo:
        _warn(f"base {repo_id}: this delta was made from {made_from}; decoding goes on and checks every base tensor")
    elif same_repo and asked is not None and recorded.revision not in (None, asked, got.revision):
        _warn(
            f"base {repo_id}@{asked} is commit {got.revision}, but this delta was made from revision "
            f"{recorded.revision}; decoding goes on and checks every base tensor "
            f"(leave out @{asked} to use the recorded revision)"
        )
    return got


def resolve_delta_and_base(
    delta: str | Path, base: str | Path, *, progress: bool = True
) -> tuple[Path, Path, Manifest]:
    """Local folders for decode's DELTA and --base, and the delta's manifest.

    The delta comes first: its manifest says which of the base's files are
    needed and which base revision it was made from.
    """
    delta_path = resolve(delta, "delta", progress=progress).path
    manifest = load_manifest(delta_path)
    referenced = [of.name for of in manifest.other_files if of.mode == "reference"]
    base_path = resolve_base(base, manifest.base, referenced, progress=progress).path
    return delta_path, base_path, manifest


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
