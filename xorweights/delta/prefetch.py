"""Fetch planned reads ahead of the reader, a few at once, in a bounded window.

A streaming decode reads its frames in a known order. Each request to the
Hub costs a round trip, so contiguous frames are joined into *units* of up
to :data:`UNIT_BYTES`, fetched :data:`FETCH_THREADS` at a time, with at most
:data:`WINDOW_UNITS` units fetched or held at once: enough to keep the link
busy while frames are decoded, and a memory bound that does not depend on
the model's size. A unit hands over each frame as soon as its last byte has
arrived, so decoding follows the download closely, and a run that is killed
loses little more than the frames in flight. Measured (bench/stream.py), two
units of 8 MiB in flight kept up with 400 MB/s as well as four of 16 MiB,
with 40 MiB less memory and less lost to a kill.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

UNIT_BYTES = 8 << 20
WINDOW_UNITS = 2
FETCH_THREADS = 2

Deliver = Callable[[int, bytearray], None]
# (file, offset, frame lengths, deliver): fetch the frames stored back to back
# from offset, calling deliver(k, bytes) as each one is whole; raise if it cannot.
Fetch = Callable[[str, int, list[int], Deliver], None]


@dataclass
class _Unit:
    name: str
    start: int
    end: int  # past its last frame
    lengths: list[int] = field(default_factory=list)
    frames: list[Future[bytearray]] = field(default_factory=list)  # one per frame, once submitted
    left: int = 0  # planned reads not yet taken


@dataclass
class Prefetcher:
    """Serves planned ``(file, offset, length)`` reads from units fetched ahead on ``threads`` threads."""

    fetch: Fetch
    threads: int = FETCH_THREADS
    window: int = WINDOW_UNITS
    unit_bytes: int = UNIT_BYTES
    _units: list[_Unit] = field(default_factory=list)
    _places: dict[tuple[str, int], tuple[int, int, int]] = field(default_factory=dict)  # -> unit, frame, length
    _held: int = 0  # units submitted and not yet wholly taken
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
                self._places[(name, offset)] = (len(self._units) - 1, len(last.lengths), length)
                last.lengths.append(length)
                last.end += length
                last.left += 1

    def take(self, name: str, offset: int, length: int) -> bytearray | None:
        """The planned read's bytes (waiting for them if need be); None if it was not planned."""
        with self._lock:
            place = self._places.pop((name, offset), None)
            if place is None or place[2] != length:
                return None
            index, frame, _ = place
            self._fill(index)
            unit = self._units[index]
            future = unit.frames[frame]
        try:
            return future.result()
        finally:
            with self._lock:
                if frame < len(unit.frames):  # not closed meanwhile
                    unit.frames[frame] = _TAKEN  # its bytes are the caller's now
                unit.left -= 1
                if unit.left == 0:
                    self._held -= 1
                    self._fill(-1)

    def _fill(self, needed: int) -> None:
        """Submit units in order: at least up to ``needed``, and as many as the window allows."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="xorweights-fetch")
        while self._next < len(self._units) and (self._next <= needed or self._held < self.window):
            unit = self._units[self._next]
            unit.frames = [Future() for _ in unit.lengths]
            self._pool.submit(self._run, unit)
            self._next += 1
            self._held += 1

    def _run(self, unit: _Unit) -> None:
        def deliver(k: int, data: bytearray) -> None:
            unit.frames[k].set_result(data)

        try:
            self.fetch(unit.name, unit.start, unit.lengths, deliver)
        except BaseException as exc:  # every frame still awaited gets the error, not a wait forever
            for future in unit.frames:
                if not future.done():
                    future.set_exception(exc)

    def close(self) -> None:
        """Drop what was fetched ahead and not taken; running requests end on their own."""
        with self._lock:
            self._places.clear()
            for unit in self._units[: self._next]:
                unit.frames = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


_TAKEN: Future[bytearray] = Future()
