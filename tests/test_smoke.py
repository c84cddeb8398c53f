from conftest import files_digest, run


def test_cli_round_trip_is_byte_identical(pair, tmp_path):
    delta, out = tmp_path / "delta", tmp_path / "out"
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", delta)
    assert r.exit_code == 0, r.output
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert r.exit_code == 0, r.output
    assert files_digest(out) == files_digest(pair.finetuned)
