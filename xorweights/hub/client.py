"""The part of hub that imports huggingface_hub, loaded only when a repo id is used.

huggingface_hub and its HTTP client take about 0.3 s to import; a decode of
local folders never pays for them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hf_tqdm

from ..errors import HubDownloadError, XorWeightsWarning
from .refs import Resolved, current_token

# The HTTP client's own errors (a refused connection, a proxy, TLS): httpx's
# and requests' HTTPError both sit in HfHubHTTPError's bases, whichever the
# installed huggingface_hub uses.
_CLIENT_ERRORS: tuple[type[BaseException], ...] = tuple(
    c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError" and c is not HfHubHTTPError
)
_HUB_ERRORS: tuple[type[BaseException], ...] = (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    *_CLIENT_ERRORS,
)

# HfHubHTTPError, offline mode and a missing cache entry are all OSErrors; so are requests' errors.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, *_CLIENT_ERRORS)

AUTH_HINT = "check the name; for a private or gated repo set HF_TOKEN or run `hf auth login`"

# snapshot_download retries 408 and 429 on a file body, not a server error, so
# one 503 would stop a decode. These statuses say "try again": the whole call is
# repeated after each delay (files already complete come from the cache).
RETRY_STATUSES = frozenset({500, 502, 503, 504})
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0)


class _SilentTqdm(hf_tqdm):
    """huggingface_hub's bars, switched off for --quiet."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The repo's file list when the Hub answers, else None.

    A failure here only means the weight format is guessed: snapshot_download
    then serves the cache, or raises the error worth reporting.
    """
    try:
        info = HfApi(token=current_token()).model_info(repo_id, revision=revision)
    except CONNECTION_ERRORS:
        return None
    return [s.rfilename for s in info.siblings or []]


def fetch(
    repo_id: str,
    revision: str | None,
    role: str,
    allow: Sequence[str] | None,
    ignore: Sequence[str] | None,
    progress: bool,
    revision_note: str = "",
) -> Resolved:
    """The snapshot folder of the files ``allow`` and ``ignore`` select, from the cache or the Hub.

    A server error (:data:`RETRY_STATUSES`) is retried after each of
    :data:`RETRY_DELAYS_S`, with a warning line each time; any other error,
    or the last server error, is explained in one line.
    """

    def download() -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(allow) if allow is not None else None,
                ignore_patterns=list(ignore) if ignore is not None else None,
                tqdm_class=None if progress else _SilentTqdm,
                token=current_token(),
            )
        )

    folder = _retrying(download, repo_id, revision, role, revision_note)
    return Resolved(folder, repo_id, folder.name)  # a cache snapshot folder is named by its commit sha


def fetch_file(repo_id: str, commit: str, role: str, name: str, token: str | None) -> Path:
    """One file of a repo at ``commit`` into the cache, retried as :func:`fetch` does, without a progress bar.

    It runs on the calling thread (snapshot_download starts threads of its
    own, which the interpreter would wait for at exit), so a download on a
    daemon thread never holds up the end of a command.
    """

    def download() -> Path:
        return Path(hf_hub_download(repo_id, name, revision=commit, token=token))

    return _retrying(download, repo_id, commit, role, "")


def _retrying(download: Callable[[], Path], repo_id: str, revision: str | None, role: str, note: str) -> Path:
    """``download()``, tried again after each of :data:`RETRY_DELAYS_S` while the Hub answers a server error."""
    attempt = 1
    while True:
        try:
            return download()
        except _HUB_ERRORS as exc:
            status = _status(exc)
            if attempt > len(RETRY_DELAYS_S) or status not in RETRY_STATUSES:
                raise _explain(exc, repo_id, revision, role, note, attempt) from exc
            delay = RETRY_DELAYS_S[attempt - 1]
            warnings.warn(
                f"{role} {repo_id}: {constants.ENDPOINT} answered HTTP {status}; "
                f"trying again in {delay:g} s (attempt {attempt + 1} of {len(RETRY_DELAYS_S) + 1})",
                XorWeightsWarning,
                stacklevel=3,
            )
            time.sleep(delay)
            attempt += 1


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a Hub error, if it came with a response."""
    return exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None


def _explain(
    exc: Exception, repo_id: str, revision: str | None, role: str, revision_note: str, attempts: int = 1
) -> HubDownloadError:
    """One line that names the repo and says how to fix it."""
    ref = f"{repo_id}@{revision}" if revision else repo_id
    where = f"{role} {ref}"
    endpoint = constants.ENDPOINT
    status = _status(exc)
    if isinstance(exc, GatedRepoError):
        return HubDownloadError(
            f"{where}: a gated repo on {endpoint}, and your token has no access to it",
            "accept the repo's terms on its Hub page, then set HF_TOKEN or run `hf auth login`",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return HubDownloadError(
            f"{where}: no such local folder, and no such repo on {endpoint} (or it is private)", AUTH_HINT
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubDownloadError(
            f"{where}: {repo_id} has no revision {revision}{revision_note}",
            "name a branch, tag or commit sha of the repo, or leave out @REVISION for its default branch",
        )
    if status in (401, 403):
        return HubDownloadError(f"{where}: {endpoint} refused access (HTTP {status})", AUTH_HINT)
    if isinstance(exc, LocalEntryNotFoundError):
        partly = "only partly " if type(exc).__name__ == "IncompleteSnapshotError" else "not "
        if constants.HF_HUB_OFFLINE:
            return HubDownloadError(
                f"{where}: {partly}in the local Hugging Face cache ({constants.HF_HUB_CACHE}), "
                "and HF_HUB_OFFLINE=1 forbids downloading it",
                "run once online, or set HF_HUB_OFFLINE=0, or pass a local folder",
            )
        cause = exc.__cause__
        why = f" ({type(cause).__name__})" if cause is not None else ""
        return HubDownloadError(
            f"{where}: could not reach {endpoint}{why}, and it is {partly}in the local Hugging Face cache",
            "check your connection and HF_ENDPOINT, or pass a local folder",
        )
    if status is not None:
        times = f", {attempts} times in a row" if attempts > 1 else ""
        return HubDownloadError(
            f"{where}: {endpoint} answered HTTP {status}{times}", "try again later, or pass a local folder"
        )
    return HubDownloadError(
        f"{where}: could not reach {endpoint} ({type(exc).__name__})",
        "check your connection, proxy and HF_ENDPOINT, or pass a local folder",
    )
