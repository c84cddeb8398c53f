"""A Hub base not yet in the cache: fetched into it shard by shard while decoding starts on what has arrived.

Users keep their base, so its shards go into the Hugging Face cache as any
download does (:func:`~xorweights.hub.client.fetch_file`, with its retries), one
at a time on a thread of their own, in the order decode needs them. Planning
cannot wait for them: every base tensor's name, dtype and shape is checked
before any work starts. So each missing shard's header is fetched first by
range (two small requests), and the shard is planned from it; its first read
waits for the download and refuses a file whose header is not that one
(:class:`~xorweights.readers.safetensors_io.ArrivingSafetensorsFile`).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

from ..errors import InputFileError
from ..readers.safetensors_io import MAX_HEADER_BYTES, Arrival
from .client import fetch_file
from .ranges import RemoteData
from .refs import current_token


class ShardArrival:
    """One shard on its way into the cache: its header, fetched ahead, and a wait for the rest."""

    def __init__(self, prefix: bytes, size: int) -> None:
        self.prefix = prefix
        self.size = size
        self._done = threading.Event()
        self._error: BaseException | None = None

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error

    def arrived(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done.set()


class BaseDownload:
    """Fetches ``shards`` of ``repo_id`` at commit ``revision`` into the cache, in order, on a thread."""

    def __init__(self, repo_id: str, revision: str, shards: Sequence[str]) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.shards = list(shards)
        self.token = current_token()  # read now: the download thread does not see the caller's context
        self.arrivals = {name: self._header(name) for name in self.shards}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xorweights-base", daemon=True)

    def _header(self, name: str) -> ShardArrival:
        """The shard's 8-byte header length and header, by range; its size from the answer."""
        remote = RemoteData(self.repo_id, self.revision, role="base")  # plans nothing: no fetch threads
        try:
            length = remote.get(name, 0, 8)
            size = remote.size_of(name)
            assert size is not None  # the answer's Content-Range told it
            (n,) = struct.unpack("<Q", length)
            where = f"base {remote.where(name)}"
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputFileError(
                    f"{where}: header claims {n} bytes of a {size}-byte file", "the file is damaged; tell its owner"
                )
            return ShardArrival(bytes(length) + bytes(remote.get(name, 8, n)), size)
        finally:
            remote.close()

    def start(self) -> dict[str, Arrival]:
        self._thread.start()
        return dict(self.arrivals)

    def _run(self) -> None:
        for i, name in enumerate(self.shards):
            if self._stop.is_set():
                error: BaseException = InputFileError(f"base {self.repo_id}: download stopped")
            else:
                try:
                    fetch_file(self.repo_id, self.revision, "base", name, self.token)
                    self.arrivals[name].arrived()
                    continue
                except BaseException as exc:  # whatever it is must wake the reader, not leave it waiting
                    error = exc
            for rest in self.shards[i:]:
                self.arrivals[rest].arrived(error)
            return

    def stop(self) -> None:
        """Fetch no further shard (the one under way ends on its own)."""
        self._stop.set()
