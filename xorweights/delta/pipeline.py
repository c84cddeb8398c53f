"""Run per-frame work on a few threads and consume the results in order.

The heavy steps (zstd, byte grouping, XOR, casts, pread/pwrite) release the
GIL, so threads give real parallelism. Hashes are streaming and must see the
bytes in order, so they run in the consumer. At most ``2 * jobs`` frames are
in flight, which bounds memory whatever the model size.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from ..errors import UsageError

T = TypeVar("T")
R = TypeVar("R")


def resolve_jobs(jobs: int | None) -> int:
    """``None`` means one thread per core."""
    if jobs is None:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: need at least 1")
    return jobs


def in_flight(jobs: int) -> int:
    return 2 * jobs


def ordered(
    work: Callable[[T], R],
    items: Iterable[T],
    jobs: int,
    pool: ThreadPoolExecutor | None = None,
    depth: int | None = None,
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, work(item))`` in input order, computing up to ``jobs`` at once.

    ``pool`` (with ``jobs`` threads) is used when given, so a caller walking
    thousands of files does not start threads for each one. At most ``depth``
    items (default :func:`in_flight`) are submitted and not yet yielded.
    """
    if jobs <= 1:
        for item in items:
            yield item, work(item)
        return
    if pool is None:
        with ThreadPoolExecutor(jobs, thread_name_prefix="xorweights") as own:
            yield from ordered(work, items, jobs, own, depth)
        return
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(work, item)))
            if len(pending) >= (depth or in_flight(jobs)):
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        for _, future in pending:
            future.cancel()
        for _, future in pending:  # a running one may still write into a buffer or a file: let it finish
            if not future.cancelled():
                future.exception()


class BufferPool:
    """Reusable byte buffers, so frames don't pay for fresh pages every time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return np.empty(self.size, dtype=np.uint8)

    def put(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(buffer)


class BackgroundHash:
    """Feeds a hash on another thread, in order, so a whole-file sha256 costs no time on the consumer.

    ``executor`` must have exactly one thread (its tasks then run in order);
    it is shared by every file of a run. ``update(data, buffer)`` queues
    ``data``; once hashed, ``release(buffer)`` hands the buffer back (to a
    :class:`BufferPool`). At most ``depth`` updates wait, which bounds the
    memory held. hashlib releases the GIL on large inputs, so the hash runs
    beside the frame workers.
    """

    def __init__(
        self, hash_: Any, release: Callable[[Any], None], executor: ThreadPoolExecutor, depth: int = 2
    ) -> None:
        self._hash = hash_
        self._release = release
        self._executor = executor
        self._depth = depth
        self._pending: deque[Future[None]] = deque()

    def _feed(self, data: Any, buffer: Any) -> None:
        try:
            self._hash.update(data)
        finally:
            if buffer is not None:
                self._release(buffer)

    def update(self, data: Any, buffer: Any = None) -> None:
        self._pending.append(self._executor.submit(self._feed, data, buffer))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        self._drain()
        return str(self._hash.hexdigest())

    def __enter__(self) -> BackgroundHash:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._pending:  # no task may still touch a buffer once the caller moves on
            self._pending.popleft().exception()
