"""What names a Hub repo: ``org/name[@revision]`` or its page URL, the snapshot it resolved to, and the token.

Below both the resolver and the client, so neither imports the other to share them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ..errors import UsageError

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
