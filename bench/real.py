"""Check the synthetic fine-tune of ``synth.py`` against a real (tiny) fine-tune.

The benchmark's compression numbers are only as honest as the synthetic
generator behind them. This module trains a small LLaMA-shaped model in plain
torch, fine-tunes it the way people fine-tune (fresh AdamW, small learning
rate, a different data distribution), and measures the XOR of the two fp16
checkpoints with the same statistics as a sample of the synthetic pair. If
the synthetic XOR compresses *better* than the real one, the generator
flatters xorweights and the benchmark overstates its ratios.

Run ``python bench/real.py`` (about 70 s on one core, 47 s of it training);
``--lr`` and ``--steps`` change the real fine-tune for calibration.
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xorweights.delta.kernel import DEFAULT_FRAME_BYTES, FrameCodec, frame_spans
from xorweights.readers.dtypes import ITEMSIZE, cast_bytes

# bench/ is a folder of scripts, not a package; synth is a sibling script.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402

# gzip-9 runs at a few MB/s; its ratio settles long before 32 MiB.
GZIP_SAMPLE_BYTES = 32 * 1024 * 1024


# --- statistics --------------------------------------------------------------


def _zstd_ratio(data: np.ndarray, width: int) -> float:
    """Ratio of xorweights' own frame codec: the bytes ``encode`` would write.

    Frames are cut exactly as the encoder cuts them, so the ratio includes
    the per-frame header and checksum and any loss from frame boundaries.
    ``width`` 1 leaves the bytes in order (plain zstd).
    """
    codec = FrameCodec("zstd")
    packed = sum(len(codec.encode(data[lo:hi], width)) for lo, hi in frame_spans(len(data), DEFAULT_FRAME_BYTES, width))
    return len(data) / packed


def xor_stats(base: np.ndarray, ft: np.ndarray, dtype: str = "F16") -> dict[str, float]:
    """Change and compressibility statistics of ``ft XOR base``.

    ``base`` and ``ft`` are flat ``uint8`` arrays of equal length holding
    ``dtype`` elements (F16, BF16 or F32). Ratios are original bytes over
    compressed bytes.
    """
    if base.shape != ft.shape:
        raise ValueError(f"base holds {base.size} bytes, fine-tune {ft.size}; truncate to the same length")
    width = ITEMSIZE[dtype]
    b = cast_bytes(base, dtype, "F32").view("<f4")
    f = cast_bytes(ft, dtype, "F32").view("<f4")
    # Zero or non-finite base elements have no meaningful relative change.
    ok = np.isfinite(b) & np.isfinite(f) & (b != 0)
    rel = np.abs(f[ok] - b[ok]) / np.abs(b[ok])
    words = f"<u{width}"
    xor = np.bitwise_xor(base, ft)
    gz_sample = xor[:GZIP_SAMPLE_BYTES]
    return {
        "elements": float(base.size // width),
        "median_rel_change": float(np.median(rel)) if rel.size else float("nan"),
        "unchanged_fraction": float(np.mean(base.view(words) == ft.view(words))),
        "gzip9": gz_sample.size / len(gzip.compress(gz_sample.tobytes(), compresslevel=9, mtime=0)),
        "zstd3": _zstd_ratio(xor, 1),
        "zstd3_grouped": _zstd_ratio(xor, width),
    }


# --- a tiny LLaMA in plain torch -----------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the HF LLaMA layout (rotate the two halves)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.input_layernorm = RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, hidden = x.shape
        h = self.input_layernorm(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, seq, self.heads, hidden // self.heads).transpose(1, 2)

        q = _rope(split(self.q_proj(h)), cos, sin)
        k = _rope(split(self.k_proj(h)), cos, sin)
        attn = F.scaled_dot_product_attention(q, k, split(self.v_proj(h)), is_causal=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(bsz, seq, hidden))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    """LLaMA's architecture at toy size: untied embeddings, RoPE, SwiGLU."""

    def __init__(
        self, vocab: int = 2000, hidden: int = 256, intermediate: int = 688, layers: int = 4, heads: int = 4
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderLayer(hidden, intermediate, heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.head_dim = hidden // heads
        # LLaMA's initializer_range: N(0, 0.02) everywhere, so weight scales
        # (and hence fp16 exponents) look like a real checkpoint's, not
        # torch's uniform Kaiming init.
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


# --- synthetic data ------------------------------------------------------------


class MarkovChain:
    """A sparse random first-order Markov chain: learnable, cheap, seeded.

    Each token in ``tokens`` has ``fanout`` successors with Dirichlet weights,
    so a model can learn it but not instantly. A chain over a subset of the
    vocabulary leaves the other embedding rows without gradient, as a
    fine-tune on narrow data does.
    """

    def __init__(self, vocab: int, seed: int, tokens: int | None = None, fanout: int = 4) -> None:
        rng = np.random.default_rng(seed)
        self.tokens = np.sort(rng.choice(vocab, size=tokens, replace=False)) if tokens else np.arange(vocab)
        n = len(self.tokens)
        self.successors = rng.integers(0, n, size=(n, fanout))
        self.cumulative = np.cumsum(rng.dirichlet(np.full(fanout, 0.3), size=n), axis=1)
        self.cumulative[:, -1] = 1.0  # guard against rounding leaving a gap at the top
        self.rng = np.random.default_rng(seed + 1)

    def batches(self, batch: int, seq: int) -> Iterator[torch.Tensor]:
        """Endless batches of ``batch`` sequences of ``seq + 1`` tokens."""
        n = len(self.tokens)
        while True:
            state = self.rng.integers(0, n, size=batch)
            out = np.empty((batch, seq + 1), dtype=np.int64)
            for t in range(seq + 1):
                out[:, t] = state
                u = self.rng.random(batch)
                pick = (self.cumulative[state] < u[:, None]).sum(axis=1)
                state = self.successors[state, pick]
            yield torch.from_numpy(self.tokens[out])


def _train(model: TinyLlama, data: Iterator[torch.Tensor], steps: int, lr: float, weight_decay: float) -> float:
    """Plain AdamW next-token training; returns the mean loss of the last 20 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    for _ in range(steps):
        tokens = next(data)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tail = losses[-20:]
    return sum(tail) / len(tail) if tail else math.nan


# Tensor kinds, as the suffixes of LLaMA's weight names.
KINDS = ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _kind(name: str) -> str:
    return next(kind for kind in KINDS if kind in name)


def _fp16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float16).contiguous().numpy().reshape(-1).view(np.uint8)


def real_finetune_stats(
    seed: int = 0,
    steps: int = 300,
    lr: float = 2e-5,
    pretrain_steps: int = 300,
    batch: int = 8,
    seq: int = 32,
    weight_decay: float = 0.0,
) -> dict[str, Any]:
    """Pretrain a tiny LLaMA, fine-tune it, and measure the fp16 XOR of its 2-D weights.

    Returns the :func:`xor_stats` of all 2-D matrices concatenated, plus
    ``"by_kind"`` (the same per tensor kind: q_proj, gate_proj, ...) and the
    losses and wall time, so a run shows it learned something.
    """
    torch.manual_seed(seed)
    # Intra-op threading can reorder float reductions; one thread keeps runs
    # bit-identical whatever the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        model = TinyLlama()
        vocab = model.embed_tokens.num_embeddings
        pretrain = MarkovChain(vocab, seed=1000 + seed)
        pretrain_loss = _train(model, pretrain.batches(batch, seq), pretrain_steps, 1e-3, 0.01)
        # Fine-tunes start from the *published* checkpoint, so round the base
        # to fp16 first: otherwise updates below half an fp16 ulp would still
        # flip bits through the rounding of the unrounded fp32 start point.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.float16).to(torch.float32))
        base = {n: _fp16_bytes(p) for n, p in model.named_parameters() if p.dim() == 2}
        # A narrower distribution over 60% of the vocabulary, as fine-tune data is.
        finetune = MarkovChain(vocab, seed=2000 + seed, tokens=int(vocab * 0.6))
        finetune_loss = _train(model, finetune.batches(batch, seq), steps, lr, weight_decay)
        ft = {n: _fp16_bytes(p) for n, p in model.named_parameters() if p.dim() == 2}
    finally:
        torch.set_num_threads(threads)
    names = sorted(base)
    stats: dict[str, Any] = dict(
        xor_stats(np.concatenate([base[n] for n in names]), np.concatenate([ft[n] for n in names]))
    )
    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({_kind(n) for n in names}):
        members = [n for n in names if _kind(n) == kind]
        by_kind[kind] = xor_stats(np.concatenate([base[n] for n in members]), np.concatenate([ft[n] for n in members]))
    stats.update(
        by_kind=by_kind,
        pretrain_loss=pretrain_loss,
        finetune_loss=finetune_loss,
        seconds=time.perf_counter() - start,
    )
    return stats


# --- the synthetic generator, sampled --------------------------------------------

SYNTH_SAMPLE = (
    synth.Spec("model.layers.0.mlp.gate_proj.weight", (synth.INTERMEDIATE, synth.HIDDEN)),
    synth.Spec("model.layers.0.self_attn.q_proj.weight", (synth.HIDDEN, synth.HIDDEN)),
    synth.Spec("model.embed_tokens.weight", (synth.VOCAB, synth.HIDDEN)),
)


def _first_bytes(spec: synth.Spec, finetuned: bool, nbytes: int) -> np.ndarray:
    """The first ``nbytes`` of a synthetic tensor, generating only the blocks needed."""
    parts, have = [], 0
    for block in synth.blocks(spec, finetuned):
        parts.append(block)
        have += len(block)
        if have >= nbytes:
            break
    return np.concatenate(parts)[:nbytes]


def synthetic_stats(sample_rows: int = 2048) -> dict[str, Any]:
    """:func:`xor_stats` of the first ``sample_rows`` rows of a few synthetic tensors.

    Returns the statistics of the sample concatenated, plus ``"by_tensor"``.
    """
    base, ft, by_tensor = [], [], {}
    for spec in SYNTH_SAMPLE:
        rows = min(sample_rows, spec.shape[0])
        nbytes = rows * (spec.shape[1] if len(spec.shape) == 2 else 1) * 2
        b, f = _first_bytes(spec, False, nbytes), _first_bytes(spec, True, nbytes)
        by_tensor[spec.name] = xor_stats(b, f)
        base.append(b)
        ft.append(f)
    stats: dict[str, Any] = dict(xor_stats(np.concatenate(base), np.concatenate(ft)))
    stats["by_tensor"] = by_tensor
    return stats


# --- report ----------------------------------------------------------------------


def _row(label: str, s: dict[str, Any]) -> str:
    return (
        f"{label:<42} {s['median_rel_change']:>9.3%} {s['unchanged_fraction']:>10.1%}"
        f" {s['gzip9']:>6.2f}x {s['zstd3']:>6.2f}x {s['zstd3_grouped']:>8.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--sample-rows", type=int, default=2048)
    args = parser.parse_args()

    real = real_finetune_stats(seed=args.seed, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay)
    synthetic = synthetic_stats(args.sample_rows)

    print(f"{'fp16 XOR':<42} {'med rel':>9} {'unchanged':>10} {'gzip9':>7} {'zstd3':>7} {'zstd3 grp':>9}")
    print(_row(f"real: tiny LLaMA, {args.steps} steps at lr {args.lr:g}", real))
    for kind, s in real["by_kind"].items():
        print(_row(f"  {kind}", s))
    print(_row(f"synthetic: {args.sample_rows} rows of {len(SYNTH_SAMPLE)} tensors", synthetic))
    for name, s in synthetic["by_tensor"].items():
        print(_row(f"  {name.removeprefix('model.')}", s))
    print(
        f"(real: pretrain loss {real['pretrain_loss']:.2f}, fine-tune loss {real['finetune_loss']:.2f},"
        f" {real['seconds']:.0f} s; reference MiniLM fine-tune: 0.6% median change, zstd-3 grouped 3.25x)"
    )
    flattering = synthetic["zstd3_grouped"] > real["zstd3_grouped"]
    verdict = "FLATTERING (it compresses better than the real fine-tune)" if flattering else "not flattering"
    # Ratios fall steeply with the size of the change, so the verdict only
    # means something when the two median changes are comparable.
    print(
        f"verdict: synthetic zstd3_grouped {synthetic['zstd3_grouped']:.2f}x vs real {real['zstd3_grouped']:.2f}x"
        f" (median change {synthetic['median_rel_change']:.2%} vs {real['median_rel_change']:.2%}):"
        f" the synthetic generator is {verdict}"
    )


if __name__ == "__main__":
    main()
