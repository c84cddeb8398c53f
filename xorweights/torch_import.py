"""torch, imported only where it is needed: the ``xorweights[torch]`` extra.

Safetensors checkpoints are read as raw bytes and never need torch. It is
needed only to read HF ``pytorch_model*.bin`` pickles and Meta's
``consolidated.*.pth`` shards, and for :func:`xorweights.load_state_dict` and
:func:`xorweights.iter_state_dict`, which hand out torch tensors. Every
import of torch in the package goes through :func:`require_torch`, so a
missing torch is always the same one-line error naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UsageError

EXTRA = "xorweights[torch]"
INSTALL_HINT = f"pip install '{EXTRA}'"


def require_torch(purpose: str) -> ModuleType:
    """The ``torch`` module, or a :class:`UsageError` that says ``purpose`` needs the ``[torch]`` extra.

    ``purpose`` completes the sentence "... needs torch", e.g.
    ``"model/pytorch_model.bin: reading a PyTorch .bin or .pth checkpoint"``.
    """
    try:
        return importlib.import_module("torch")
    except ModuleNotFoundError as exc:
        if exc.name != "torch":  # torch is there but one of its own dependencies is not: show that
            raise
        raise UsageError(f"{purpose} needs torch, which is not installed", INSTALL_HINT) from None
