"""Ctrl-C for the ``xorweights`` command: one error line and exit code 130, whenever it comes.

Only the standard library is imported here, so :mod:`xorweights.entry` can put
the handler in place before numpy, zstandard or torch start loading. The CLI
runs each command inside :func:`interruptible`. Outside the command (the
library, the CLI run in-process) none of this changes anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

# Only for type checkers: typing alone takes a few milliseconds to import,
# time in which a Ctrl-C would still print a traceback.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType
    from typing import NoReturn

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
INTERRUPTED = (
    "interrupted; nothing half-written was left under a final name (hint: run the same command again to resume)"
)


class _State:
    installed = False  # main() put its handlers in place: the process is the xorweights command
    # Whether SIGINT raises KeyboardInterrupt right away. True while modules
    # load and while a command runs; False inside click's own code around the
    # command, whose answer to KeyboardInterrupt is a blank line and "Aborted!".
    raise_now = True
    pending = False  # a Ctrl-C came and has not been raised yet
    raised = False  # a KeyboardInterrupt was raised: work was cut short


# Modules a KeyboardInterrupt must not cut through. CPython's locks,
# conditions and queues are not safe against an exception arriving between two
# of their lines: it can leave a lock held or a wakeup lost, and the unwinding
# then hangs joining a worker thread, or fails with "cannot release un-acquired
# lock". An interrupt that finds the main thread in one of them waits until it
# is out (the main thread spends most of a decode waiting there for frames).
_LOCKING = frozenset({"threading", "queue", "concurrent.futures._base", "concurrent.futures.thread"})
_RETRY_SECONDS = 0.002


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    # The first Ctrl-C unwinds the command, which removes its partial files and
    # releases the folder lock on the way; a second one during that unwinding
    # must not cut it short with a traceback.
    signal.signal(signal.SIGINT, _on_second_interrupt)
    _State.pending = True
    _raise_if_safe(frame)


def _raise_if_safe(frame: FrameType | None) -> None:
    if not (_State.pending and _State.raise_now):
        return
    if _in_locking_code(frame):
        signal.signal(signal.SIGALRM, lambda signum, frame: _raise_if_safe(frame))
        signal.setitimer(signal.ITIMER_REAL, _RETRY_SECONDS)  # look again in a moment
        return
    _raise()


def _in_locking_code(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__") in _LOCKING:
            return True
        frame = frame.f_back
    return False


def _on_second_interrupt(signum: int, frame: FrameType | None) -> None:
    # The unwinding is taking long, or hangs (a worker thread that never
    # finishes): leave now, as after kill -9, which every output survives.
    ignore_interrupts()
    _say_interrupted()
    _leave_now(INTERRUPTED_EXIT)


def _raise() -> NoReturn:
    _State.pending = False
    _State.raised = True
    raise KeyboardInterrupt


def was_interrupted() -> bool:
    """Whether a Ctrl-C raised KeyboardInterrupt in this process: whatever fails after it is its consequence."""
    return _State.raised


def ignore_interrupts() -> None:
    """Ignore Ctrl-C from now on, in the ``xorweights`` command; elsewhere do nothing.

    Called just before the interrupted line is printed: the line and the exit
    follow at once, so the line is printed once, whole, and nothing after it.
    """
    if _State.installed:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _say_interrupted() -> None:
    # The one line the CLI also prints (cli._fail), written directly: the CLI
    # may not be imported yet. The text is fixed, so it needs no escaping.
    with contextlib.suppress(Exception):
        sys.stderr.write(f"xorweights: error: {INTERRUPTED}\n")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Let Ctrl-C raise KeyboardInterrupt inside this block, including one that came just before it.

    The CLI runs each command in this block and turns the KeyboardInterrupt
    into its one error line. Without :func:`main`'s handler installed (the CLI
    run in-process) it changes nothing.
    """
    previous = _State.raise_now
    _State.raise_now = True
    try:
        if _State.pending:
            _raise()
        yield
    finally:
        _State.raise_now = previous


def _leave_now(code: int | str | None) -> NoReturn:
    """Exit without the interpreter's shutdown, as kill -9 would but with the output flushed.

    After an interrupt, worker threads may still be reading or writing a
    frame: a normal exit would wait for them, and objects finalized during
    shutdown can print "Exception ignored in ..." lines. Skipping the shutdown
    is safe for the reason kill -9 is: no file gets its final name before it
    is complete, and the next run resumes from what is there.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0 if code is None else code if isinstance(code, int) else 1)
