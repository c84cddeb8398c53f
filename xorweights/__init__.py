"""xorweights: publish and rebuild fine-tunes as per-tensor XOR deltas."""

from __future__ import annotations

__version__ = "0.1.0"

from .checksums import checksum, verify  # noqa: E402
from .decode import check_base, decode  # noqa: E402
from .encode import encode  # noqa: E402
from .errors import XorWeightsError  # noqa: E402
from .legacy import decode_legacy, migrate  # noqa: E402
from .load import iter_state_dict, load_state_dict  # noqa: E402
from .report import inspect  # noqa: E402

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
