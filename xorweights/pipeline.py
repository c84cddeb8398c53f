"""Run per-frame work on a few threads and consume the results in order.

The heavy steps (zstd, byte grouping, XOR, casts, pread/pwrite) release the
GIL, so threads give real parallelism. Hashes are streaming and must see the
bytes in order, so they run in the consumer. At most ``2 * jobs`` frames are
in flight, which bounds memory whatever the model size.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from .errors import UsageError

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


def ordered(work: Callable[[T], R], items: Iterable[T], jobs: int) -> Iterator[tuple[T, R]]:
    """Yield ``(item, work(item))`` in input order, computing up to ``jobs`` at once."""
    if jobs <= 1:
        for item in items:
            yield item, work(item)
        return
    pending: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(jobs, thread_name_prefix="xorweights") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(work, item)))
                if len(pending) >= in_flight(jobs):
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()
        finally:
            for _, future in pending:
                future.cancel()


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
    """Feeds a hash on a thread of its own, in order, so a whole-file sha256 costs no time on the consumer.

    ``update(data, buffer)`` queues ``data``; once it is hashed, ``release(buffer)``
    hands the buffer back (to a :class:`BufferPool`). At most ``depth`` updates
    wait, which bounds the memory held. hashlib releases the GIL on large
    inputs, so the hash runs beside the frame workers.
    """

    def __init__(self, hash_: Any, release: Callable[[Any], None], depth: int = 4) -> None:
        self._hash = hash_
        self._release = release
        self._queue: queue.Queue[tuple[Any, Any] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="xorweights-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            data, buffer = item
            if self._error is None:
                try:
                    self._hash.update(data)
                except BaseException as exc:  # reported by hexdigest(); keep draining so update() never blocks
                    self._error = exc
            if buffer is not None:
                self._release(buffer)

    def update(self, data: Any, buffer: Any = None) -> None:
        self._queue.put((data, buffer))

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self._stop()
        if self._error is not None:
            raise self._error
        return str(self._hash.hexdigest())

    def __enter__(self) -> BackgroundHash:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
