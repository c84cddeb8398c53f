"""Hub files read by HTTP range requests, straight into memory: a delta's data files, a base shard's header.

Every request goes through huggingface_hub's own helpers: ``hf_hub_url`` for
the address (HF_ENDPOINT), ``build_hf_headers`` for the token and user agent,
and ``get_session`` for the HTTP client, which follows the Hub's redirect to
its CDN or Xet bridge as it does for any download. Reads are pinned to the
commit sha the delta's manifest came from, so a push to the repo meanwhile
cannot mix two versions.

Each answer is held to what was asked: a 206 whose ``Content-Range`` is the
requested range of a file of the size the manifest declares, and exactly
that many bytes. A dropped connection, a short body or a 408/429/5xx is
retried after each of :data:`~xorweights.hub.client.RETRY_DELAYS_S`, with a
warning line each time.
"""

from __future__ import annotations

import re
import threading
import warnings
from typing import Any

from huggingface_hub import constants, hf_hub_url
from huggingface_hub.utils import build_hf_headers, get_session

from ..delta import prefetch
from ..errors import DeltaCorruptError, HubDownloadError, XorWeightsWarning
from ..sizes import human_bytes
from . import client
from .client import AUTH_HINT, CONNECTION_ERRORS
from .refs import current_token

RETRY_RANGE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_CHUNK = 1 << 20


class _Retry(Exception):
    """One failed attempt worth repeating; the message says what went wrong."""


class RemoteData:
    """The data files of a delta on the Hub, at one commit, read by range."""

    remote = True

    def __init__(self, repo_id: str, revision: str, role: str = "delta") -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.role = role
        self.token = current_token()  # read now: the fetch threads do not see the caller's context
        self._sizes: dict[str, int] = {}
        self._fetched = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # The module's sizes are read now, so a test can make them small.
        self._prefetch = prefetch.Prefetcher(
            self.read_into,
            threads=prefetch.FETCH_THREADS,
            window=prefetch.WINDOW_UNITS,
            unit_bytes=prefetch.UNIT_BYTES,
        )

    def where(self, name: str) -> str:
        return f"{self.repo_id}@{self.revision}/{name}"

    # ------------------------------------------------------------ DeltaData

    def check(self, name: str, size: int) -> None:
        self._sizes[name] = size  # checked against each answer's Content-Range: asking now would cost a request

    def plan(self, spans: list[tuple[str, int, int]]) -> None:
        self._prefetch.plan(spans)

    def open(self, name: str, size: int) -> RemoteFile:
        self._sizes[name] = size
        return RemoteFile(self, name)

    def fetched(self) -> int:
        return self._fetched

    def take(self, name: str, offset: int, length: int) -> bytearray:
        """A planned read from what was fetched ahead, or a request of its own."""
        planned = self._prefetch.take(name, offset, length)
        return planned if planned is not None else self.get(name, offset, length)

    def size_of(self, name: str) -> int | None:
        """The file's size: declared by the manifest, else as the first answer for it told."""
        return self._sizes.get(name)

    def close(self) -> None:
        self._closed.set()  # fetches ahead stop retrying: the interpreter waits for their threads at exit
        self._prefetch.close()

    # ------------------------------------------------------------ requests

    def get(self, name: str, offset: int, length: int) -> bytearray:
        """Exactly ``length`` bytes at ``offset`` of ``name``, retrying what may pass."""
        got: list[bytearray] = []
        self.read_into(name, offset, [length], lambda _, data: got.append(data))
        return got[0]

    def read_into(self, name: str, offset: int, lengths: list[int], deliver: prefetch.Deliver) -> None:
        """Fetch the frames of ``lengths`` stored back to back from ``offset``, each to ``deliver`` once whole.

        One request covers them all. A failed attempt is retried after each of
        :data:`~xorweights.hub.client.RETRY_DELAYS_S`, from the first frame not
        yet delivered, so a dropped connection costs one frame, not the unit.
        """
        if constants.HF_HUB_OFFLINE:
            raise HubDownloadError(
                f"{self.role} {self.where(name)}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
                "forbids downloading it",
                "run once online, or set HF_HUB_OFFLINE=0",
            )
        done = [0, offset]  # frames delivered, and where the next one starts

        def delivered(k: int, data: bytearray) -> None:
            deliver(done[0], data)
            done[0] += 1
            done[1] += len(data)

        last = ""
        delays = client.RETRY_DELAYS_S
        for attempt in range(len(delays) + 1):
            if attempt:
                delay = delays[attempt - 1]
                if not self._closed.is_set():
                    warnings.warn(
                        f"{self.role} {self.where(name)}: bytes {done[1]}-{offset + sum(lengths) - 1}: {last}; "
                        f"trying again in {delay:g} s (attempt {attempt + 1} of {len(delays) + 1})",
                        XorWeightsWarning,
                        stacklevel=2,
                    )
                if self._closed.wait(delay):  # closed: nobody waits for these bytes any more
                    raise HubDownloadError(f"{self.role} {self.where(name)}: stopped")
            try:
                self._stream_once(name, done[1], lengths[done[0] :], delivered)
                return
            except _Retry as exc:
                last = str(exc)
        raise HubDownloadError(
            f"{self.role} {self.where(name)}: bytes {done[1]}-{offset + sum(lengths) - 1}: {last}, "
            f"{len(delays) + 1} times in a row",
            "try again later: the same command resumes where it stopped; or pass --download-first",
        )

    def _stream_once(self, name: str, offset: int, lengths: list[int], deliver: prefetch.Deliver) -> None:
        url = hf_hub_url(self.repo_id, name, revision=self.revision)
        total = sum(lengths)
        headers = {**build_hf_headers(token=self.token), "Range": f"bytes={offset}-{offset + total - 1}"}
        session: Any = get_session()
        timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        try:
            if callable(getattr(session, "stream", None)):  # httpx, huggingface_hub 1.0 and later
                with session.stream("GET", url, headers=headers, timeout=timeout) as r:
                    self._check_answer(r, name, offset, total)
                    self._split(r.iter_bytes(), lengths, deliver)
                    return
            # requests, huggingface_hub 0.x
            with session.get(url, headers=headers, timeout=timeout, stream=True) as r:
                self._check_answer(r, name, offset, total)
                self._split(r.iter_content(_CHUNK), lengths, deliver)
        except CONNECTION_ERRORS as exc:
            raise _Retry(f"the connection failed ({type(exc).__name__})") from None

    def _check_answer(self, r: Any, name: str, offset: int, length: int) -> None:
        """Refuse an answer whose status or range is not the one asked for; learn the file's size."""
        status = r.status_code
        where = f"{self.role} {self.where(name)}"
        if status in RETRY_RANGE_STATUSES:
            raise _Retry(f"{constants.ENDPOINT} answered HTTP {status}")
        if status in (401, 403):
            raise HubDownloadError(f"{where}: {constants.ENDPOINT} refused access (HTTP {status})", AUTH_HINT)
        if status == 404:
            raise HubDownloadError(
                f"{where}: not found on {constants.ENDPOINT}, although the delta's manifest lists it",
                "the repo is incomplete; tell its owner, or pass a local copy of the delta",
            )
        size = self._sizes.get(name)
        if status == 416:
            raise DeltaCorruptError(
                f"{where}: smaller than the {size} bytes its manifest declares (HTTP 416 for bytes {offset}-)"
                if size is not None
                else f"{where}: has no bytes {offset}-{offset + length - 1} (HTTP 416)",
                "the repo on the Hub does not match its manifest; tell its owner",
            )
        if status != 206:
            raise HubDownloadError(
                f"{where}: {constants.ENDPOINT} answered HTTP {status} to a range request, expected 206",
                "this server does not serve byte ranges: decode again with --download-first",
            )
        told = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", "").strip())
        if told is None or (int(told[1]), int(told[2])) != (offset, offset + length - 1):
            raise _Retry(f"the answer holds bytes {r.headers.get('content-range')!r}, not the range asked for")
        if size is None:
            self._sizes[name] = size = int(told[3])
        if int(told[3]) != size:
            raise DeltaCorruptError(
                f"{where}: {told[3]} bytes on the Hub, its manifest declares {size}",
                "the delta on the Hub does not match its manifest; tell its owner",
            )

    def _split(self, chunks: Any, lengths: list[int], deliver: prefetch.Deliver) -> None:
        """Cut the body into frames of ``lengths`` and deliver each once whole; refuse a body too short or long."""
        k, got = 0, 0
        frame = bytearray(lengths[0]) if lengths else bytearray()
        for chunk in chunks:
            view = memoryview(chunk)
            with self._lock:
                self._fetched += len(view)
            while len(view):
                if k == len(lengths):
                    raise _Retry("the answer is longer than the range asked for")
                n = min(len(view), lengths[k] - got)
                frame[got : got + n] = view[:n]
                view, got = view[n:], got + n
                if got == lengths[k]:
                    deliver(k, frame)
                    k, got = k + 1, 0
                    frame = bytearray(lengths[k]) if k < len(lengths) else bytearray()
        if k < len(lengths):
            done = sum(lengths[:k]) + got
            raise _Retry(f"the answer ended after {human_bytes(done)} of {human_bytes(sum(lengths))}")


class RemoteFile:
    """One data file of a delta on the Hub; reads come from the prefetched units when planned."""

    def __init__(self, data: RemoteData, name: str) -> None:
        self.data = data
        self.name = name
        self.where = data.where(name)

    def read(self, offset: int, length: int) -> bytearray:
        return self.data.take(self.name, offset, length)

    def refetch(self, offset: int, length: int) -> bytearray:
        return self.data.get(self.name, offset, length)

    def close(self) -> None:
        pass  # the connections belong to huggingface_hub's session
