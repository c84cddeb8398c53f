"""Release safety: encode refuses to publish the base's weights in the clear by accident."""

from __future__ import annotations

import json

import numpy as np
from conftest import files_digest, run

import xorweights
from xorweights.delta.manifest import MANIFEST_NAME
from xorweights.fixtures import LlamaSpec, Tensor, make_base, make_finetune, side_files, write_checkpoint

SPEC = LlamaSpec()


def checkpoint(folder, tensors, files=None):
    return write_checkpoint(folder, tensors, shards=2, files=side_files(SPEC) if files is None else files)


def pair_from(tmp_path, base_tensors, ft_tensors):
    return checkpoint(tmp_path / "base", base_tensors), checkpoint(tmp_path / "ft", ft_tensors)


def encode_cli(ft, base, out, *options):
    return run("encode", ft, "--base", base, "-o", out, "-q", *options)


def error_line(r):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("xorweights: error: encode refused: ")
    return lines[0]


def test_an_unrelated_base_xors_everything_and_exposes_nothing(tmp_path):
    ft = make_finetune(make_base(SPEC, seed=1), added_rows=0, extra=False)
    base, ft_dir = pair_from(tmp_path, make_base(SPEC, seed=99), ft)  # other weights, same names and shapes
    r = encode_cli(ft_dir, base, tmp_path / "delta")
    assert r.exit_code == 0, r.stderr
    s = xorweights.inspect(tmp_path / "delta")
    assert (s.tensors_xored, s.unprotected_bytes) == (s.tensors, 0)
    xorweights.decode(tmp_path / "delta", base, tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(ft_dir)


def test_a_base_without_the_model_prefix_is_refused_with_the_rename_that_fixes_it(tmp_path):
    base_tensors = make_base(SPEC)
    ft = make_finetune(base_tensors)
    stripped = {name.removeprefix("model."): t for name, t in base_tensors.items()}
    base, ft_dir = pair_from(tmp_path, stripped, ft)
    r = encode_cli(ft_dir, base, tmp_path / "delta")
    assert r.exit_code == 6
    line = error_line(r)
    assert "of tensor bytes" in line and "more than --max-unprotected 1%" in line
    assert "model.embed_tokens.weight 16.2 KiB" in line
    assert "likely cause: the base names its tensors with another prefix (--rename '^=model.' pairs them)" in line
    assert "(hint: pass --rename '^=model.' to pair the names, or pass --allow-unprotected" in line
    assert not (tmp_path / "delta").exists()
    # The suggested rename works; decode needs no rename: the manifest names the base's own tensors.
    r = encode_cli(ft_dir, base, tmp_path / "delta", "--rename", "^=model.")
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((tmp_path / "delta" / MANIFEST_NAME).read_text())
    entry = next(t for f in manifest["weight_files"] for t in f["tensors"] if t["name"] == "model.norm.weight")
    assert entry["base"]["name"] == "norm.weight"
    xorweights.decode(tmp_path / "delta", base, tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(ft_dir)


def test_a_base_missing_a_tensor_is_refused_unless_allowed(tmp_path):
    base_tensors = make_base(SPEC)
    ft = make_finetune(base_tensors)
    del base_tensors["model.layers.1.mlp.gate_proj.weight"]
    base, ft_dir = pair_from(tmp_path, base_tensors, ft)
    r = encode_cli(ft_dir, base, tmp_path / "delta")
    assert r.exit_code == 6
    assert "model.layers.1.mlp.gate_proj.weight 5.5 KiB" in error_line(r)
    r = encode_cli(ft_dir, base, tmp_path / "delta", "--allow-unprotected")
    assert r.exit_code == 0, r.stderr
    r = run("inspect", tmp_path / "delta")
    assert "the releaser allowed this explicitly with --allow-unprotected" in r.stdout
    assert "model.layers.1.mlp.gate_proj.weight is stored unprotected: 5632 bytes" in r.stdout
    manifest = json.loads((tmp_path / "delta" / MANIFEST_NAME).read_text())
    assert manifest["exposure"] == {"allowed": True, "max_unprotected_pct": 1.0, "unprotected_bytes": 5632 + 640}


def test_a_large_extra_tensor_is_refused_and_a_raised_limit_accepts_it(tmp_path):
    base_tensors = make_base(SPEC)
    ft = make_finetune(base_tensors)
    ft["score.weight"] = Tensor("F32", np.ones((16, SPEC.hidden), np.float32))  # 2 KiB: 2.4% of the model
    base, ft_dir = pair_from(tmp_path, base_tensors, ft)
    r = encode_cli(ft_dir, base, tmp_path / "delta")
    assert r.exit_code == 6
    line = error_line(r)
    assert line.index("score.weight 2.0 KiB") < line.index("lm_head.weight 256 B")  # largest first
    assert "and 1 more" in line
    assert "likely cause: tensors the base does not have (new heads or layers) or added rows" in line
    r = encode_cli(ft_dir, base, tmp_path / "delta", "--max-unprotected", "5")
    assert r.exit_code == 0, r.stderr
    assert "within the 5% limit encode enforces" in run("inspect", tmp_path / "delta").stdout


def test_a_renamed_tensor_is_refused_even_under_the_limit(tmp_path):
    base_tensors = make_base(SPEC)
    ft = make_finetune(base_tensors)
    base_tensors["model.final_norm.weight"] = base_tensors.pop("model.norm.weight")  # 64 bytes
    base, ft_dir = pair_from(tmp_path, base_tensors, ft)
    r = encode_cli(ft_dir, base, tmp_path / "delta")
    assert r.exit_code == 6
    line = error_line(r)
    assert "1 fine-tune tensor(s) have no counterpart although the base has one like them" in line
    assert (
        "the base has model.final_norm.weight with the same shape and dtype"
        in run("encode", ft_dir, "--base", base, "-o", tmp_path / "delta", "--dry-run").stdout
    )
    r = encode_cli(ft_dir, base, tmp_path / "delta", "--rename", r"^model\.final_norm=model.norm")
    assert r.exit_code == 0, r.stderr


def test_added_token_rows_are_allowed_and_listed(pair, tmp_path):
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "delta", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "model.embed_tokens.weight: 256 B (4 rows of model.embed_tokens.weight are stored unprotected)" in r.stdout
    assert "v_head.weight: 128 B (no tensor of that name in the base)" in r.stdout


def test_dry_run_writes_nothing_and_reports_files(pair, tmp_path):
    (pair.finetuned / "spm.model").write_bytes((pair.base / "tokenizer.model").read_bytes())
    delta = tmp_path / "delta"
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", delta, "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert not delta.exists()
    out = r.stdout
    assert out.startswith("plan: 21 of 22 tensors XORed against the base, in 2 files\n")
    assert "640 B of 81.9 KiB of tensor bytes unprotected (0.763%)" in out
    assert "  shipped verbatim: config.json" in out
    assert "  taken from the base: tokenizer.model" in out
    assert "warning: spm.model is byte-identical to the base's tokenizer.model" in out
    assert out.rstrip().endswith(f"dry run: encode would write {delta}; nothing was written")


def test_dry_run_that_would_refuse_exits_1_after_the_report(tmp_path):
    base_tensors = make_base(SPEC)
    ft = make_finetune(base_tensors)
    del base_tensors["model.embed_tokens.weight"]
    base, ft_dir = pair_from(tmp_path, base_tensors, ft)
    r = run("encode", ft_dir, "--base", base, "-o", tmp_path / "delta", "--dry-run")
    assert r.exit_code == 6
    assert "model.embed_tokens.weight: 16.2 KiB (no tensor of that name in the base)" in r.stdout
    assert "encode refused" in r.stderr
    assert not (tmp_path / "delta").exists()


def test_a_manifest_whose_exposure_does_not_match_its_tensors_is_refused(pair, tmp_path):
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta)
    path = delta / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["exposure"]["unprotected_bytes"] = 0
    path.write_text(json.dumps(manifest))
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert r.exit_code == 3
    assert "exposure says 0 unprotected bytes, the tensors hold 640" in r.stderr
