"""The benchmark's own pieces stay correct: a baseline that is wrong makes every ratio wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from conftest import files_digest

import xorweights

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_whole_file_xor_baseline_round_trips(pair, tmp_path):
    baselines = load("baselines")
    baselines.xor4k(pair.finetuned, pair.base, tmp_path / "delta")
    baselines.xor4k(tmp_path / "delta", pair.base, tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)


def test_floor_writes_the_requested_bytes(pair, tmp_path):
    baselines = load("baselines")
    inputs = sorted(pair.base.glob("*.safetensors"))
    baselines.floor(tmp_path / "floor.bin", 12345, inputs)
    assert (tmp_path / "floor.bin").stat().st_size == 12345


def test_synthetic_fine_tune_is_small_and_adds_rows(tmp_path, monkeypatch):
    synth = load("synth")
    monkeypatch.setattr(synth, "HIDDEN", 64)
    monkeypatch.setattr(synth, "INTERMEDIATE", 176)
    monkeypatch.setattr(synth, "VOCAB", 320)
    specs = synth.model_specs(1)
    assert [s.name for s in specs][:2] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    base, ft, _ = synth.make_pair(tmp_path, 1)
    spec = specs[1]
    b = np.concatenate(list(synth.blocks(spec, False))).view(np.float16).astype(np.float32)
    f = np.concatenate(list(synth.blocks(spec, True))).view(np.float16).astype(np.float32)
    rel = np.median(np.abs(f - b) / np.abs(b))
    assert 1e-4 < rel < 2e-2
    delta = tmp_path / "delta"
    result = xorweights.encode(ft, base, delta, allow_unprotected=True)  # 16 added rows are 2% of this tiny model
    assert result.manifest.tensors()[0].unprotected_bytes == synth.ADDED * 64 * 2
    xorweights.decode(delta, base, tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(ft)
