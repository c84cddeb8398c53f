"""Tiny LLaMA-shaped checkpoints made from a seed, byte-identical on every platform.

Used by ``xorweights demo``, the tests and the golden checksums. Randomness
comes from PCG64's raw 64-bit output (fixed by the algorithm, unlike numpy's
``Generator`` distributions) and every float is made by exact arithmetic
followed by the casts in :mod:`xorweights.readers.dtypes`.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .readers.dtypes import cast_bytes
from .readers.safetensors_io import build_header


@dataclass(frozen=True)
class LlamaSpec:
    vocab: int = 256
    hidden: int = 32
    intermediate: int = 88
    layers: int = 2
    heads: int = 4


@dataclass(frozen=True)
class Tensor:
    """A fixture tensor: values kept in float32, stored as ``dtype``."""

    dtype: str
    values: np.ndarray  # float32, already in its final shape

    def to_bytes(self) -> bytes:
        return cast_bytes(
            np.ascontiguousarray(self.values, "<f4").view(np.uint8).reshape(-1), "F32", self.dtype
        ).tobytes()


def uniform(seed: int, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Deterministic float32 values in [-scale, scale)."""
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.random.PCG64(seed).random_raw(n).astype(np.uint64)
    unit = (raw >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return ((unit * 2.0 - 1.0) * scale).astype(np.float32).reshape(shape)


def _seed(seed: int, name: str) -> int:
    return (seed << 32) ^ zlib.crc32(name.encode())


def llama_shapes(spec: LlamaSpec) -> dict[str, tuple[int, ...]]:
    h, i = spec.hidden, spec.intermediate
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab, h)}
    for n in range(spec.layers):
        p = f"model.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (h, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (i, h)
        shapes[f"{p}mlp.up_proj.weight"] = (i, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, i)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (spec.vocab, h)
    return shapes


def make_base(spec: LlamaSpec, seed: int = 0, dtype: str = "F16") -> dict[str, Tensor]:
    out = {}
    for name, shape in llama_shapes(spec).items():
        if name.endswith("norm.weight"):
            values = 1.0 + uniform(_seed(seed, name), shape, 0.1)
        else:
            values = uniform(_seed(seed, name), shape, 0.05)
        # Round through the storage dtype so the float32 copy is exactly what is stored.
        t = Tensor(dtype, values)
        out[name] = replace(t, values=stored_values(t))
    return out


def stored_values(t: Tensor) -> np.ndarray:
    raw = np.frombuffer(t.to_bytes(), dtype=np.uint8)
    return cast_bytes(raw, t.dtype, "F32").view("<f4").reshape(t.values.shape).copy()


def make_finetune(
    base: dict[str, Tensor],
    seed: int = 1,
    rel_change: float = 1e-2,
    added_rows: int = 4,
    dtypes: dict[str, str] | None = None,
    extra: bool = True,
) -> dict[str, Tensor]:
    """A fine-tune of ``base``: small relative updates, added-token rows, a value head.

    ``dtypes`` overrides the storage dtype of named tensors (e.g. BF16 over an F16 base).
    """
    dtypes = dtypes or {}
    out = {}
    for name, t in base.items():
        values = t.values * (1.0 + uniform(_seed(seed, name), t.values.shape, rel_change))
        if added_rows and name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = uniform(_seed(seed, name + ".added"), (added_rows, *t.values.shape[1:]), 0.05)
            values = np.concatenate([values, rows])
        out[name] = Tensor(dtypes.get(name, t.dtype), values.astype(np.float32))
    if extra:
        hidden = base["model.norm.weight"].values.shape[0]
        out["v_head.weight"] = Tensor("F32", uniform(_seed(seed, "v_head"), (1, hidden), 0.05))
    return out


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    prefix, _ = build_header([(n, t.dtype, t.values.shape) for n, t in tensors.items()], metadata)
    with path.open("wb") as f:
        f.write(prefix)
        for t in tensors.values():
            f.write(t.to_bytes())


def write_checkpoint(
    folder: Path,
    tensors: dict[str, Tensor],
    shards: int = 1,
    index: bool = True,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``tensors`` as HF safetensors shards (``model-0000k-of-0000n``) plus ``files``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    groups = [names[k * len(names) // shards : (k + 1) * len(names) // shards] for k in range(shards)]
    weight_map = {}
    for k, group in enumerate(groups, 1):
        fname = "model.safetensors" if shards == 1 else f"model-{k:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / fname, {n: tensors[n] for n in group}, {"format": "pt"})
        weight_map.update({n: fname for n in group})
    if index:
        total = sum(len(t.to_bytes()) for t in tensors.values())
        doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(doc, indent=2) + "\n")
    for rel, data in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def side_files(spec: LlamaSpec, seed: int = 0, added_tokens: int = 0) -> dict[str, bytes]:
    """Config and tokenizer files shaped like a LLaMA HF release."""
    vocab = spec.vocab + added_tokens
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "torch_dtype": "float16",
    }
    files = {
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}\n',
        "special_tokens_map.json": b'{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}\n',
        "tokenizer_config.json": b'{"tokenizer_class": "LlamaTokenizer"}\n',
        "tokenizer.model": np.random.PCG64(seed).random_raw(64).astype("<u8").tobytes(),
    }
    if added_tokens:
        tokens = {f"<|extra_{k}|>": spec.vocab + k for k in range(added_tokens)}
        files["added_tokens.json"] = json.dumps(tokens).encode()
    return files


@dataclass(frozen=True)
class Pair:
    base: Path
    finetuned: Path


def make_pair(
    root: Path,
    spec: LlamaSpec = LlamaSpec(),
    *,
    base_dtype: str = "F16",
    ft_dtypes: dict[str, str] | None = None,
    added_rows: int = 4,
    extra: bool = True,
    shards: int = 2,
    index: bool = True,
    seed: int = 0,
) -> Pair:
    """A base and a fine-tune of it on disk, the way a releaser has them."""
    base = make_base(spec, seed, base_dtype)
    ft = make_finetune(base, seed + 1, added_rows=added_rows, dtypes=ft_dtypes, extra=extra)
    b = write_checkpoint(root / "base", base, shards, index, side_files(spec, seed))
    f = write_checkpoint(root / "finetuned", ft, shards, index, side_files(spec, seed, added_rows))
    return Pair(b, f)
