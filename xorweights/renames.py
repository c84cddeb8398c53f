"""Map base tensor names onto the fine-tune's naming convention.

A rename is ``FROM=TO``: a regular expression and its replacement, applied
with ``re.sub`` to base tensor names. Renames only fill gaps: a fine-tune
tensor whose exact name is in the base always pairs with it, so a rule such
as ``^=model.`` (add the prefix) leaves ``lm_head.weight`` alone when both
sides already call it that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import UsageError


def parse_rename(text: str) -> tuple[re.Pattern[str], str]:
    pattern, sep, replacement = text.partition("=")
    if not sep:
        raise UsageError(f"--rename {text!r}: expected FROM=TO", "for example --rename '^=model.' to add a prefix")
    try:
        return re.compile(pattern), replacement
    except re.error as exc:
        raise UsageError(f"--rename {text!r}: {pattern!r} is not a valid regular expression ({exc})") from None


def base_name_map(base_names: Iterable[str], renames: list[str]) -> dict[str, str]:
    """``{name in the fine-tune's convention: base name}`` for the renamed base tensors."""
    rules = [parse_rename(r) for r in renames]
    mapped: dict[str, str] = {}
    for name in base_names:
        new = name
        for pattern, replacement in rules:
            new = pattern.sub(replacement, new)
        if new == name:
            continue
        if new in mapped:
            raise UsageError(
                f"--rename maps both base tensors {mapped[new]!r} and {name!r} to {new!r}",
                "make the FROM pattern more specific",
            )
        mapped[new] = name
    return mapped
