"""load_state_dict / iter_state_dict: the fine-tune straight into torch, checked, with nothing written."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import xorweights
from xorweights.delta.manifest import load_manifest
from xorweights.errors import BaseMismatchError, DeltaCorruptError, UsageError
from xorweights.fixtures import LlamaSpec, Pair, make_pair
from xorweights.load import iter_state_dict, load_state_dict
from xorweights.readers.safetensors_io import SafetensorsFile

SMALL = LlamaSpec(vocab=1024, hidden=16, intermediate=40, layers=1, heads=2)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


def finetune_tensors(pair: Pair) -> dict[str, torch.Tensor]:
    """Every tensor of the fine-tune as the official safetensors loader reads it."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(pair.finetuned.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path below ``folder`` with its size and mtime, to prove nothing was written."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


@pytest.fixture
def encoded(tmp_path: Path) -> Callable[..., tuple[Pair, Path]]:
    """A pair (``make_pair`` options) and its delta, in a fresh folder per call."""
    count = 0

    def build(compress: bool = True, frame_bytes: int | None = None, **kwargs: object) -> tuple[Pair, Path]:
        nonlocal count
        count += 1
        root = tmp_path / f"case{count}"
        pair = make_pair(root, **{"spec": SMALL, **kwargs})  # type: ignore[arg-type]
        options: dict = {"compress": compress}
        if frame_bytes:
            options["frame_bytes"] = frame_bytes
        xorweights.encode(pair.finetuned, pair.base, root / "delta", **options)
        return pair, root / "delta"

    return build


@pytest.mark.parametrize(
    ("base_dtype", "ft_dtypes"),
    [
        ("F16", None),
        ("BF16", None),
        ("F32", None),
        ("F16", {Q_PROJ: "BF16", EMBED: "F32"}),
        ("BF16", {Q_PROJ: "F16", EMBED: "F32"}),
        ("F32", {Q_PROJ: "BF16", EMBED: "F16"}),
    ],
)
def test_bit_exact_against_safetensors(encoded, base_dtype, ft_dtypes):
    pair, delta = encoded(base_dtype=base_dtype, ft_dtypes=ft_dtypes, frame_bytes=256)
    assert_same(load_state_dict(delta, pair.base), finetune_tensors(pair))


def test_uncompressed_delta_and_single_file(encoded):
    pair, delta = encoded(compress=False, shards=1, index=False, base_dtype="BF16")
    assert_same(load_state_dict(str(delta), str(pair.base)), finetune_tensors(pair))


def test_exported_from_the_package():
    assert xorweights.load_state_dict is load_state_dict
    assert xorweights.iter_state_dict is iter_state_dict


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype_converts_like_torch(encoded, dtype):
    pair, delta = encoded(base_dtype="F16", ft_dtypes={Q_PROJ: "BF16", EMBED: "F32"}, frame_bytes=256)
    want = {k: t.to(getattr(torch, dtype)) for k, t in finetune_tensors(pair).items()}
    assert_same(load_state_dict(delta, pair.base, dtype=dtype), want)


def test_unknown_dtype_is_refused(encoded):
    pair, delta = encoded()
    with pytest.raises(UsageError, match="unknown dtype 'int8'"):
        iter_state_dict(delta, pair.base, dtype="int8")


def test_wrong_base_names_the_tensor(encoded, tmp_path):
    pair, delta = encoded()
    other = make_pair(tmp_path / "other", SMALL, seed=7).base  # same names, dtypes and shapes; other values
    first = next(t for t in load_manifest(delta).tensors() if t.base is not None)
    tensors = iter_state_dict(delta, other)  # the plan passes: only the hashes can tell
    with pytest.raises(BaseMismatchError) as exc:
        next(tensors)
    assert exc.value.message.startswith(f"base tensor {first.base.name}: expected xxh3-128 {first.base.xxh3}, found ")
    assert "xorweights decode --check-base" in exc.value.hint
    with pytest.raises(BaseMismatchError, match=f"base tensor {first.base.name}: "):
        load_state_dict(delta, other)


def test_base_of_the_wrong_dtype_is_refused_before_any_work(encoded, tmp_path, monkeypatch):
    pair, delta = encoded(base_dtype="F16")
    bf16 = make_pair(tmp_path / "bf16", SMALL, base_dtype="BF16").base
    reads: list[str] = []
    real_read = SafetensorsFile.read
    monkeypatch.setattr(
        SafetensorsFile, "read", lambda self, info, *a: reads.append(info.name) or real_read(self, info, *a)
    )
    with pytest.raises(BaseMismatchError, match=r"base tensor \S+: expected dtype F16, found BF16") as exc:
        iter_state_dict(delta, bf16)  # raised by the call itself, not on the first tensor
    assert "bf16" in exc.value.hint
    assert reads == []


@pytest.mark.parametrize("compress", [True, False])
def test_corrupted_frame(encoded, compress):
    pair, delta = encoded(compress=compress)
    manifest = load_manifest(delta)
    wf = manifest.weight_files[0]
    entry = next(t for t in wf.tensors if t.method == "xor")
    offset = 0
    for t in wf.tensors:
        if t is entry:
            break
        offset += sum(stored for stored, _ in t.frames)
    data = delta / wf.data_file
    raw = bytearray(data.read_bytes())
    raw[offset + entry.frames[0][0] // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    expected = (
        rf"{data}: tensor {entry.name} frame 0: frame does not decompress"
        if compress
        else rf"tensor {entry.name}: rebuilt xxh3-128 [0-9a-f]{{32}} differs from the manifest's {entry.xxh3}"
    )
    with pytest.raises(DeltaCorruptError, match=expected):
        load_state_dict(delta, pair.base)


def test_nothing_is_written(encoded, tmp_path):
    pair, delta = encoded(base_dtype="BF16", ft_dtypes={Q_PROJ: "F16"})
    before = listing(tmp_path)
    load_state_dict(delta, pair.base)
    load_state_dict(delta, pair.base, dtype="float32")
    assert listing(tmp_path) == before


def test_lazy_first_tensor_only(encoded, monkeypatch):
    pair, delta = encoded(shards=1, index=False)
    reads: set[str] = set()
    real_read = SafetensorsFile.read

    def recording_read(self, info, start, stop):
        reads.add(info.name)
        return real_read(self, info, start, stop)

    monkeypatch.setattr(SafetensorsFile, "read", recording_read)
    tensors = iter_state_dict(delta, pair.base)
    name, tensor = next(tensors)
    tensors.close()
    first = load_manifest(delta).weight_files[0].tensors[0]
    assert name == first.name
    assert torch.equal(tensor, finetune_tensors(pair)[name])
    assert reads == {first.base.name}


def test_tensors_own_their_memory(encoded):
    pair, delta = encoded()
    sd = load_state_dict(delta, pair.base)
    gc.collect()
    assert_same(sd, finetune_tensors(pair))
    sd[Q_PROJ].add_(1)  # writable, and not shared with anything the loader kept
    assert not torch.equal(sd[Q_PROJ], finetune_tensors(pair)[Q_PROJ])


def test_peak_memory_stays_near_one_tensor(tmp_path):
    frame = 64 * 1024
    # About 9 MB in F16. Neighbouring MLP tensors are as big as the largest one, so holding
    # the previous tensor while building the next would break the bound.
    spec = LlamaSpec(vocab=1024, hidden=256, intermediate=1024, layers=4, heads=4)
    pair = make_pair(tmp_path, spec)
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta, frame_bytes=frame)
    entries = load_manifest(delta).tensors()
    total = sum(t.nbytes for t in entries)
    largest = max(t.nbytes for t in entries)
    assert total > 8_000_000 and largest < total // 16
    tensors = iter_state_dict(delta, pair.base)  # planning holds the manifest, whatever the model's size
    gc.collect()
    tracemalloc.start()
    try:
        seen = 0
        for _, tensor in tensors:
            seen += tensor.numel() * tensor.element_size()
            del tensor
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == total
    assert peak < largest + 4 * frame, (peak, largest)


class _Norm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))


class _Layer(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            self.self_attn.add_module(proj, nn.Linear(h, h, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(h, i, bias=False)
        self.mlp.up_proj = nn.Linear(h, i, bias=False)
        self.mlp.down_proj = nn.Linear(i, h, bias=False)
        self.input_layernorm = _Norm(h)
        self.post_attention_layernorm = _Norm(h)


class _TinyLlama(nn.Module):
    """Just the parameter names and shapes of a LLaMA causal LM with a value head."""

    def __init__(self, spec: LlamaSpec, vocab: int) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, spec.hidden)
        self.model.layers = nn.ModuleList(_Layer(spec.hidden, spec.intermediate) for _ in range(spec.layers))
        self.model.norm = _Norm(spec.hidden)
        self.lm_head = nn.Linear(spec.hidden, vocab, bias=False)
        self.v_head = nn.Linear(spec.hidden, 1, bias=False)


def test_load_into_a_module(encoded):
    pair, delta = encoded()
    sd = load_state_dict(delta, pair.base, dtype="float32")
    module = _TinyLlama(SMALL, SMALL.vocab + 4)
    assert module.load_state_dict(sd, strict=True).missing_keys == []
    want = finetune_tensors(pair)
    for name, param in module.state_dict().items():
        assert torch.equal(param, want[name].float()), name
    tokens = torch.tensor([0, SMALL.vocab + 3])  # a base token and an added one
    assert torch.equal(module.model.embed_tokens(tokens), want[EMBED].float()[tokens])
    assert np.isfinite(module.lm_head(module.model.norm.weight).detach().numpy()).all()


def test_copy_into_a_module_one_tensor_at_a_time(encoded):
    """The streaming pattern docs/decoding.md shows: the model plus one tensor in memory."""
    pair, delta = encoded(base_dtype="BF16")
    module = _TinyLlama(SMALL, SMALL.vocab + 4).to(torch.bfloat16)
    del module.v_head  # a causal LM has no place for the value head
    params = module.state_dict()
    skipped = []
    with torch.no_grad():
        for name, tensor in iter_state_dict(delta, pair.base):
            if name not in params:
                skipped.append(name)
                continue
            assert params[name].shape == tensor.shape
            params[name].copy_(tensor)
    assert skipped == ["v_head.weight"]
    want = finetune_tensors(pair)
    for name, param in module.named_parameters():
        assert torch.equal(param, want[name]), name
