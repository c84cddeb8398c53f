"""Text from an input, made safe to print: one line that cannot steer the terminal.

Tensor names, file names, descriptions and error messages come from files and
servers we do not control. A raw newline in one could fake a second line of
output ("rebuilt OK"), a carriage return could overwrite the line it is on, and
an escape sequence could move the cursor, clear the screen or retitle the
window. Everything the CLI prints, and every name in the model card, goes
through :func:`printable` first.
"""

from __future__ import annotations

import unicodedata

# Unicode's "other" categories: controls (Cc: NUL..US, DEL, C1 including CSI),
# format characters (Cf: bidi overrides such as U+202E, zero-width joiners),
# surrogates (Cs: how Python holds file names that are not valid UTF-8),
# private use (Co) and unassigned (Cn). The line and paragraph separators
# (Zl, Zp) are escaped too: str.splitlines() and many viewers break lines there.
_ESCAPED_SPACES = ("Zl", "Zp")


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    category = unicodedata.category(char)
    return category.startswith("C") or category in _ESCAPED_SPACES


def printable(text: object) -> str:
    """``str(text)`` with every control, format, surrogate, private-use or unassigned character escaped.

    Escapes look like Python's: ``\\x1b``, ``\\u202e``, ``\\U000e0001``. The
    backslash itself is left alone: the aim is a line that cannot move the
    cursor, not one that can be parsed back.
    """
    text = str(text)
    if text.isprintable():  # false for every character escaped below, and more: a fast path
        return text
    return "".join(_escape(c) if _unsafe(c) else c for c in text)
