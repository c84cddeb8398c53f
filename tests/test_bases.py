"""Bases (and fine-tunes) as users hold them: HF .bin pickles next to safetensors.

Per-tensor checksums make the container irrelevant: a delta made against a
safetensors base decodes from the same weights saved as .bin, and a .bin
fine-tune is rebuilt as safetensors shards holding exactly its tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from conftest import files_digest, run
from safetensors.torch import load_file

import xorweights
from xorweights.delta.manifest import load_manifest
from xorweights.fixtures import LlamaSpec, Tensor, make_base, make_finetune, side_files, write_checkpoint

TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
SPEC = LlamaSpec()


def as_torch(t: Tensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(t.to_bytes()), dtype=TORCH[t.dtype]).reshape(t.values.shape)


def write_bin_checkpoint(folder: Path, tensors: dict[str, Tensor], shards: int = 2, index: bool = True) -> Path:
    """HF-style pytorch_model*.bin shards, saved by torch.save like transformers does."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        group = names[k * len(names) // shards : (k + 1) * len(names) // shards]
        fname = "pytorch_model.bin" if shards == 1 else f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: as_torch(tensors[n]) for n in group}, folder / fname)
        weight_map.update(dict.fromkeys(group, fname))
    if index:
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for rel, data in side_files(SPEC).items():
        (folder / rel).write_bytes(data)
    return folder


def test_a_delta_made_against_safetensors_decodes_from_the_same_base_as_bin(tmp_path):
    base = make_base(SPEC)
    st_base = write_checkpoint(tmp_path / "base-st", base, shards=2, files=side_files(SPEC))
    bin_base = write_bin_checkpoint(tmp_path / "base-bin", base, shards=3)
    ft = write_checkpoint(tmp_path / "ft", make_finetune(base), shards=2, files=side_files(SPEC, added_tokens=4))
    delta = tmp_path / "delta"
    xorweights.encode(ft, st_base, delta)
    r = run("decode", delta, "--base", bin_base, "-o", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(ft)
    # The checksums of the two containers agree tensor by tensor.
    assert xorweights.checksum(bin_base).tensors == xorweights.checksum(st_base).tensors


def test_a_bin_fine_tune_is_rebuilt_as_safetensors_with_the_same_tensors(tmp_path):
    base_tensors = make_base(SPEC)
    ft_tensors = make_finetune(base_tensors, dtypes={"model.norm.weight": "BF16"})
    base = write_bin_checkpoint(tmp_path / "base", base_tensors, shards=1, index=False)
    ft = write_bin_checkpoint(tmp_path / "ft", ft_tensors, shards=2)
    delta = tmp_path / "delta"
    result = xorweights.encode(ft, base, delta)
    assert "pytorch_model.bin.index.json (the delta rebuilds the weights as safetensors)" in result.plan.not_shipped
    manifest = load_manifest(delta)
    assert [f.name for f in manifest.weight_files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    out = tmp_path / "out"
    xorweights.decode(delta, base, out)
    rebuilt = {
        **load_file(out / "model-00001-of-00002.safetensors"),
        **load_file(out / "model-00002-of-00002.safetensors"),
    }
    original = {}
    for p in sorted(ft.glob("pytorch_model-*.bin")):
        original.update(torch.load(p, weights_only=True))
    assert rebuilt.keys() == original.keys()
    for name, t in original.items():
        assert rebuilt[name].dtype == t.dtype and torch.equal(rebuilt[name], t), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == "model-00002-of-00002.safetensors"
    assert run("verify", out, "--delta", delta).exit_code == 0


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/xorweights-test-pickle-ran")


def test_a_pickle_that_carries_code_is_refused_and_never_run(pair, tmp_path):
    MARKER.unlink(missing_ok=True)
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"model.norm.weight": _RunsCode()}, folder / "pytorch_model.bin")
    r = run("encode", pair.finetuned, "--base", folder, "-o", tmp_path / "delta")
    assert r.exit_code == 3
    assert (
        f"{folder / 'pytorch_model.bin'}: the pickle holds more than weights (it references posix.system)" in r.stderr
    )
    assert "refused" in r.stderr and "Traceback" not in r.output
    assert not MARKER.exists(), "the pickle's code ran"


def test_a_bin_state_dict_that_is_not_flat_is_refused(pair, tmp_path):
    folder = tmp_path / "nested"
    folder.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, folder / "pytorch_model.bin")
    r = run("checksum", folder, "-o", tmp_path / "sums.json")
    assert r.exit_code == 3
    assert "expected a flat dict of tensor names to tensors" in r.stderr


def test_a_fine_tune_whose_every_name_carries_a_wrapper_prefix_is_mapped_automatically(tmp_path):
    base_tensors = make_base(SPEC)
    wrapped = {f"base_model.model.{n}": t for n, t in make_finetune(base_tensors, extra=False).items()}
    base = write_checkpoint(tmp_path / "base", base_tensors, files=side_files(SPEC))
    ft = write_checkpoint(tmp_path / "ft", wrapped, files=side_files(SPEC))
    r = run("encode", ft, "--base", base, "-o", tmp_path / "delta")
    assert r.exit_code == 0, r.stderr
    assert "names mapped automatically with --rename '^=base_model.model.'" in r.stdout
    assert xorweights.inspect(tmp_path / "delta").tensors_xored == len(wrapped)
    xorweights.decode(tmp_path / "delta", base, tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(ft)


def test_from_metas_original_files_to_the_fine_tune_in_one_command(tmp_path):
    from test_meta_llama import hf_tensors, spec, write_meta

    s = spec()
    hf = hf_tensors(s, "F16", kv_heads=s.heads)
    base_tensors = {n: Tensor("F16", t.float().numpy()) for n, t in hf.items()}
    st_base = write_checkpoint(tmp_path / "hf-base", base_tensors, files=side_files(s))
    ft = write_checkpoint(tmp_path / "ft", make_finetune(base_tensors, extra=False, added_rows=0), files=side_files(s))
    delta = tmp_path / "delta"
    xorweights.encode(ft, st_base, delta)
    meta = write_meta(tmp_path / "meta", hf, s, kv_heads=s.heads, shards=2)
    (meta / "tokenizer.model").write_bytes(side_files(s)["tokenizer.model"])
    # Meta's folder lacks the HF config files the delta takes from the base: decode says where they come from.
    r = run("decode", delta, "--base", meta, "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert "Meta's original files do not include it: it comes with the Hugging Face version of the base" in r.stderr
    for rel, data in side_files(s).items():
        (meta / rel).write_bytes(data)
    r = run("decode", delta, "--base", meta, "-o", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(ft)
    assert xorweights.checksum(meta).tensors == xorweights.checksum(st_base).tensors
