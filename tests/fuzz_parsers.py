"""Fuzz the parsers that read bytes from strangers: safetensors headers, delta manifests, Meta's params.json, decode state.

The only exception each may raise is its documented one: ``InputFileError``
from :func:`parse_header`, ``ManifestError`` from :func:`parse_manifest`,
``CheckpointError`` from :func:`parse_params`, ``OutputError`` from
:func:`parse_state` (the decode state lives in OUT, which another process may write). Anything else (a ``TypeError``,
a ``RecursionError``...) reaches the user as a traceback instead of one line
with a hint.

One fuzz input is one selector byte, then the parser's input. The selector
picks an entry of :data:`TARGETS`, modulo its length:

* 0 (``HEADER``): a 4-byte little-endian data size, then header bytes for ``parse_header``;
* 1 (``MANIFEST``): UTF-8 text for ``parse_manifest``;
* 2 (``PARAMS``): the bytes of a ``params.json`` for ``parse_params``;
* 3 (``STATE``): the bytes of ``OUT/.xorweights/decode-state.jsonl`` for ``parse_state``.

Targets are only ever appended, so the inputs in :data:`REGRESSIONS`, written
with each target's own index, keep feeding the same parser.

Coverage-guided, with atheris (``pip install atheris``); libFuzzer flags pass through::

    python tests/fuzz_parsers.py -max_total_time=60 [CORPUS_DIR ...]

Without atheris, or with ``--plain``, a seeded random mutation loop::

    python tests/fuzz_parsers.py --plain --seconds 30 [--seed 1]

Every run first replays :data:`REGRESSIONS`, the inputs of bugs found so far.
``tests/test_properties.py`` runs :func:`fuzz` for a few seconds on every test run.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from xorweights import checksum, decode_state, encode
from xorweights.decode_state import parse_state
from xorweights.delta import manifest
from xorweights.delta.manifest import MANIFEST_NAME, parse_manifest
from xorweights.errors import CheckpointError, InputFileError, ManifestError, OutputError
from xorweights.fixtures import make_pair
from xorweights.readers import meta_llama, safetensors_io
from xorweights.readers.meta_llama import parse_params
from xorweights.readers.safetensors_io import build_header, parse_header


@dataclass(frozen=True)
class Target:
    """One parser under fuzz: how it reads the input after the selector, and the one error it may raise."""

    name: str
    parse: Callable[[bytes], object]
    allowed: type[Exception]
    module: ModuleType  # instrumented under atheris
    prefix: int = 0  # bytes of a little-endian size before the text, mutated as a number


def _header(data: bytes) -> object:
    return parse_header(data[4:], int.from_bytes(data[:4], "little"), "fuzz")


def _manifest(data: bytes) -> object:
    return parse_manifest(data.decode("utf-8", "replace"), "fuzz")


def _params(data: bytes) -> object:
    return parse_params(data, "fuzz")


def _state(data: bytes) -> object:
    return parse_state(data, "fuzz")


# Append only: a target's index is its selector byte in REGRESSIONS and in saved corpora.
TARGETS: tuple[Target, ...] = (
    Target("safetensors header", _header, InputFileError, safetensors_io, prefix=4),
    Target("delta manifest", _manifest, ManifestError, manifest),
    Target("Meta params.json", _params, CheckpointError, meta_llama),
    Target("decode state", _state, OutputError, decode_state),
)
HEADER, MANIFEST, PARAMS, STATE = 0, 1, 2, 3


def target_of(data: bytes) -> Target:
    """The target a non-empty fuzz input is fed to."""
    return TARGETS[data[0] % len(TARGETS)]


def header_input(header: bytes, data_size: int) -> bytes:
    """The fuzz input that feeds ``header`` and ``data_size`` to ``parse_header``."""
    return bytes([HEADER]) + (data_size % 2**32).to_bytes(4, "little") + header


def manifest_input(text: str) -> bytes:
    """The fuzz input that feeds ``text`` to ``parse_manifest``."""
    return bytes([MANIFEST]) + text.encode("utf-8", "surrogatepass")


def params_input(text: str) -> bytes:
    """The fuzz input that feeds ``text`` to ``parse_params``."""
    return bytes([PARAMS]) + text.encode("utf-8", "surrogatepass")


def state_input(text: str) -> bytes:
    """The fuzz input that feeds ``text`` to ``parse_state``."""
    return bytes([STATE]) + text.encode("utf-8", "surrogatepass")


SAMPLE_STATE = (
    json.dumps({"delta": "a" * 64, "dtype": None})
    + "\n"
    + json.dumps({"file": "model-00001-of-00002.safetensors", "stat": [45032, 1700000000000000000], "sha256": "b" * 64})
    + "\n"
    + json.dumps(
        {
            "file": "model-00002-of-00002.safetensors",
            "stat": [1024, 1],
            "sha256": "c" * 64,
            "tensors": {"lm_head.weight": ["F16", [36, 32], "d" * 32]},
        }
    )
    + "\n"
)


def one_input(data: bytes) -> None:
    """Run one fuzz input through its parser; only the parser's documented error may escape."""
    if not data:
        return
    target = target_of(data)
    try:
        target.parse(data[1:])
    except target.allowed:
        pass


# ---------------------------------------------------------------- seeds


def sample_header() -> tuple[bytes, int]:
    """A valid header (without its length prefix) and the size of its data section."""
    prefix, layout = build_header(
        [
            ("model.embed_tokens.weight", "F16", (4, 2)),
            ("model.norm.weight", "BF16", (2,)),
            ("v_head.weight", "F32", (1, 2)),
            ("step", "I64", ()),
            ("mask", "BOOL", (0, 3)),
        ],
        {"format": "pt"},
    )
    return prefix[8:], layout[-1].end


@functools.cache
def _encoded_pair() -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pair = make_pair(root / "pair")
        # Small frames give tensors several frames, so there is more to mutate.
        encode(pair.finetuned, pair.base, root / "delta", frame_bytes=4096, jobs=1)
        return (root / "delta" / MANIFEST_NAME).read_text(), checksum(pair.finetuned).to_json()


def sample_manifest() -> str:
    """The manifest of a real delta (the default fixture pair), made once per process."""
    return _encoded_pair()[0]


def sample_checksums() -> str:
    """The checksum manifest of the same pair's fine-tune."""
    return _encoded_pair()[1]


# The params.json of Meta's Llama 2 70B, and sizes nested under "model", as some releases write them.
SAMPLE_PARAMS = json.dumps(
    {
        "dim": 8192,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,
        "n_heads": 64,
        "n_kv_heads": 8,
        "n_layers": 80,
        "norm_eps": 1e-05,
        "vocab_size": -1,
    }
)
NESTED_PARAMS = json.dumps({"model": {"dim": 4096, "n_heads": 32, "n_layers": 32, "rope_theta": 500000.0}})


# A well-formed manifest of a delta with no weight files, whose exposure
# percentage is an integer too large for a float.
HUGE_PCT_MANIFEST = json.dumps(
    {
        "format": "xorweights-delta",
        "format_version": 2,
        "tool_version": "0.1.0",
        "base": {"description": ""},
        "compression": "zstd",
        "frame_bytes": 8,
        "weight_files": [],
        "other_files": [],
        "exposure": {"allowed": True, "max_unprotected_pct": 10**400, "unprotected_bytes": 0},
    }
)
DEEP_JSON = "[" * 100_000

# Inputs that once escaped the parsers with the wrong exception, replayed before every run.
REGRESSIONS: tuple[bytes, ...] = (
    header_input(b'{"w":{"dtype":[],"shape":[],"data_offsets":[0,0]}}', 0),  # TypeError: unhashable type
    header_input(DEEP_JSON.encode(), 0),  # RecursionError
    manifest_input(DEEP_JSON),  # RecursionError
    manifest_input(HUGE_PCT_MANIFEST),  # OverflowError: int too large to convert to float
)


def seeds() -> list[bytes]:
    """The regression inputs, then valid inputs to start mutating from."""
    header, size = sample_header()
    return [
        *REGRESSIONS,
        header_input(header, size),
        manifest_input(sample_manifest()),
        params_input(SAMPLE_PARAMS),
        params_input(NESTED_PARAMS),
        state_input(SAMPLE_STATE),
    ]


# ---------------------------------------------------------------- mutations

_INTS = (0, 1, -1, 2, 7, 8, 255, 256, 2**31, 2**32, 2**63, 2**64, -(2**63), 10**30, 10**400)
_FLOATS = (0.0, -0.0, 0.5, -1.5, 1e308, float("inf"), float("-inf"), float("nan"))
_STRINGS = (
    "",
    "F16",
    "BF16",
    "F32",
    "I64",
    "xor",
    "partial_xor",
    "raw",
    "zstd",
    "none",
    "ship",
    "reference",
    "__metadata__",
    "../escape",
    "/abs",
    "a/b.safetensors",
    "x.xwd",
    ".hidden",
    "0" * 32,
    "f" * 64,
    "\u00e9",
    "\x00",
)
_KEYS = ("dtype", "shape", "data_offsets", "__metadata__", "name", "base", "frames", "xor_bytes", "exposure", "x")
_TOKENS = (b'"', b"{", b"}", b"[", b"]", b",", b":", b"\\", b"\\u", b"-", b"0", b"1e999", b"null", b"\xff", b"\xc3")


class _Raw:
    """Text emitted verbatim by :func:`_dumps` (nesting deeper than Python recursion allows)."""

    def __init__(self, text: str) -> None:
        self.text = text


def random_json(rng: random.Random, depth: int = 2) -> Any:
    """A JSON value, biased towards the ones the parsers treat specially."""
    kind = rng.randrange(7 if depth > 0 else 5)
    if kind == 0:
        return rng.choice((None, True, False))
    if kind == 1:
        return rng.choice(_INTS)
    if kind == 2:
        return rng.choice(_FLOATS)
    if kind in (3, 4):
        return rng.choice(_STRINGS)
    if kind == 5:
        return [random_json(rng, depth - 1) for _ in range(rng.randrange(4))]
    return {rng.choice(_KEYS): random_json(rng, depth - 1) for _ in range(rng.randrange(4))}


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) below ``value``: the places a mutation can hit."""
    out: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        node = stack.pop()
        keys: Sequence[Any] = (
            list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
        )
        for k in keys:
            out.append((node, k))
            stack.append(node[k])
    return out


def _bump(value: Any, rng: random.Random) -> Any:
    """A nearby or extreme number, or the number in another type."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return rng.choice(_INTS)
    if isinstance(value, int):
        return rng.choice((value + 1, value - 1, -value - 1, value * 2, value // 2, 0, value + 2**64, 10**400))
    return rng.choice((value * 2, -value, float("inf"), float("nan"), 0.0, value + 0.5))


def _retype(value: Any, rng: random.Random) -> Any:
    return rng.choice((str(value), [value], {"x": value}, None, True, 1.5, 0))


def _dumps(value: Any, doubled: list[tuple[dict, str, Any]]) -> str:
    """``json.dumps``, except that dicts listed in ``doubled`` repeat one key first."""
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, dict):
        members = [json.dumps(k) + ":" + _dumps(v, doubled) for k, v in value.items()]
        members[:0] = [json.dumps(k) + ":" + _dumps(v, doubled) for d, k, v in doubled if d is value]
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(v, doubled) for v in value) + "]"
    return json.dumps(value)


def mutate_json(text: str, rng: random.Random) -> str:
    """Apply 1 to 3 structural edits to the JSON ``text``.

    Raises ValueError if ``text`` is not JSON, RecursionError if it nests too deep to load.
    """
    root = json.loads(text)
    doubled: list[tuple[dict, str, Any]] = []
    nested: list[tuple[Any, Any, int]] = []  # applied last: a _Raw value is opaque to the other edits
    for _ in range(rng.randrange(1, 4)):
        slots = _slots(root)
        if not slots:
            root = random_json(rng)
            continue
        node, key = rng.choice(slots)
        op = rng.randrange(9)
        if op == 0:
            del node[key]
        elif op == 1:
            node[key] = random_json(rng)
        elif op in (2, 3):
            node[key] = _bump(node[key], rng)
        elif op == 4:
            node[key] = _retype(node[key], rng)
        elif op == 5:  # a value from elsewhere: offsets, shapes and names that are valid, but not here
            other, other_key = rng.choice(slots)
            node[key] = json.loads(json.dumps(other[other_key]))
        elif op == 6:
            target = node[key] if isinstance(node[key], dict) else node if isinstance(node, dict) else root
            if isinstance(target, dict):
                target[rng.choice(_KEYS)] = random_json(rng)
        elif op == 7:
            if isinstance(node, dict):
                doubled.append((node, key, random_json(rng)))
        else:
            nested.append((node, key, rng.choice((1, 2, 50, 100_000))))
    for node, key, depth in nested:
        if key in (node if isinstance(node, dict) else range(len(node))):
            node[key] = _Raw("[" * depth + _dumps(node[key], doubled) + "]" * depth)
    return _dumps(root, doubled)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Apply 1 to 4 byte-level edits: flips, truncation, deletion, insertion, duplication."""
    out = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(6)
        i = rng.randrange(len(out) + 1)
        if op == 0 and i < len(out):
            out[i] ^= rng.randrange(1, 256)
        elif op == 1:
            del out[i:]
        elif op == 2:
            del out[i : i + rng.randrange(1, 9)]
        elif op == 3:
            out[i:i] = rng.choice(_TOKENS)
        elif op == 4:
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        else:
            j = rng.randrange(len(out) + 1)
            out[i:i] = out[min(i, j) : max(i, j)][:64]
    return bytes(out)


def mutate_input(data: bytes, rng: random.Random) -> bytes:
    """A mutant of one fuzz input: JSON-aware when the payload is JSON, byte-level otherwise."""
    if not data:
        return bytes([rng.randrange(len(TARGETS))])
    selector = data[0]
    if rng.random() < 0.05:
        selector = rng.randrange(len(TARGETS))  # feed one parser another's input
    width = target_of(data).prefix
    if width:  # a little-endian size (the header's data size): mutated as a number
        size = int.from_bytes(data[1 : 1 + width], "little")
        if rng.random() < 0.2:
            size = _bump(size, rng) if rng.random() < 0.5 else rng.randrange(2 * size + 64)
        payload = data[1 + width :]
        prefix = bytes([selector]) + (size % 2 ** (8 * width)).to_bytes(width, "little")
    else:
        payload = data[1:]
        prefix = bytes([selector])
    if rng.random() < 0.5:
        try:
            return prefix + mutate_json(payload.decode("utf-8"), rng).encode("utf-8", "surrogatepass")
        except (ValueError, RecursionError):
            pass  # not JSON, or nested too deep for Python: mutate the bytes instead
    return prefix + mutate_bytes(payload, rng)


# ---------------------------------------------------------------- runners


class FuzzFailure(AssertionError):
    """A parser raised something other than its documented error."""

    def __init__(self, data: bytes, exc: BaseException) -> None:
        shown = data if len(data) <= 300 else data[:300] + b"..."
        super().__init__(f"{type(exc).__name__}: {exc} on input of {len(data)} bytes {shown!r}")
        self.data = data


def _check(data: bytes) -> None:
    try:
        one_input(data)
    except Exception as exc:
        raise FuzzFailure(data, exc) from exc


def fuzz(seconds: float, seed: int = 0) -> int:
    """Mutate the seed inputs for ``seconds`` and return how many inputs were tried.

    Raises :class:`FuzzFailure` on the first input that makes a parser raise
    anything but its documented error. The sequence of inputs depends only on
    ``seed``; ``seconds`` decides how far along it the run gets.
    """
    rng = random.Random(seed)
    pool = seeds()
    deadline = time.monotonic() + seconds
    tried = 0
    for data in pool:
        _check(data)
        tried += 1
    while time.monotonic() < deadline:
        if rng.random() < 0.05:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            data = mutate_input(rng.choice(pool), rng)
        _check(data)
        tried += 1
        if len(pool) < 200 and rng.random() < 0.02:
            pool.append(data)  # mutants of mutants reach further from the seeds
    return tried


def _run_atheris(atheris: Any, argv: list[str]) -> None:
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = Path(tempfile.mkdtemp(prefix="xorweights-fuzz-"))
        for data in seeds():
            (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
        print(f"seed corpus in {corpus}", file=sys.stderr)
        argv = [*argv, str(corpus)]

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return mutate_input(data, rng)[:max_size]

    # Only the parsers' own code: instrument_all() would spend seconds on numpy and friends.
    for module in {t.module for t in TARGETS}:
        for obj in vars(module).values():
            for func in [obj, *vars(obj).values()] if isinstance(obj, type) else [obj]:
                if inspect.isfunction(func) and func.__module__ == module.__name__:
                    atheris.instrument_func(func)
    atheris.Setup(argv, one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main(argv: list[str]) -> int:
    args = list(argv)
    plain = "--plain" in args
    seconds, seed = 10.0, 0
    rest = [args[0]]
    it = iter(args[1:])
    for a in it:
        if a == "--seconds":
            seconds = float(next(it))
        elif a == "--seed":
            seed = int(next(it))
        elif a != "--plain":
            rest.append(a)
    try:
        import atheris
    except ImportError:
        atheris = None
    if atheris is not None and not plain:
        if "--seconds" in args:
            rest.append(f"-max_total_time={int(seconds)}")
        _run_atheris(atheris, rest)
        return 0
    try:
        tried = fuzz(seconds, seed)
    except FuzzFailure as exc:
        crash = Path(f"crash-{hashlib.sha1(exc.data).hexdigest()}")
        crash.write_bytes(exc.data)
        print(f"{exc}\ninput written to {crash}", file=sys.stderr)
        return 1
    print(f"{tried} inputs in {seconds:g} s, no unexpected exception")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
