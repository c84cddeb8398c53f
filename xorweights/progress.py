"""Progress by bytes on stderr; silent with --quiet, off a terminal, or with HF_HUB_DISABLE_PROGRESS_BARS=1."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

# huggingface_hub.constants._is_true's values, compared after upper(). Copied
# rather than imported: importing huggingface_hub takes longer than many a
# command, and a progress bar must not pay for it.
_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})


def hub_bars_disabled() -> bool:
    """Whether HF_HUB_DISABLE_PROGRESS_BARS is set to a value huggingface_hub reads as true.

    Read at each call, not at import as huggingface_hub does, so a bar
    follows the environment of the moment.
    """
    return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in _TRUE_VALUES


def byte_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A bar counting ``total`` bytes on stderr.

    Shown only when ``enabled`` (no ``--quiet``), stderr is a terminal and
    HF_HUB_DISABLE_PROGRESS_BARS is not true: the one switch turns off the
    Hub's download bars and ours alike.
    """
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled or not sys.stderr.isatty() or hub_bars_disabled(),
        leave=False,
    )
