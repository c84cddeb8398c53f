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


# Prefixes that the same architecture carries or drops depending on the library.
KNOWN_PREFIXES = ("model.", "transformer.", "base_model.model.", "module.", "model.model.")


def auto_renames(target_names: Iterable[str], base_names: Iterable[str]) -> list[str]:
    """The rename that pairs *every* fine-tune tensor through one known prefix, if there is one.

    Only a whole-model convention difference is mapped automatically (a
    fine-tune saved inside a wrapper that prefixes every name, say); anything
    partial is left to an explicit --rename, because a wrong guess would
    publish weights in the clear.
    """
    targets, bases = set(target_names), set(base_names)
    if not targets or targets <= bases:
        return []
    for p in KNOWN_PREFIXES:
        if all(n.startswith(p) and n[len(p) :] in bases for n in targets):
            return [f"^={p}"]
        if all(p + n in bases for n in targets):
            return [f"^{re.escape(p)}="]
    return []
