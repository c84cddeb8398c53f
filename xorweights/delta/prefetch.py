"""Fetch planned reads ahead of the reader, a few at once, in a bounded window.

A streaming decode reads its frames in a known order. Each request to the
Hub costs a round trip, so contiguous frames are joined into *units* of up
to :data:`UNIT_BYTES`, and up to :data:`WINDOW_UNITS` units are fetched or
held at once: enough to keep the link busy while frames are decoded, and a
memory bound that does not depend on the model's size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

UNIT_BYTES = 16 << 20
WINDOW_UNITS = 6
FETCH_THREADS = 4

Fetch = Callable[[str, int, int], bytes | bytearray]  # (file, offset, length) -> exactly those bytes, or an error


@dataclass
class _Unit:
    name: str
    start: int
    end: int
    reads: int = 0  # planned reads it holds that were not yet taken


@dataclass(frozen=True)
class _Place:
    unit: int
    at: int  # offset within the unit
    length: int


@dataclass
class Prefetcher:
    """Serves planned ``(file, offset, length)`` reads from units fetched ahead on ``threads`` threads."""

    fetch: Fetch
    threads: int = FETCH_THREADS
    window: int = WINDOW_UNITS
    unit_bytes: int = UNIT_BYTES
    _units: list[_Unit] = field(default_factory=list)
    _places: dict[tuple[str, int], _Place] = field(default_factory=dict)
    _futures: dict[int, Future[bytes | bytearray]] = field(default_factory=dict)
    _next: int = 0  # the first unit not yet submitted
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None

    def plan(self, spans: list[tuple[str, int, int]]) -> None:
        """Add reads to come, in the order they will be taken."""
        with self._lock:
            for name, offset, length in spans:
                last = self._units[-1] if len(self._units) > self._next else None
                joins = last is not None and last.name == name and last.end == offset
                if not (joins and last is not None and last.end + length - last.start <= self.unit_bytes):
                    last = _Unit(name, offset, offset)
                    self._units.append(last)
                self._places[(name, offset)] = _Place(len(self._units) - 1, offset - last.start, length)
                last.end += length
                last.reads += 1

    def take(self, name: str, offset: int, length: int) -> memoryview | None:
        """The planned read's bytes (waiting for them if need be); None if it was not planned."""
        with self._lock:
            place = self._places.pop((name, offset), None)
            if place is None or place.length != length:
                return None
            self._fill(place.unit)
            future = self._futures[place.unit]
        try:
            data = future.result()
        finally:
            with self._lock:
                unit = self._units[place.unit]
                unit.reads -= 1
                if unit.reads == 0:
                    del self._futures[place.unit]
                    self._fill(-1)
        return memoryview(data)[place.at : place.at + length]

    def _fill(self, needed: int) -> None:
        """Submit units in order: at least up to ``needed``, and as many as the window allows."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="xorweights-fetch")
        while self._next < len(self._units) and (self._next <= needed or len(self._futures) < self.window):
            unit = self._units[self._next]
            self._futures[self._next] = self._pool.submit(self.fetch, unit.name, unit.start, unit.end - unit.start)
            self._next += 1

    def close(self) -> None:
        """Drop what was fetched ahead and not taken; running requests end on their own."""
        with self._lock:
            for future in self._futures.values():
                future.cancel()
            self._futures.clear()
            self._places.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
