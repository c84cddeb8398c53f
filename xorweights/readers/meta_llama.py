"""Meta's original LLaMA checkpoints, read as Hugging Face LLaMA tensors on the fly.

Meta ships ``params.json`` plus ``consolidated.NN.pth`` model-parallel shards
(1, 2, 4 or 8 of them). A fine-tune is published against the Hugging Face
layout, so every tensor is renamed, joined across shards and, for q and k,
permuted from Meta's interleaved rotary layout to the HF half-split one; the
result is bit for bit what ``convert_llama_weights_to_hf.py`` puts in its
state dict before any dtype cast. Conversion is lazy: a tensor is built on its
first read and dropped once every byte of it has been released, so memory
holds about one converted tensor at a time, whatever the model size.

Shards are opened with ``torch.load(weights_only=True, mmap=True)``: a pickle
that needs anything beyond tensors is refused instead of run, and the data
stays in the page cache instead of the heap.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CheckpointError
from ..torch_import import require_torch
from .dtypes import FLOAT_CASTABLE, tensor_nbytes
from .tensor_ref import TensorRef
from .torch_pickle import TORCH_DTYPES, TorchTensorSource, load_weights

if TYPE_CHECKING:
    import torch

PARAMS = "params.json"
SHARD_GLOB = "consolidated.*.pth"
# Meta's params.json is a few hundred bytes; anything near this is not one, and is not read.
PARAMS_MAX_BYTES = 1 << 20

# A layer's tensor name; at most 9 digits, so int() never meets a number too long to convert.
_LAYER_INDEX = re.compile(r"layers\.(\d{1,9})\.")

_DROPPED = frozenset({"rope.freqs"})  # recomputed by transformers, not a weight

# Meta suffix within a layer -> (HF suffix, axis the shards are joined on, None if replicated),
# in the order HF checkpoints list a layer's tensors.
_LAYER_TENSORS: dict[str, tuple[str, int | None]] = {
    "attention.wq": ("self_attn.q_proj", 0),
    "attention.wk": ("self_attn.k_proj", 0),
    "attention.wv": ("self_attn.v_proj", 0),
    "attention.wo": ("self_attn.o_proj", 1),
    "feed_forward.w1": ("mlp.gate_proj", 0),
    "feed_forward.w3": ("mlp.up_proj", 0),
    "feed_forward.w2": ("mlp.down_proj", 1),
    "attention_norm": ("input_layernorm", None),
    "ffn_norm": ("post_attention_layernorm", None),
}

_NOT_META = "point at the folder of Meta's original download: params.json and every consolidated.NN.pth"


@dataclass(frozen=True)
class MetaParams:
    """The sizes ``params.json`` claims; each is checked against the shards' real shapes before use."""

    dim: int
    n_heads: int
    n_kv_heads: int
    n_layers: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class _Plan:
    """How one HF tensor is made from Meta's shards."""

    hf_name: str
    meta_name: str
    join: int | None  # axis the model-parallel pieces are concatenated on; None: replicated, take shard 0
    heads: int | None  # rotary permutation over this many heads; None: no permutation


def is_meta_checkpoint(folder: Path) -> bool:
    """True when ``folder`` holds ``params.json`` and at least one ``consolidated.*.pth``."""
    folder = Path(folder)
    return folder.is_dir() and (folder / PARAMS).is_file() and any(folder.glob(SHARD_GLOB))


def open_meta(folder: Path) -> tuple[dict[str, TensorRef], Callable[[], None]]:
    """Meta's LLaMA checkpoint in ``folder`` as HF-named tensors, in HF order, and a close function.

    Every tensor keeps the dtype it is stored in. ``where`` names the first shard.
    Raises :class:`CheckpointError` for anything that is not Meta's layout,
    including a pickle that holds more than weights.
    """
    folder = Path(folder)
    params = _read_params(folder / PARAMS)
    paths = sorted(p for p in folder.glob(SHARD_GLOB) if not p.name.startswith("."))
    if not paths:
        raise CheckpointError(f"{folder}: no consolidated.*.pth shards next to params.json", _NOT_META)
    shards = _Shards(paths, [_load_shard(p) for p in paths])
    plans = _plans(params, shards)
    refs: dict[str, TensorRef] = {}
    converted: list[_ConvertedSource] = []
    for plan in plans:
        dtype, shape = _check_plan(plan, params, shards)
        source: TorchTensorSource | _ConvertedSource
        if plan.heads is None and (plan.join is None or len(paths) == 1):
            # Stored as HF wants it: bytes straight from the mapped shard, no copy.
            source = TorchTensorSource(shards.pieces(plan.meta_name)[0], mapped=True)
        else:
            source = _ConvertedSource(shards, plan, tensor_nbytes(dtype, shape))
            converted.append(source)
        refs[plan.hf_name] = TensorRef(plan.hf_name, dtype, shape, source, str(paths[0]))

    def close() -> None:
        for s in converted:
            s.drop()
        shards.states = None

    return refs, close


def _read_params(path: Path) -> MetaParams:
    """``params.json``, read only if it is no bigger than :data:`PARAMS_MAX_BYTES`."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            # Read one byte past the cap: a file that grows after fstat is still caught.
            data = f.read(PARAMS_MAX_BYTES + 1) if size <= PARAMS_MAX_BYTES else b""
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot read ({exc.strerror})", "re-download params.json from Meta's release"
        ) from None
    if size > PARAMS_MAX_BYTES or len(data) > PARAMS_MAX_BYTES:
        raise CheckpointError(
            f"{path}: is {max(size, len(data))} bytes; a params.json is at most {PARAMS_MAX_BYTES}, so it was not read",
            "re-download params.json from Meta's release",
        )
    return parse_params(data, str(path))


def parse_params(data: bytes, where: str) -> MetaParams:
    """The model sizes in a ``params.json``'s bytes; :class:`CheckpointError` for anything else.

    Only their shape is checked here (positive integers, even-sized heads);
    whether the shards really have these sizes is checked by :func:`open_meta`.
    """

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what}", "re-download params.json from Meta's release")

    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    # Some releases nest the model arguments under "model".
    params = raw.get("model", raw) if isinstance(raw, dict) else raw
    if not isinstance(params, dict):
        raise bad("expected a JSON object")

    def positive(key: str, default: int | None = None) -> int:
        value = params.get(key)
        if value is None:
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad(f"{key} must be a positive integer, found {_short(value)}")
        return value

    dim, n_heads, n_layers = positive("dim"), positive("n_heads"), positive("n_layers")
    n_kv_heads = positive("n_kv_heads", n_heads)
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise bad(f"dim {dim}, n_heads {n_heads} and n_kv_heads {n_kv_heads} do not make even-sized heads")
    return MetaParams(dim, n_heads, n_kv_heads, n_layers)


def _short(value: object) -> str:
    """A JSON value for a one-line message: a 1 MiB string or list is cut."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    weights, _ = load_weights(path, "re-download Meta's original consolidated.*.pth files", allow_unmapped=False)
    return weights


class _Shards:
    """The loaded model-parallel shards, shared by every tensor source."""

    def __init__(self, paths: list[Path], states: list[dict[str, torch.Tensor]]) -> None:
        # close() sets states to None so the mappings can go; converting a tensor then raises.
        self.paths = paths
        self.states: list[dict[str, torch.Tensor]] | None = states

    def pieces(self, meta_name: str) -> list[torch.Tensor]:
        if self.states is None:
            raise CheckpointError(
                f"{self.paths[0].parent}: read after the checkpoint was closed", "open the checkpoint again"
            )
        return [state[meta_name] for state in self.states]


def _plans(params: MetaParams, shards: _Shards) -> list[_Plan]:
    """Every HF tensor in HF order; refuses shards whose names are not Meta's LLaMA layout."""
    assert shards.states is not None
    names = set(shards.states[0])
    for path, state in zip(shards.paths[1:], shards.states[1:], strict=True):
        if set(state) != names:
            odd = sorted(set(state) ^ names)[0]
            raise CheckpointError(
                f"{path}: holds a different set of tensors than {shards.paths[0].name} (e.g. {odd!r})",
                "the shards come from different downloads; re-download all of them",
            )
    _check_layer_count(params, names, shards.paths[0])
    # The embedding's join axis is read from its pieces once the names say it is there.
    plans = [_Plan("model.embed_tokens.weight", "tok_embeddings.weight", 0, None)]
    for n in range(params.n_layers):  # equal to the layers the shards hold, not just what params.json claims
        for meta, (hf, join) in _LAYER_TENSORS.items():
            heads = {"attention.wq": params.n_heads, "attention.wk": params.n_kv_heads}.get(meta)
            plans.append(_Plan(f"model.layers.{n}.{hf}.weight", f"layers.{n}.{meta}.weight", join, heads))
    plans.append(_Plan("model.norm.weight", "norm.weight", None, None))
    plans.append(_Plan("lm_head.weight", "output.weight", 0, None))
    expected = {p.meta_name for p in plans}
    missing = sorted(expected - names)
    if missing:
        raise CheckpointError(
            f"{shards.paths[0]}: has no tensor {missing[0]!r}, which params.json's n_layers "
            f"{params.n_layers} calls for",
            _NOT_META,
        )
    unknown = sorted(names - expected - _DROPPED)
    if unknown:
        raise CheckpointError(
            f"{shards.paths[0]}: holds {unknown[0]!r}, which is not part of Meta's LLaMA layout",
            "xorweights converts Meta's LLaMA 1, 2 and 3 checkpoints only; convert others to safetensors first",
        )
    plans[0] = replace(plans[0], join=_embed_axis(params, shards))
    return plans


def _check_layer_count(params: MetaParams, names: set[str], shard: Path) -> None:
    """Refuse an ``n_layers`` other than the number of layers the shard holds, numbered from 0 without gaps.

    Plans are made per layer, so a claimed count is only used once the
    shard's own tensor names back it.
    """
    held = {int(m[1]) for name in names if (m := _LAYER_INDEX.match(name))}
    count = len(held)
    gap = next((n for n in range(count) if n not in held), None)
    if gap is not None:
        raise CheckpointError(
            f"{shard}: holds tensors of layer {max(held)} but none of layer {gap}",
            "the shard is damaged or not Meta's; re-download it",
        )
    if params.n_layers > count:
        raise CheckpointError(
            f"{shard}: has no tensor 'layers.{count}.*', which params.json's n_layers {params.n_layers} calls for; "
            f"the shard holds {count} layers",
            _NOT_META,
        )
    if params.n_layers < count:
        raise CheckpointError(
            f"{shard}: holds {count} layers (up to 'layers.{count - 1}.*'), but params.json's n_layers is "
            f"{params.n_layers}",
            _NOT_META,
        )


def _embed_axis(params: MetaParams, shards: _Shards) -> int:
    # LLaMA 1 and 2 split the embedding across shards along dim 1, LLaMA 3
    # (vocab 128256, rope_theta 500000) along dim 0. The pieces' shapes say
    # which without guessing from params.json, where LLaMA 1 has vocab_size -1.
    shape = tuple(shards.pieces("tok_embeddings.weight")[0].shape)
    if len(shards.paths) == 1 or (len(shape) == 2 and shape[1] == params.dim):
        return 0
    return 1


def _check_plan(plan: _Plan, params: MetaParams, shards: _Shards) -> tuple[str, tuple[int, ...]]:
    """The HF tensor's dtype and shape, from the pieces' metadata alone (no data is read)."""
    pieces = shards.pieces(plan.meta_name)
    where = shards.paths[0]

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {plan.meta_name} {what}", _NOT_META)

    dtypes = {str(t.dtype) for t in pieces}
    if len(dtypes) != 1:
        raise bad(f"has different dtypes in different shards ({', '.join(sorted(dtypes))})")
    dtype = TORCH_DTYPES.get(dtypes.pop(), "")
    if dtype not in FLOAT_CASTABLE:
        raise bad(f"has dtype {pieces[0].dtype}; expected float16, bfloat16 or float32")
    shapes = [tuple(t.shape) for t in pieces]
    shape = shapes[0]
    if plan.join is not None and len(pieces) > 1:
        rest = {s[: plan.join] + s[plan.join + 1 :] for s in shapes}
        if len(rest) != 1 or any(len(s) <= plan.join for s in shapes):
            raise bad(f"pieces {[list(s) for s in shapes]} cannot be joined along dim {plan.join}")
        shape = shape[: plan.join] + (sum(s[plan.join] for s in shapes),) + shape[plan.join + 1 :]
    if plan.heads is not None:
        rows = plan.heads * params.head_dim
        if shape != (rows, params.dim):
            raise bad(f"is {list(shape)} once joined; params.json calls for [{rows}, {params.dim}]")
    expected_width = {"tok_embeddings.weight": params.dim, "output.weight": params.dim}.get(plan.meta_name)
    if expected_width is not None and (len(shape) != 2 or shape[1] != expected_width):
        raise bad(f"is {list(shape)} once joined; params.json calls for [vocab, {params.dim}]")
    return dtype, shape


def _raw(t: torch.Tensor) -> np.ndarray:
    """A tensor's little-endian bytes as a flat, read-only ``uint8`` view (no copy if contiguous)."""
    torch = require_torch("converting a Meta .pth checkpoint")

    out: np.ndarray = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    out.flags.writeable = False
    return out


def _convert(pieces: list[torch.Tensor], plan: _Plan) -> torch.Tensor:
    """The HF tensor from Meta's pieces: join the shards, then undo the interleaved rotary layout."""
    torch = require_torch("converting a Meta .pth checkpoint")

    t = pieces[0] if plan.join is None or len(pieces) == 1 else torch.cat(pieces, dim=plan.join)
    if plan.heads is not None:
        # Meta keeps each rotary pair (x_2i, x_2i+1) in adjacent rows; HF's rotate_half
        # pairs row i with row i + head_dim/2. Permuting the joined tensor, not each
        # piece, keeps GQA's key/value heads whole however the shards split them.
        rows, cols = t.shape
        t = t.reshape(plan.heads, rows // plan.heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return t.contiguous()


class _ConvertedSource:
    """A tensor built from several pieces or permuted: materialized on first read.

    Workers read frames from several threads, so building is under a lock. The
    bytes are kept until ``release`` has covered the whole tensor, then
    dropped; a later read (a second pass) builds them again.
    """

    def __init__(self, shards: _Shards, plan: _Plan, nbytes: int) -> None:
        self._shards = shards
        self._plan = plan
        self._nbytes = nbytes
        self._lock = threading.Lock()
        self._buffer: np.ndarray | None = None
        self._released: list[tuple[int, int]] = []  # merged, sorted ranges released since building

    def _build(self) -> np.ndarray:
        pieces = self._shards.pieces(self._plan.meta_name)
        out = _raw(_convert(pieces, self._plan))
        # The pieces were read once, into the copy; let their mapped pages go so RSS stays flat.
        for piece in pieces:
            TorchTensorSource(piece, mapped=True).release(0, piece.numel() * piece.element_size())
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        with self._lock:
            if self._buffer is None:
                self._buffer = self._build()
                self._released = []
            return self._buffer[start:stop]

    def release(self, start: int, stop: int) -> None:
        with self._lock:
            if self._buffer is None or stop <= start:
                return
            self._released = _merge([*self._released, (start, stop)])
            if self._released[0][0] <= 0 and self._released[0][1] >= self._nbytes:
                # Views already handed out keep their bytes alive; we only stop holding them.
                self._buffer = None

    def drop(self) -> None:
        with self._lock:
            self._buffer = None


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
