"""xorweights: publish and rebuild fine-tunes as per-tensor XOR deltas.

The public functions are imported on first use (PEP 562), not here: importing
the package loads only the standard library, so the ``xorweights`` command can
set up its Ctrl-C handling before numpy, zstandard and torch start loading,
and ``from xorweights.printable import printable`` stays cheap.
"""

from __future__ import annotations

import importlib
import sys
import types

# Not typing.TYPE_CHECKING: importing typing would cost a few milliseconds
# before the command's Ctrl-C handler is in place. Type checkers know the name.
TYPE_CHECKING = False

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_API = {
    "check_base": "decode",
    "checksum": "checksums",
    "decode": "decode",
    "decode_legacy": "legacy",
    "encode": "encode",
    "inspect": "report",
    "iter_state_dict": "load",
    "load_state_dict": "load",
    "migrate": "legacy",
    "verify": "checksums",
    "XorWeightsError": "errors",
}

if TYPE_CHECKING:
    from typing import Any

    from .checksums import checksum, verify
    from .decode import check_base, decode
    from .encode import encode
    from .errors import XorWeightsError
    from .legacy import decode_legacy, migrate
    from .load import iter_state_dict, load_state_dict
    from .report import inspect

__all__ = [
    "__version__",
    "check_base",
    "checksum",
    "decode",
    "decode_legacy",
    "encode",
    "inspect",
    "iter_state_dict",
    "load_state_dict",
    "migrate",
    "verify",
    "XorWeightsError",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module, keeping ``xorweights.decode`` and ``xorweights.encode`` the functions.

    Importing the submodule ``xorweights.decode`` (cli.py does) makes the
    import system bind it on the package under the same name as the function,
    and PEP 562's ``__getattr__`` is only asked about names that are missing.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if _API.get(name) == name and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
