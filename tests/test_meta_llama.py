"""Meta's consolidated.*.pth checkpoints read as HF LLaMA tensors, bit for bit.

The fixtures go the other way from the reader: HF tensors from
``make_base`` are put back into Meta's layout (interleaved rotary rows,
model-parallel pieces, Meta's names, norms replicated, a ``rope.freqs`` to
drop) and saved with ``torch.save``; ``open_meta`` must give the HF tensors back.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from xorweights.errors import CheckpointError
from xorweights.fixtures import LlamaSpec, make_base
from xorweights.readers.meta_llama import is_meta_checkpoint, open_meta

TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

# HF suffix -> (Meta suffix, axis the model-parallel pieces split on, None if replicated).
# Written out here rather than imported, so the test does not share the reader's table.
META_NAMES = {
    "self_attn.q_proj": ("attention.wq", 0),
    "self_attn.k_proj": ("attention.wk", 0),
    "self_attn.v_proj": ("attention.wv", 0),
    "self_attn.o_proj": ("attention.wo", 1),
    "mlp.gate_proj": ("feed_forward.w1", 0),
    "mlp.up_proj": ("feed_forward.w3", 0),
    "mlp.down_proj": ("feed_forward.w2", 1),
    "input_layernorm": ("attention_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
}


def spec(heads: int = 4) -> LlamaSpec:
    return LlamaSpec(vocab=96, hidden=64, intermediate=172, layers=2, heads=heads)


def hf_tensors(s: LlamaSpec, dtype: str, kv_heads: int) -> dict[str, torch.Tensor]:
    """The HF checkpoint the Meta one must read back as; k and v cut to ``kv_heads`` heads."""
    kv_rows = kv_heads * (s.hidden // s.heads)
    out = {}
    for name, t in make_base(s, seed=3, dtype=dtype).items():
        x = torch.frombuffer(bytearray(t.to_bytes()), dtype=TORCH_DTYPES[dtype]).reshape(t.values.shape)
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            x = x[:kv_rows].clone()
        out[name] = x
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def meta_rows(heads: int, head_dim: int) -> np.ndarray:
    """For each HF row, the Meta row it holds, by index arithmetic rather than the reader's view/transpose.

    Meta keeps rotary pair i of a head in rows 2i and 2i+1; HF keeps it in rows i and i + head_dim/2.
    """
    half = head_dim // 2
    order = np.empty(heads * head_dim, dtype=np.int64)
    for h in range(heads):
        for j in range(2):
            for i in range(half):
                order[h * head_dim + j * half + i] = h * head_dim + 2 * i + j
    return order


def to_meta_layout(hf: torch.Tensor, heads: int) -> torch.Tensor:
    out = torch.empty_like(hf)
    out[torch.from_numpy(meta_rows(heads, hf.shape[0] // heads))] = hf
    return out


def packed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as views into one shared storage per dtype, the way Meta's shards hold them."""
    out = {}
    for dtype in {t.dtype for t in state.values()}:
        names = [n for n, t in state.items() if t.dtype == dtype]
        flat = torch.cat([state[n].reshape(-1) for n in names])
        pos = 0
        for n in names:
            out[n] = flat[pos : pos + state[n].numel()].view(state[n].shape)
            pos += state[n].numel()
    return {n: out[n] for n in state}


def write_meta(
    folder: Path,
    hf: dict[str, torch.Tensor],
    s: LlamaSpec,
    *,
    kv_heads: int,
    shards: int,
    llama3: bool = False,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Meta's folder for ``hf``: params.json plus ``shards`` consolidated.NN.pth files."""
    folder.mkdir(parents=True, exist_ok=True)
    full: dict[str, tuple[torch.Tensor, int | None]] = {
        # LLaMA 1/2 split the embedding along dim 1, LLaMA 3 along dim 0.
        "tok_embeddings.weight": (hf["model.embed_tokens.weight"], 0 if llama3 else 1)
    }
    for n in range(s.layers):
        for hf_suffix, (meta_suffix, axis) in META_NAMES.items():
            t = hf[f"model.layers.{n}.{hf_suffix}.weight"]
            if meta_suffix == "attention.wq":
                t = to_meta_layout(t, s.heads)
            elif meta_suffix == "attention.wk":
                t = to_meta_layout(t, kv_heads)
            full[f"layers.{n}.{meta_suffix}.weight"] = (t, axis)
    full["norm.weight"] = (hf["model.norm.weight"], None)
    full["output.weight"] = (hf["lm_head.weight"], 0)
    head_dim = s.hidden // s.heads
    for k in range(shards):
        state = {"rope.freqs": 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)}
        for name, (t, axis) in full.items():
            state[name] = t if axis is None else t.chunk(shards, axis)[k]
        state.update(extra or {})
        torch.save(packed(state), folder / f"consolidated.{k:02d}.pth")
    params = {"dim": s.hidden, "n_heads": s.heads, "n_layers": s.layers, "norm_eps": 1e-6, "multiple_of": 4}
    params["vocab_size"] = s.vocab if llama3 else -1  # LLaMA 1 writes -1
    if kv_heads != s.heads:
        params["n_kv_heads"] = kv_heads
    if llama3:
        params["rope_theta"] = 500000.0
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def assert_same(folder: Path, hf: dict[str, torch.Tensor]) -> None:
    refs, close = open_meta(folder)
    try:
        assert list(refs) == list(hf)
        for name, t in hf.items():
            ref = refs[name]
            want = raw(t)
            dtype = {v: k for k, v in TORCH_DTYPES.items()}[t.dtype]
            assert (ref.dtype, ref.shape, ref.nbytes) == (dtype, tuple(t.shape), len(want))
            assert ref.where == str(folder / "consolidated.00.pth")
            got = ref.source.read(0, ref.nbytes)
            assert got.dtype == np.uint8
            assert got.tobytes() == want, name
            ref.source.release(0, ref.nbytes)
    finally:
        close()


CASES = [
    # (heads, kv_heads, shards)
    (4, 4, 1),
    (4, 4, 2),
    (4, 4, 4),
    (4, 2, 1),
    (4, 2, 2),
    (8, 4, 4),
]


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
@pytest.mark.parametrize(("heads", "kv_heads", "shards"), CASES)
def test_reads_back_hf_bit_for_bit(tmp_path, dtype, heads, kv_heads, shards):
    s = spec(heads)
    hf = hf_tensors(s, dtype, kv_heads)
    assert_same(write_meta(tmp_path / "meta", hf, s, kv_heads=kv_heads, shards=shards), hf)


def test_llama3_embedding_joined_along_dim0(tmp_path):
    s = spec(4)
    hf = hf_tensors(s, "BF16", 2)
    assert_same(write_meta(tmp_path / "meta", hf, s, kv_heads=2, shards=2, llama3=True), hf)


def test_f32_kept_without_cast(tmp_path):
    s = spec(4)
    hf = hf_tensors(s, "F32", 4)
    assert_same(write_meta(tmp_path / "meta", hf, s, kv_heads=4, shards=2), hf)


def test_meta_rows_known_answer():
    # One head of 4 rows: Meta's pairs (r0, r1), (r2, r3) become HF halves (r0, r2), (r1, r3).
    assert meta_rows(1, 4).tolist() == [0, 2, 1, 3]


def test_is_meta_checkpoint(tmp_path):
    s = spec()
    folder = write_meta(tmp_path / "meta", hf_tensors(s, "F16", 4), s, kv_heads=4, shards=1)
    assert is_meta_checkpoint(folder)
    (tmp_path / "params_only").mkdir()
    (tmp_path / "params_only" / "params.json").write_text("{}")
    assert not is_meta_checkpoint(tmp_path / "params_only")
    (folder / "params.json").unlink()
    assert not is_meta_checkpoint(folder)
    assert not is_meta_checkpoint(tmp_path / "missing")


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_unrun(tmp_path):
    s = spec()
    folder = write_meta(tmp_path / "meta", hf_tensors(s, "F16", 4), s, kv_heads=4, shards=2)
    marker = tmp_path / "ran"
    state = torch.load(folder / "consolidated.01.pth", weights_only=True)
    state["payload"] = RunsCode(marker)
    torch.save(state, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError) as info:
        open_meta(folder)
    assert not marker.exists()
    message = str(info.value)
    assert "consolidated.01.pth" in message and "more than weights" in message
    assert "references posix.system" in message or "references nt.system" in message
    assert "\n" not in info.value.message and info.value.hint


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"not a torch file", "cannot be memory-mapped"),
        (b"PK\x03\x04 damaged zip", "not a readable PyTorch weights file"),
    ],
)
def test_unreadable_shard_is_refused(tmp_path, content, words):
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4, "n_layers": 2}))
    (folder / "consolidated.00.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=words):
        open_meta(folder)


def test_layout_mismatches_are_refused(tmp_path):
    s = spec()
    hf = hf_tensors(s, "F16", 4)
    folder = write_meta(
        tmp_path / "extra", hf, s, kv_heads=4, shards=1, extra={"layers.0.adapter.weight": torch.zeros(2)}
    )
    with pytest.raises(CheckpointError, match="not part of Meta's LLaMA layout"):
        open_meta(folder)
    folder = write_meta(tmp_path / "heads", hf, s, kv_heads=4, shards=2)
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2}))
    with pytest.raises(CheckpointError, match="layers.0.attention.wk.weight is \\[64, 64\\] once joined"):
        open_meta(folder)
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4, "n_layers": 3}))
    with pytest.raises(CheckpointError, match="has no tensor 'layers.2"):
        open_meta(folder)


@pytest.fixture
def two_shards(tmp_path):
    s = spec()
    hf = hf_tensors(s, "BF16", 4)
    refs, close = open_meta(write_meta(tmp_path / "meta", hf, s, kv_heads=4, shards=2))
    yield refs, hf
    close()


def test_converted_tensor_dropped_once_released(two_shards):
    refs, hf = two_shards
    ref = refs["model.layers.1.self_attn.q_proj.weight"]
    source = ref.source
    assert source._buffer is None  # nothing is built until read
    step = ref.nbytes // 3 + 1
    ranges = [(lo, min(lo + step, ref.nbytes)) for lo in range(0, ref.nbytes, step)]
    chunks = [source.read(lo, hi) for lo, hi in ranges]
    alive = weakref.ref(source._buffer)
    want = raw(hf["model.layers.1.self_attn.q_proj.weight"])
    assert b"".join(c.tobytes() for c in chunks) == want
    for lo, hi in reversed(ranges[1:]):  # out of order, and one range twice
        source.release(lo, hi)
        source.release(lo, hi)
        assert source._buffer is not None
    source.release(*ranges[0])
    assert source._buffer is None
    del chunks
    gc.collect()
    assert alive() is None
    # A second pass builds the tensor again.
    assert source.read(0, 4).tobytes() == want[:4]


def test_concurrent_reads_build_once(two_shards):
    refs, hf = two_shards
    ref = refs["model.layers.0.mlp.down_proj.weight"]
    builds = 0
    build = ref.source._build
    lock = threading.Lock()

    def counting_build():
        nonlocal builds
        with lock:
            builds += 1
        return build()

    ref.source._build = counting_build
    step = 512
    with ThreadPoolExecutor(8) as pool:
        parts = list(
            pool.map(lambda lo: ref.source.read(lo, min(lo + step, ref.nbytes)).tobytes(), range(0, ref.nbytes, step))
        )
    assert builds == 1
    assert b"".join(parts) == raw(hf["model.layers.0.mlp.down_proj.weight"])


def test_single_shard_tensors_served_from_the_mapping(tmp_path):
    s = spec()
    hf = hf_tensors(s, "F16", 4)
    refs, close = open_meta(write_meta(tmp_path / "meta", hf, s, kv_heads=4, shards=1))
    source = refs["model.layers.0.self_attn.v_proj.weight"].source
    a, b = source.read(0, 64), source.read(32, 96)
    assert np.shares_memory(a, b)  # views of the mapped shard, not copies
    q = refs["model.layers.0.self_attn.q_proj.weight"].source  # permuted, so converted even from one shard
    close()
    with pytest.raises(CheckpointError, match="closed"):
        q.read(0, 64)
