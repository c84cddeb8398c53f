"""encode -> decode rebuilds the fine-tune bit for bit, for every layout and dtype mix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import files_digest, run, tree_digest
from safetensors import safe_open
from safetensors.torch import load_file

import xorweights
from xorweights.delta.manifest import MANIFEST_NAME, load_manifest
from xorweights.fixtures import LlamaSpec, make_base, side_files, write_checkpoint

SMALL = LlamaSpec(vocab=1024, hidden=16, intermediate=40, layers=1, heads=2)  # added rows stay under 1%


def round_trip(pair, tmp_path: Path, **encode_kwargs) -> tuple[Path, Path]:
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta, **encode_kwargs)
    xorweights.decode(delta, pair.base, out)
    assert files_digest(out) == files_digest(pair.finetuned)
    return delta, out


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_round_trip_each_dtype(make, tmp_path, dtype):
    pair = make(spec=SMALL, base_dtype=dtype)
    delta, _ = round_trip(pair, tmp_path)
    methods = {t.name: t.method for t in load_manifest(delta).tensors()}
    assert methods["model.layers.0.mlp.up_proj.weight"] == "xor"
    assert methods["model.embed_tokens.weight"] == "partial_xor"
    assert methods["v_head.weight"] == "raw"


@pytest.mark.parametrize(
    ("base_dtype", "ft_dtype"),
    [("F16", "BF16"), ("BF16", "F16"), ("F32", "F16"), ("F16", "F32"), ("BF16", "F32"), ("F32", "BF16")],
)
def test_round_trip_mixed_dtypes(make, tmp_path, base_dtype, ft_dtype):
    names = ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    pair = make(spec=SMALL, base_dtype=base_dtype, ft_dtypes=dict.fromkeys(names, ft_dtype))
    delta, _ = round_trip(pair, tmp_path)
    entry = {t.name: t for t in load_manifest(delta).tensors()}[names[0]]
    assert (entry.dtype, entry.base.dtype, entry.method) == (ft_dtype, base_dtype, "xor")


@pytest.mark.parametrize(("shards", "index"), [(1, False), (1, True), (3, True), (3, False)])
def test_round_trip_layouts(make, tmp_path, shards, index):
    pair = make(spec=SMALL, shards=shards, index=index)
    _, out = round_trip(pair, tmp_path)
    assert len(list(out.glob("*.safetensors"))) == shards
    assert (out / "model.safetensors.index.json").exists() == index


def test_round_trip_many_frames_and_no_compress(pair, tmp_path):
    # 64-byte frames cut every tensor into many frames.
    delta, _ = round_trip(pair, tmp_path / "zstd", frame_bytes=64)
    assert max(len(t.frames) for t in load_manifest(delta).tensors()) > 10
    delta, _ = round_trip(pair, tmp_path / "plain", compress=False, frame_bytes=64)
    manifest = load_manifest(delta)
    assert manifest.compression == "none"
    assert all(stored == raw for t in manifest.tensors() for stored, raw in t.frames)


def test_compressed_delta_is_smaller_than_plain(make, tmp_path):
    pair = make(spec=LlamaSpec(vocab=256, hidden=64, intermediate=172, layers=2, heads=4))
    zstd = xorweights.encode(pair.finetuned, pair.base, tmp_path / "z").delta_bytes
    plain = xorweights.encode(pair.finetuned, pair.base, tmp_path / "p", compress=False).delta_bytes
    assert zstd < 0.8 * plain


def test_dim0_shrunk_and_incompatible_shapes(tmp_path):
    base = make_base(SMALL, seed=3)
    ft = dict(base)
    emb = base["model.embed_tokens.weight"]
    ft["model.embed_tokens.weight"] = type(emb)(emb.dtype, emb.values[:40] * 1.001)  # 48 -> 40 rows
    q = base["model.layers.0.self_attn.q_proj.weight"]
    ft[q_name := "model.layers.0.self_attn.q_proj.weight"] = type(q)(q.dtype, np.tile(q.values, (1, 2)))  # dim 1 grew
    write_checkpoint(tmp_path / "base", base, files=side_files(SMALL))
    write_checkpoint(tmp_path / "ft", ft, files=side_files(SMALL))
    delta = tmp_path / "delta"
    xorweights.encode(tmp_path / "ft", tmp_path / "base", delta, allow_unprotected=True)  # q_proj can't be XORed
    entries = {t.name: t for t in load_manifest(delta).tensors()}
    assert entries["model.embed_tokens.weight"].method == "partial_xor"
    assert entries["model.embed_tokens.weight"].unprotected_bytes == 0
    assert entries[q_name].method == "raw" and entries[q_name].base is None
    xorweights.decode(delta, tmp_path / "base", tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(tmp_path / "ft")


def test_files_referenced_shipped_and_excluded(pair, tmp_path):
    (pair.finetuned / "notes.txt").write_text("training notes")
    (pair.finetuned / "pytorch_model.bin").write_bytes(b"weights in another format")
    delta = tmp_path / "delta"
    result = xorweights.encode(pair.finetuned, pair.base, delta, exclude=["notes.txt"])
    modes = {f.name: f.mode for f in result.manifest.other_files}
    assert modes["tokenizer.model"] == "reference"
    assert modes["generation_config.json"] == "reference"
    assert modes["config.json"] == "ship"  # vocab_size changed
    assert modes["added_tokens.json"] == "ship"
    assert "notes.txt" not in modes and "pytorch_model.bin" not in modes
    shipped = sorted(p.relative_to(delta).as_posix() for p in delta.rglob("*") if p.is_file())
    assert "files/tokenizer.model" not in shipped
    assert "files/config.json" in shipped
    # No file of a delta may be loadable as model weights.
    assert not any(p.endswith((".safetensors", ".bin")) for p in shipped)
    out = tmp_path / "out"
    xorweights.decode(delta, pair.base, out)
    assert (out / "tokenizer.model").read_bytes() == (pair.base / "tokenizer.model").read_bytes()
    assert not (out / "notes.txt").exists()


def test_output_reads_back_with_official_safe_open(pair, tmp_path):
    _, out = round_trip(pair, tmp_path)
    with safe_open(out / "model-00001-of-00002.safetensors", framework="pt") as f:
        original = load_file(pair.finetuned / "model-00001-of-00002.safetensors")
        assert sorted(f.keys()) == sorted(original)
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(f.get_tensor(name), original[name])


def test_inputs_are_never_modified(pair, tmp_path):
    before = (tree_digest(pair.base), tree_digest(pair.finetuned))
    delta, _ = round_trip(pair, tmp_path)
    delta_before = tree_digest(delta)
    xorweights.verify(tmp_path / "out", delta=delta)
    assert (tree_digest(pair.base), tree_digest(pair.finetuned)) == before
    assert tree_digest(delta) == delta_before


def test_dtype_float16_output_equals_torch_cast(make, tmp_path):
    pair = make(spec=SMALL, base_dtype="F32", ft_dtypes={"model.norm.weight": "BF16"})
    delta, out = tmp_path / "delta", tmp_path / "fp16"
    xorweights.encode(pair.finetuned, pair.base, delta)
    r = run("decode", delta, "--base", pair.base, "-o", out, "--dtype", "float16")
    assert r.exit_code == 0, r.stderr
    original = {}
    for p in sorted(pair.finetuned.glob("*.safetensors")):
        original.update(load_file(p))
    converted = {}
    for p in sorted(out.glob("*.safetensors")):
        converted.update(load_file(p))
    assert converted.keys() == original.keys()
    for name, t in original.items():
        assert converted[name].dtype == torch.float16
        assert torch.equal(converted[name], t.to(torch.float16)), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in original.values())
    # The converted files carry their own checksums, which verify uses.
    assert run("verify", out).exit_code == 0
    (out / "config.json").write_text("{}")
    r = run("verify", out)
    assert r.exit_code == 1 and "file config.json: expected sha256" in r.stdout


def test_checksum_then_verify(pair, tmp_path):
    sums = tmp_path / "sums.json"
    r = run("checksum", pair.finetuned, "-o", sums)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(sums.read_text())
    assert len(doc["tensors"]) == 22 and "model-00001-of-00002.safetensors" in doc["files"]
    assert run("verify", pair.finetuned, "--manifest", sums).exit_code == 0
    r = run("verify", pair.base, "--manifest", sums, "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False
    assert "tensor v_head.weight: missing" in report["problems"]


def test_verify_against_delta_sides(pair, tmp_path):
    delta, out = round_trip(pair, tmp_path)
    assert run("verify", out, "--delta", delta).exit_code == 0
    assert run("verify", pair.base, "--delta", delta, "--side", "base").exit_code == 0
    r = run("verify", pair.base, "--delta", delta, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["problems"]


def test_inspect_reports_base_and_unprotected_bytes(pair, tmp_path):
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta, base_repo_id="org/base", base_revision="abc123")
    r = run("inspect", delta)
    assert r.exit_code == 0
    assert "repo org/base at revision abc123" in r.stdout
    assert "4 rows of model.embed_tokens.weight are stored unprotected" in r.stdout
    s = json.loads(run("inspect", delta, "--json").stdout)
    assert s["format_version"] == 3
    assert s["unprotected_allowed"] is False and s["max_unprotected_pct"] == 1.0
    assert s["unprotected_bytes"] == 4 * 32 * 2 * 2 + 32 * 4  # two 4-row F16 blocks + an F32 value head


def test_encode_summary_names_unprotected_rows(pair, tmp_path):
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "delta")
    assert r.exit_code == 0, r.stderr
    assert "4 rows of lm_head.weight are stored unprotected" in r.stdout
    assert "v_head.weight is stored unprotected" in r.stdout
    assert "files taken from the base: generation_config.json" in r.stdout
    assert (tmp_path / "delta" / MANIFEST_NAME).is_file()
    assert not (tmp_path / "delta" / ".xorweights").exists()


def test_demo_runs_and_proves_the_round_trip():
    r = run("demo")
    assert r.exit_code == 0, r.stderr
    assert "rebuilt byte for byte" in r.stdout


def test_zero_row_tensors_round_trip(tmp_path):
    base = make_base(SMALL, seed=4)
    ft = dict(base)
    emb = base["model.embed_tokens.weight"]
    ft["model.embed_tokens.weight"] = type(emb)(emb.dtype, emb.values[:0])  # 0 rows against 48
    base["empty.weight"] = type(emb)(emb.dtype, emb.values[:0])  # 0 rows in the base
    ft["empty.weight"] = type(emb)(emb.dtype, emb.values[:2])
    write_checkpoint(tmp_path / "base", base, files=side_files(SMALL))
    write_checkpoint(tmp_path / "ft", ft, files=side_files(SMALL))
    xorweights.encode(tmp_path / "ft", tmp_path / "base", tmp_path / "delta")
    xorweights.decode(tmp_path / "delta", tmp_path / "base", tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(tmp_path / "ft")


@pytest.mark.parametrize("compress", [True, False])
def test_jobs_do_not_change_the_bytes(pair, tmp_path, compress):
    """Many small frames on 1 and 3 threads: the same delta and the same output."""
    deltas = {}
    for jobs in (1, 3):
        delta = tmp_path / f"delta{jobs}"
        xorweights.encode(pair.finetuned, pair.base, delta, frame_bytes=64, compress=compress, jobs=jobs)
        deltas[jobs] = tree_digest(delta)
        for out_jobs in (1, 3):
            out = tmp_path / f"out{jobs}{out_jobs}"
            r = run("decode", delta, "--base", pair.base, "-o", out, "--jobs", out_jobs, "-q")
            assert r.exit_code == 0, r.stderr
            assert files_digest(out) == files_digest(pair.finetuned)
    assert deltas[1] == deltas[3]
