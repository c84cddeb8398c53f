"""``python -m xorweights``: the same as the ``xorweights`` command."""

from __future__ import annotations

from .entry import main

if __name__ == "__main__":
    main()
