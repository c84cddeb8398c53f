"""The benchmark's own pieces stay correct: a baseline that is wrong makes every ratio wrong."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import files_digest

import xorweights

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str, script: str | None = None):
    """Import bench/<script>.py (default: ``name``) as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{script or name}.py")
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


def test_codec_table_deltas_decode_bit_exactly(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    codecs = load("codec_sizes")
    work, results = tmp_path / "work", tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["codec_sizes.py", "--quick", "--workdir", str(work), "--results", str(results)])
    codecs.main()
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(codecs.DTYPES) * len(codecs.STRENGTHS)  # a header and every dtype x strength
    (written,) = results.glob("codecs-*.json")
    rows = json.loads(written.read_text())["rows"]
    for row in rows:
        case = codecs.real_case(work, row["dtype"], row["strength"])
        for delta, stored in ((case.v2, row["sizes"]["v2_bytes"]), (case.v3, row["sizes"]["v3_bytes"])):
            assert 0 < stored == sum(p.stat().st_size for p in delta.rglob("*") if p.is_file())
            out = tmp_path / "out" / delta.relative_to(work)
            xorweights.decode(delta, case.base, out)
            assert files_digest(out) == files_digest(case.finetuned)
        assert row["sizes"]["round_trips"]


def test_stream_disk_poller_counts_sparse_files_by_blocks_and_catches_a_passing_peak(tmp_path):
    stream = load("stream")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "dense").write_bytes(b"x" * 100_000)
    with (tmp_path / "sparse").open("wb") as f:
        f.truncate(1 << 30)  # a GB that takes no disk: must not count
    (tmp_path / "link").symlink_to(tmp_path / "a" / "dense")  # a cache snapshot link: its blob counts once
    assert stream.disk_bytes([tmp_path, tmp_path / "missing"]) == 100_000
    with stream.DiskPoller([tmp_path / "a"], interval=10) as poll:
        (tmp_path / "a" / "dense").unlink()
    assert (poll.peak, poll.samples) == (100_000, 2)


def test_stream_targets_judge_each_rate_and_the_kill_test():
    stream = load("stream")
    row = {
        "rate_bytes_per_s": 4e8,
        "stream_over_download": {"ratio_of_medians": 1.05, "median_per_round": 1.2},
        "stream": {"max_rss_mib": 250.0, "disk_peak_over_output_fraction_of_delta": 0.02},
    }
    checks = stream.targets([row], {"matches": True, "served_over_delta": 1.3})
    assert [(what, ok) for what, _, _, ok in checks] == [
        ("stream / download alone, 400 MB/s, medians", True),
        ("stream / download alone, 400 MB/s, per round", False),
        ("stream peak RSS MiB, 400 MB/s", True),
        ("stream (peak disk - output) / delta, 400 MB/s", False),
        ("kill test: output equals the fine-tune", True),
        ("kill test: served / delta, all runs", False),
    ]
