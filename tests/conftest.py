"""Shared fixtures: tiny LLaMA-shaped checkpoints made on the fly, and a CLI runner."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import xorweights
from xorweights.cli import main
from xorweights.fixtures import Pair, make_pair


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    """F16 base and fine-tune: 2 shards with an index, 4 added tokens, a value head."""
    return make_pair(tmp_path)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracebacks must stay hidden unless a test asks for them (with monkeypatch.setenv)."""
    monkeypatch.delenv("XORWEIGHTS_DEBUG", raising=False)


@pytest.fixture
def delta(pair: Pair, tmp_path: Path) -> Path:
    """The delta of ``pair``, encoded with the defaults."""
    out = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, out)
    return out


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Pair]:
    """Build a pair with options, each call in its own folder."""
    count = 0

    def build(**kwargs: object) -> Pair:
        nonlocal count
        count += 1
        return make_pair(tmp_path / f"pair{count}", **kwargs)  # type: ignore[arg-type]

    return build


def run(*args: object) -> Result:
    """Run the CLI in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, to prove inputs were not touched."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def files_digest(folder: Path) -> dict[str, str]:
    """sha256 of the visible files directly in ``folder``."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def partials(out: Path) -> list[Path]:
    """Partial files anywhere below ``out``: ours (in .xorweights/) and any under the old naming."""
    return sorted([*out.rglob("*.partial"), *out.rglob(".*xorweights-partial")])
