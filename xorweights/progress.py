"""Progress by bytes on stderr, silent when asked or when stderr is not a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def byte_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled or not sys.stderr.isatty(),
        leave=False,
    )
