"""The ``xorweights`` command's entry point: Ctrl-C at any moment is one error line and exit code 130.

This module imports only the standard library (and the package, whose
``__init__`` is lazy), so the SIGINT handler is in place before numpy,
zstandard or torch start loading: an interrupt while they load ends the same
way as one during a decode. The first Ctrl-C unwinds the command cleanly; a
second one, while that takes long, leaves at once; neither prints more than
the one line. Not for library use: :func:`main` installs a signal handler and
ends the process.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

from .interrupts import INTERRUPTED_EXIT, _leave_now, _on_interrupt, _say_interrupted, _State, ignore_interrupts

# Only for type checkers: typing alone takes a few milliseconds to import,
# time in which a Ctrl-C would still print a traceback.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


def main() -> NoReturn:
    """Run the ``xorweights`` command line and exit."""
    code: int | str | None = INTERRUPTED_EXIT
    try:
        try:
            signal.signal(signal.SIGINT, _on_interrupt)
            _State.installed = True
            if os.environ.get("XORWEIGHTS_DEBUG") != "1":
                # Libraries warn while they load (numpy, torch); the CLI prints
                # only its own warnings, each on one line (cli._one_line_warnings).
                warnings.simplefilter("ignore")
            from .cli import main as commands

            _State.raise_now = False  # from here on, only inside interruptible()
            commands.main()  # click's standalone mode: always ends in SystemExit
        except SystemExit as exc:
            code = exc.code
        except Exception:  # a bug, re-raised by the CLI for its traceback with XORWEIGHTS_DEBUG=1
            import traceback

            from .errors import EXIT_INTERNAL

            traceback.print_exc()
            code = EXIT_INTERNAL
        finally:
            # Once the command is over, a Ctrl-C has nothing left to stop, and
            # one arriving while the interpreter shuts down would print
            # "Exception ignored in ..." with a traceback.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:  # while modules were loading
        ignore_interrupts()
        _say_interrupted()
        code = INTERRUPTED_EXIT
    if _State.raised:
        _leave_now(code)
    sys.exit(code)
