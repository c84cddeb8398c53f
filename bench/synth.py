"""A LLaMA-7B-shaped fp16 base and a fine-tune of it with realistic XOR statistics.

Calibration (see bench/README.md and `python bench/run.py --real`):

* Base weights: linear layers N(0, 0.02), norms 1 + N(0, 0.02), in fp16.
* Fine-tune: every tensor t gets an update whose relative size r_t is drawn
  log-uniformly from [1e-3, 1e-2], the range Adam-style fine-tunes show.
  Adam normalises each step per element, so the update does not scale with
  the weight: delta = r_t * rms(w_t) * N(0, 1). Small weights therefore change
  more, in relative terms, than large ones, as in real fine-tunes.
* 40% of the embedding rows are left untouched (tokens the fine-tune data
  never used get no gradient), and 16 vocabulary rows are added to
  ``embed_tokens`` and ``lm_head``.

Everything streams in blocks of rows, so making a 4 GB pair needs little RAM.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xorweights.readers.safetensors_io import build_header

HIDDEN, INTERMEDIATE, VOCAB, ADDED = 4096, 11008, 32000, 16
ROWS_PER_BLOCK = 1024
UNTOUCHED_EMBEDDING_ROWS = 0.4


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, int] | tuple[int]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 2


def layer_specs(layer: int) -> list[Spec]:
    p = f"model.layers.{layer}."
    h, i = HIDDEN, INTERMEDIATE
    return [
        Spec(p + "self_attn.q_proj.weight", (h, h)),
        Spec(p + "self_attn.k_proj.weight", (h, h)),
        Spec(p + "self_attn.v_proj.weight", (h, h)),
        Spec(p + "self_attn.o_proj.weight", (h, h)),
        Spec(p + "mlp.gate_proj.weight", (i, h)),
        Spec(p + "mlp.up_proj.weight", (i, h)),
        Spec(p + "mlp.down_proj.weight", (h, i)),
        Spec(p + "input_layernorm.weight", (h,)),
        Spec(p + "post_attention_layernorm.weight", (h,)),
    ]


def model_specs(size_bytes: int) -> list[Spec]:
    """As many layers as fit ``size_bytes`` (at least one), LLaMA-7B dims."""
    ends = [Spec("model.embed_tokens.weight", (VOCAB, HIDDEN)), Spec("model.norm.weight", (HIDDEN,))]
    head = Spec("lm_head.weight", (VOCAB, HIDDEN))
    fixed = sum(s.nbytes for s in ends) + head.nbytes
    per_layer = sum(s.nbytes for s in layer_specs(0))
    layers = max(1, (size_bytes - fixed) // per_layer)
    specs = ends[:1]
    for n in range(layers):
        specs += layer_specs(n)
    return specs + ends[1:] + [head]


def _seed(name: str, salt: int) -> int:
    return (zlib.crc32(name.encode()) << 8) ^ salt


def blocks(spec: Spec, finetuned: bool) -> Iterator[np.ndarray]:
    """The tensor's fp16 bytes, block of rows by block of rows."""
    rows = spec.shape[0]
    cols = spec.shape[1] if len(spec.shape) == 2 else 1
    rng_w = np.random.default_rng(_seed(spec.name, 1))
    rng_d = np.random.default_rng(_seed(spec.name, 2))
    rel = 10 ** np.random.default_rng(_seed(spec.name, 3)).uniform(-3, -2)
    is_norm = len(spec.shape) == 1
    embedding = spec.name.endswith("embed_tokens.weight")
    untouched = np.random.default_rng(_seed(spec.name, 4)).random(rows) < UNTOUCHED_EMBEDDING_ROWS
    for lo in range(0, rows, ROWS_PER_BLOCK):
        n = min(ROWS_PER_BLOCK, rows - lo)
        w = rng_w.standard_normal((n, cols), dtype=np.float32) * np.float32(0.02)
        if is_norm:
            w += np.float32(1.0)
        w = w.astype(np.float16)
        if finetuned:
            rms = 1.0 if is_norm else 0.02
            delta = rng_d.standard_normal((n, cols), dtype=np.float32) * np.float32(rel * rms)
            if embedding:
                delta[untouched[lo : lo + n]] = 0
            w = (w.astype(np.float32) + delta).astype(np.float16)
        yield w.reshape(-1).view(np.uint8)
    if finetuned and (embedding or spec.name == "lm_head.weight"):
        extra = np.random.default_rng(_seed(spec.name, 5)).standard_normal((ADDED, cols), dtype=np.float32)
        yield (extra * np.float32(0.02)).astype(np.float16).reshape(-1).view(np.uint8)


def _shape(spec: Spec, finetuned: bool) -> tuple[int, ...]:
    grows = finetuned and (spec.name.endswith("embed_tokens.weight") or spec.name == "lm_head.weight")
    return (spec.shape[0] + ADDED, *spec.shape[1:]) if grows else spec.shape


def write_model(folder: Path, specs: list[Spec], finetuned: bool, shard_bytes: int) -> int:
    """Write HF-style shards plus index and config; return the bytes of tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    weight_map, total = {}, 0
    for k, group in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        prefix, _ = build_header([(s.name, "F16", _shape(s, finetuned)) for s in group], {"format": "pt"})
        with (folder / name).open("wb") as f:
            f.write(prefix)
            for s in group:
                for block in blocks(s, finetuned):
                    f.write(block)
                    total += len(block)
                weight_map[s.name] = name
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"model_type": "llama", "hidden_size": HIDDEN, "vocab_size": VOCAB + (ADDED if finetuned else 0)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def make_pair(root: Path, size_bytes: int, shard_bytes: int = 1 << 30) -> tuple[Path, Path, int]:
    specs = model_specs(size_bytes)
    base, ft = root / "base", root / "finetuned"
    write_model(base, specs, False, shard_bytes)
    total = write_model(ft, specs, True, shard_bytes)
    return base, ft, total


if __name__ == "__main__":
    import sys

    _, _, total = make_pair(Path(sys.argv[1]), int(sys.argv[2]))
    print(total)
