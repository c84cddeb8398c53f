"""docs/reliability.md is generated here, from real runs, so it cannot drift from the code.

Every bad input below is built from the tiny fixtures and fed to the CLI; the
test asserts the exit code of the error's class (docs/decoding.md, "Exit codes"),
a single error line with a hint and no traceback, then renders the code and the
message into the table. The faults are injected
for real (kill -9 of a decode, a disk that fills up) and counted. If the
rendered document differs from the committed one the test fails; regenerate it
with ``XORWEIGHTS_WRITE_DOCS=1 .venv/bin/python -m pytest tests/test_reliability_doc.py``.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import files_digest, run
from test_errors import (
    _gap,
    _header_longer_than_file,
    _invalid_json,
    _trailing_bytes,
    _truncate_to_prefix,
    _unknown_dtype,
    edit_manifest,
    entry,
    flip,
    tensor_span,
)
from test_hostile import (
    Q_PROJ,
    _broken_symlink,
    _claims_200_mb,
    _directory,
    _duplicate_tensor_name,
    _metadata_value_not_a_string,
    _offsets_past_the_end,
    _overlapping_offsets,
    _shape_does_not_match_bytes,
    original_frame,
    replace_frame,
)

import xorweights
from xorweights.decode_state import STATE_NAME
from xorweights.errors import OutputError
from xorweights.fixtures import LlamaSpec, Pair, make_pair
from xorweights.inputs import MAX_MANIFEST_BYTES, MAX_MANIFEST_VALUES

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
SHARD1 = "model-00001-of-00002.safetensors"
EMBED = "model.embed_tokens.weight"


@dataclass(frozen=True)
class Case:
    section: str
    what: str
    build: Callable[[Path], list[object]]  # makes the inputs under a folder; returns the CLI arguments
    code: int = 1


def _pair(root: Path, **kwargs: Any) -> Pair:
    return make_pair(root / "pair", **kwargs)


def _delta(root: Path, pair: Pair, **kwargs: Any) -> Path:
    delta = root / "delta"
    if not delta.exists():
        xorweights.encode(pair.finetuned, pair.base, delta, **kwargs)
    return delta


def damaged_finetune(damage: Callable[[Path], object]) -> Callable[[Path], list[object]]:
    def build(root: Path) -> list[object]:
        pair = _pair(root)
        damage(pair.finetuned / SHARD1)
        return ["encode", pair.finetuned, "--base", pair.base, "-o", root / "delta"]

    return build


def edited_manifest(edit: Callable[[dict[str, Any]], object]) -> Callable[[Path], list[object]]:
    def build(root: Path) -> list[object]:
        pair = _pair(root)
        delta = _delta(root, pair)
        edit_manifest(delta, edit)
        return ["decode", delta, "--base", pair.base, "-o", root / "out"]

    return build


def damaged_frames(damage: Callable[[Path], object]) -> Callable[[Path], list[object]]:
    def build(root: Path) -> list[object]:
        pair = _pair(root)
        delta = _delta(root, pair, frame_bytes=64)
        damage(delta)
        return ["decode", delta, "--base", pair.base, "-o", root / "out"]

    return build


def other_base(**kwargs: Any) -> Callable[[Path], list[object]]:
    def build(root: Path) -> list[object]:
        pair = _pair(root)
        delta = _delta(root, pair)
        other = make_pair(root / "other", **kwargs)
        return ["decode", delta, "--base", other.base, "-o", root / "out"]

    return build


def changed_base(change: Callable[[Pair], object]) -> Callable[[Path], list[object]]:
    def build(root: Path) -> list[object]:
        pair = _pair(root)
        delta = _delta(root, pair)
        change(pair)
        return ["decode", delta, "--base", pair.base, "-o", root / "out"]

    return build


def _flip_in_tensor(pair: Pair) -> None:
    begin, _ = tensor_span(pair.base / SHARD1, Q_PROJ)
    flip(pair.base / SHARD1, begin + 7)


def _swap_two_frames(delta: Path) -> None:
    a, b = original_frame(delta, EMBED, 0), original_frame(delta, EMBED, 1)
    replace_frame(delta, EMBED, 0, b)
    replace_frame(delta, EMBED, 1, a)


def _bomb(delta: Path) -> None:
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))
    replace_frame(delta, Q_PROJ, 0, bomb)


def _flip_frame(delta: Path) -> None:
    frame = bytearray(original_frame(delta, Q_PROJ, 1))
    frame[len(frame) // 2] ^= 0x10
    replace_frame(delta, Q_PROJ, 1, bytes(frame))


def _out_inside_delta(root: Path) -> list[object]:
    pair = _pair(root)
    delta = _delta(root, pair)
    return ["decode", delta, "--base", pair.base, "-o", delta / "out"]


def _link_in_out(root: Path) -> list[object]:
    pair = _pair(root)
    delta = _delta(root, pair)
    (root / "out").mkdir()
    (root / "victim").write_text("precious")
    (root / "out" / "config.json").symlink_to(root / "victim")
    return ["decode", delta, "--base", pair.base, "-o", root / "out"]


def _wrong_name_prefix(root: Path) -> list[object]:
    from xorweights.fixtures import make_base, make_finetune, side_files, write_checkpoint

    base = make_base(LlamaSpec())
    ft = write_checkpoint(root / "ft", make_finetune(base), files=side_files(LlamaSpec()))
    stripped = {n.removeprefix("model."): t for n, t in base.items()}
    plain = write_checkpoint(root / "base", stripped, files=side_files(LlamaSpec()))
    return ["encode", ft, "--base", plain, "-o", root / "delta"]


def _linked_out_of_the_finetune(root: Path) -> list[object]:
    pair = _pair(root)
    (root / "secret.txt").write_text("a releaser's private file")
    (pair.finetuned / "notes.txt").symlink_to(root / "secret.txt")
    return ["encode", pair.finetuned, "--base", pair.base, "-o", root / "delta"]


def _shipped(change: Callable[[Path, Path], object]) -> Callable[[Path], list[object]]:
    """A delta whose shipped added_tokens.json is replaced by ``change(path, root)``."""

    def build(root: Path) -> list[object]:
        pair = _pair(root)
        shipped = _delta(root, pair) / "files" / "added_tokens.json"
        change(shipped, root)
        return ["decode", root / "delta", "--base", pair.base, "-o", root / "out"]

    return build


def _link_to_secret(shipped: Path, root: Path) -> None:
    (root / "secret.txt").write_text("a downloader's private file")
    shipped.unlink()
    shipped.symlink_to(root / "secret.txt")


def _fifo(shipped: Path, root: Path) -> None:
    shipped.unlink()
    os.mkfifo(shipped)


def _sparse_manifest(delta: Path) -> None:
    os.truncate(delta / "xorweights-delta.json", MAX_MANIFEST_BYTES + 1)


def _damaged_state(root: Path) -> list[object]:
    pair = _pair(root)
    delta = _delta(root, pair)
    state = root / "out" / ".xorweights" / STATE_NAME
    state.parent.mkdir(parents=True)
    state.write_bytes(b"\x00\xff not a state file\n")
    return ["decode", delta, "--base", pair.base, "-o", root / "out"]


def _foreign_folder(root: Path) -> list[object]:
    pair = _pair(root)
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work")
    return ["encode", pair.finetuned, "--base", pair.base, "-o", root / "mine"]


def _checksum_into_input(root: Path) -> list[object]:
    pair = _pair(root)
    return ["checksum", pair.finetuned, "-o", pair.finetuned / "sums.json"]


def _stride0_bin(root: Path) -> list[object]:
    import torch

    (root / "bin").mkdir(parents=True)
    torch.save({"w": torch.zeros(1).expand(40000, 40000)}, root / "bin" / "pytorch_model.bin")
    return ["checksum", root / "bin", "-o", root / "sums.json"]


def _meta_layers(root: Path) -> list[object]:
    from test_meta_llama import hf_tensors, spec, write_meta
    from test_size_bombs import set_params

    s = spec()
    meta = write_meta(root / "meta", hf_tensors(s, "F16", 4), s, kv_heads=4, shards=2)
    set_params(meta, n_layers=100_000_000)
    return ["checksum", meta, "-o", root / "sums.json"]


def _gzip_bomb(root: Path) -> list[object]:
    from test_legacy import SHARD1 as LEGACY_SHARD
    from test_legacy import make_release
    from test_size_bombs import gzip_zeros

    rel = make_release(root / "release", compress=True)
    gzip_zeros(rel.payload / LEGACY_SHARD, 100 << 20)
    return ["decode-legacy", rel.payload, "-o", root / "out", *rel.options()]


def _edit_header_same_length(m: dict[str, Any]) -> None:
    wf = m["weight_files"][0]
    wf["header"] = wf["header"].replace('"pt"', '"px"', 1)


CASES = [
    Case("safetensors", "a truncated file", damaged_finetune(_truncate_to_prefix), code=3),
    Case("safetensors", "a header length larger than the file", damaged_finetune(_header_longer_than_file), code=3),
    Case("safetensors", "a header over 100 MB", damaged_finetune(_claims_200_mb), code=3),
    Case("safetensors", "invalid JSON in the header", damaged_finetune(_invalid_json), code=3),
    Case("safetensors", "a non-string `__metadata__` value", damaged_finetune(_metadata_value_not_a_string), code=3),
    Case("safetensors", "an unknown dtype", damaged_finetune(_unknown_dtype), code=3),
    Case("safetensors", "offsets out of range", damaged_finetune(_offsets_past_the_end), code=3),
    Case("safetensors", "overlapping offsets", damaged_finetune(_overlapping_offsets), code=3),
    Case("safetensors", "offsets leaving a gap", damaged_finetune(_gap), code=3),
    Case("safetensors", "offsets not covering the data", damaged_finetune(_trailing_bytes), code=3),
    Case(
        "safetensors",
        "shape × dtype not matching the byte length",
        damaged_finetune(_shape_does_not_match_bytes),
        code=3,
    ),
    Case("safetensors", "duplicate tensor names", damaged_finetune(_duplicate_tensor_name), code=3),
    Case("safetensors", "a weight file that is a directory", damaged_finetune(_directory), code=3),
    Case("safetensors", "a weight file that is a broken link", damaged_finetune(_broken_symlink), code=3),
    Case(
        "manifest", "an unknown (newer) format version", edited_manifest(lambda m: m.update(format_version=99)), code=3
    ),
    Case("manifest", "a missing field", edited_manifest(lambda m: m.pop("compression")), code=3),
    Case("manifest", "an extra field", edited_manifest(lambda m: m.update(signed_by="me")), code=3),
    Case(
        "manifest",
        "a file name with `..`",
        edited_manifest(lambda m: m["weight_files"][0].update(name="../evil.safetensors")),
        code=3,
    ),
    Case(
        "manifest",
        "an absolute file name",
        edited_manifest(lambda m: m["other_files"][0].update(name="/etc/passwd")),
        code=3,
    ),
    Case(
        "manifest",
        "a file name with NUL",
        edited_manifest(lambda m: m["other_files"][0].update(name="config.json\x00.sh")),
        code=3,
    ),
    Case(
        "manifest",
        "a file name with a path separator",
        edited_manifest(lambda m: m["weight_files"][0].update(name="sub/model.safetensors")),
        code=3,
    ),
    Case(
        "manifest",
        "a tensor listed twice",
        edited_manifest(lambda m: m["weight_files"][1]["tensors"].append(m["weight_files"][0]["tensors"][1])),
        code=3,
    ),
    Case(
        "manifest",
        "frame sizes that do not match the data file",
        edited_manifest(lambda m: entry(m, Q_PROJ)["frames"][0].__setitem__(0, entry(m, Q_PROJ)["frames"][0][0] + 1)),
        code=3,
    ),
    Case("frames", "a decompression bomb (64 MiB where 64 bytes are declared)", damaged_frames(_bomb), code=3),
    Case("frames", "a flipped bit in a compressed frame", damaged_frames(_flip_frame), code=3),
    Case(
        "frames",
        "a truncated frame",
        damaged_frames(lambda d: replace_frame(d, Q_PROJ, 1, original_frame(d, Q_PROJ, 1)[:-1])),
        code=3,
    ),
    Case("frames", "frames in the wrong order", damaged_frames(_swap_two_frames), code=3),
    Case("wrong base", "another model (other weights)", other_base(seed=5)),
    Case("wrong base", "another dtype (F32)", other_base(base_dtype="F32")),
    Case("wrong base", "a lossy bf16 conversion of an fp16 base", other_base(base_dtype="BF16")),
    Case("wrong base", "another shape", other_base(spec=LlamaSpec(intermediate=96))),
    Case("wrong base", "one tensor changed", changed_base(_flip_in_tensor)),
    Case("wrong base", "a tensor missing", other_base(spec=LlamaSpec(layers=1))),
    Case(
        "wrong base",
        "a referenced file missing",
        changed_base(lambda p: (p.base / "tokenizer.model").unlink()),
    ),
    Case("release", "a base whose tensor names lack `model.`", _wrong_name_prefix, code=6),
    Case("links and files", "a fine-tune file linking out of its folder", _linked_out_of_the_finetune, code=3),
    Case("links and files", "a shipped file linking out of the delta", _shipped(_link_to_secret), code=3),
    Case("links and files", "a shipped file that is a FIFO", _shipped(_fifo), code=3),
    Case(
        "links and files",
        "a shipped file one byte longer than declared",
        _shipped(lambda p, _: p.write_bytes(p.read_bytes() + b" ")),
        code=3,
    ),
    Case("sizes", "a manifest over 64 MiB", damaged_frames(_sparse_manifest), code=3),
    Case(
        "sizes",
        "a manifest of 8 million empty lists (48 MB)",
        edited_manifest(lambda m: m.update(padding=[[] for _ in range(MAX_MANIFEST_VALUES)])),
        code=3,
    ),
    Case("sizes", "a damaged decode state in OUT", _damaged_state, code=5),
    Case("sizes", "a 1.5 KB `.bin` whose stride-0 view claims 40000 x 40000", _stride0_bin, code=3),
    Case("sizes", "Meta `params.json` with `n_layers: 100000000`", _meta_layers, code=3),
    Case("sizes", "a 100 KB gzip payload expanding to 100 MB (decode-legacy)", _gzip_bomb, code=3),
    Case("sizes", "a header edited to the same length", edited_manifest(_edit_header_same_length), code=3),
    Case("output", "OUT inside the delta", _out_inside_delta, code=5),
    Case("output", "a link planted in OUT", _link_in_out, code=5),
    Case("output", "encode into a folder of other files", _foreign_folder, code=5),
    Case("output", "checksum -o inside the checkpoint", _checksum_into_input, code=5),
]


def normalize(line: str, root: Path) -> str:
    line = line.removeprefix("xorweights: error: ").replace(str(root), "…")
    line = re.sub(r"\b[0-9a-f]{64}\b", "<sha256>", line)
    line = re.sub(r"\b[0-9a-f]{32}\b", "<xxh3>", line)
    return line.replace("|", "\\|")


def run_case(case: Case, root: Path) -> tuple[str, str]:
    """Run one bad input; return the command and its normalised error line."""
    args = case.build(root)
    r = run(*args)
    assert r.exit_code == case.code, (case.what, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, (case.what, r.stderr)
    assert lines[0].startswith("xorweights: error: ") and "(hint: " in lines[0], (case.what, lines[0])
    # Nothing that looks complete was written: no rebuilt weight file, no delta manifest from encode.
    assert not any(root.glob("out/*.safetensors")), case.what
    if args[0] == "encode":
        assert not (root / "delta" / "xorweights-delta.json").exists(), case.what
    return str(args[0]), normalize(lines[0], root)


# ---------------------------------------------------------------- faults


def kill_9(root: Path, kills: int) -> dict[str, int]:
    """Kill a decode at random points, check OUT each time, then finish it."""
    pair = make_pair(root / "pair", LlamaSpec(vocab=2048, hidden=128, intermediate=344, layers=4, heads=4), shards=3)
    delta = root / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta, frame_bytes=4096)
    want, out = files_digest(pair.finetuned), root / "out"
    cmd = [sys.executable, "-m", "xorweights", "decode", str(delta), "--base", str(pair.base), "-o", str(out), "-q"]
    rng, wrong = random.Random(1234), 0
    for _ in range(kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        seen = files_digest(out) if out.exists() else {}
        wrong += sum(1 for name, digest in seen.items() if digest != want[name])
    finished = subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    lost = sum((pair.finetuned / n).stat().st_size for n, d in want.items() if files_digest(out).get(n) != d)
    return {"runs": kills, "recovered": kills if finished and not lost else 0, "lost": lost + wrong}


def disk_full(root: Path, budgets: list[int], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Fail writes with ENOSPC after ``budget`` bytes; the error must say so; a re-run must finish."""
    pair = make_pair(root / "pair", LlamaSpec(vocab=2048, hidden=128, intermediate=344, layers=4, heads=4), shards=3)
    delta = root / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta, frame_bytes=4096)
    want = files_digest(pair.finetuned)
    real_pwrite, recovered, lost = os.pwrite, 0, 0
    for k, budget in enumerate(budgets):
        out, left = root / f"out{k}", [budget]

        def pwrite(fd: int, data: Any, offset: int, left: list[int] = left) -> int:
            left[0] -= len(data)
            if left[0] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
        with pytest.raises(OutputError, match="the disk filled up; this decode needs about"):
            xorweights.decode(delta, pair.base, out)
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        lost += sum(1 for n, d in files_digest(out).items() if d != want[n])  # a wrong file under a final name
        xorweights.decode(delta, pair.base, out)
        recovered += files_digest(out) == want
    return {"runs": len(budgets), "recovered": recovered, "lost": lost}


def lock_contention(root: Path) -> dict[str, int]:
    pair = make_pair(root / "pair")
    delta, out = root / "delta", root / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    code = (
        "import sys, time; from pathlib import Path; from xorweights.locks import FolderLock\n"
        "with FolderLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert r.exit_code == 5, r.output
    assert f"{out}: another xorweights (pid {holder.pid} on " in r.stderr
    assert "wait for it to finish, or use another output folder" in r.stderr
    refused = not (out / "model-00001-of-00002.safetensors").exists()
    holder.kill()
    holder.wait()
    finished = run("decode", delta, "--base", pair.base, "-o", out).exit_code == 0
    ok = refused and finished and files_digest(out) == files_digest(pair.finetuned)
    return {"runs": 1, "recovered": int(ok), "lost": 0 if ok else 1}


# ---------------------------------------------------------------- the document


HEADER = """# Reliability

Generated by `tests/test_reliability_doc.py` from real runs of the CLI; do not
edit by hand. The test fails when this file and the code disagree. Rerun the
whole suite with `bash scripts/setup.sh && .venv/bin/python -m pytest -q`, or
regenerate this file with
`XORWEIGHTS_WRITE_DOCS=1 .venv/bin/python -m pytest -q tests/test_reliability_doc.py`.

## What decode checks, and what it does not

- Before any work: the manifest (size, JSON density, every field and file
  name); every base tensor's presence, dtype and shape; every data file and
  shipped file of the delta is a regular file inside it, of exactly the size
  the manifest declares (`tests/test_trust_boundary.py`).
- While rebuilding: each base tensor's xxh3-128 before its bytes are used
  for good, and each rebuilt tensor's xxh3-128; then the whole rebuilt
  file's sha256 against the manifest's, before the file gets its final name
  (the sha256 runs on a thread of its own). A non-tensor file is checked by
  size, then sha256, before its final name.
- With `--dtype`, a weight file is new: its tensors are checked as above
  before conversion, and the converted file's sha256 is recorded in
  `xorweights-checksums.json` for `verify`, not compared with anything.
- Not checked: who made the delta. Nothing is signed, so a delta crafted by
  someone else decodes to whatever they encoded, checks and all. A file an
  earlier run finished is trusted by its size and mtime on resume, not hashed
  again: `xorweights verify OUT --delta DELTA` hashes everything.

## Inputs: links, file types, sizes

Every file below an input folder (a checkpoint, a delta, a legacy payload)
is read through one gate (`xorweights/inputs.py`): a symbolic link is
followed only when it resolves inside the folder itself or, for a snapshot of
the Hugging Face cache, inside that repo's `blobs/`; anything else is refused
before a byte of it is read, naming the link and where it leads. Only regular
files are opened (`O_NOFOLLOW | O_NONBLOCK`, then `fstat`: a FIFO never
blocks, a device or `/proc` file is never read), and on Linux
`/proc/self/fd` confirms what was opened. Sizes come from `fstat` and are
compared with what the manifest declares before anything is copied; a file
that turns out longer or shorter while read is refused. Files read whole are
capped first: a manifest, an index or a checksum manifest at 64 MiB (and a
manifest of more than 8 million JSON values is refused before parsing),
the decode state at twice the manifest, `params.json` at 1 MiB, md5 lists at
1 MiB, safetensors headers at 100 MB. A folder or file the user names is
trusted as named: links in its own path are the user's business.

## The output folder, at the system-call level

Another process may plant links or files in OUT while a command runs, so OUT
is opened once and everything happens relative to that descriptor
(`xorweights/outdir.py`): subfolders are made and opened one component at a
time with `openat(O_DIRECTORY | O_NOFOLLOW)`; files are written under a
partial name in our own `OUT/.xorweights/` (`openat(O_CREAT | O_EXCL |
O_NOFOLLOW)`), fsynced, and given their final name with `linkat`, which fails
with `EEXIST` if anything appeared at that name meanwhile (then the file is
refused and the newcomer left alone; where hard links are not supported,
`renameat2(RENAME_NOREPLACE)` does the same), then the partial name is
unlinked and the folder fsynced. Files already in OUT are looked at with
`fstatat(AT_SYMLINK_NOFOLLOW)` and opened with `O_NOFOLLOW`. Leftover partial
files are removed by exact name (one per output name), only inside
`OUT/.xorweights/`: a file of the user's that looks like a partial, or a
decode running into `OUT/inner`, is never touched. The lock and the state are
opened the same way and refused if they have other names (hard links). Every
command first refuses an output that is an input, lies inside one or holds
one, comparing device and inode up the folder chain (`xorweights/overlap.py`),
and checks again once OUT exists.

## Bad input

Every bad input below exits with the code of its class of failure (the
`exit` column; the codes are listed in [decoding.md](decoding.md#exit-codes)),
prints one line naming the file or tensor, what was expected and what was
found, with a hint, and writes nothing that looks complete: no rebuilt weight
file, no delta manifest. `…` stands for the test's temporary folder, `<xxh3>`
and `<sha256>` for checksums.

More cases are tested than listed here: `tests/test_errors.py`,
`tests/test_hostile.py` (each safetensors damage also as decode's base, links
in the state folder and in subfolders, control characters in names, inputs
hashed before and after every command), `tests/test_trust_boundary.py` (links
planted in OUT by another process during a decode, links in and out of inputs
and Hugging Face cache snapshots, FIFOs, lying sizes, caps, the decode state,
an output overlapping an input for every command), `tests/test_size_bombs.py`
(storage smaller than its shape in `.bin` files, Meta `params.json` sizes,
gzip bombs), `tests/test_terminal.py` (control characters in every name that
reaches a terminal, Ctrl-C), `tests/test_properties.py` (hypothesis: every
parser rejection is a typed error; bit-exact round trips for random shapes and
dtypes) and `tests/fuzz_parsers.py` (a fuzz entry point for the header,
manifest, decode state and `params.json` parsers, run for a few seconds in the
suite; with atheris: `python tests/fuzz_parsers.py -max_total_time=600`).
"""

FOOTER = """
## Known gaps

- A zstd frame followed by extra bytes inside its stored range still decodes:
  zstd stops at the end of the frame. The output is checked by its xxh3-128
  and sha256, so nothing wrong is written; `tests/test_hostile.py` keeps this
  as an expected failure.
- A hostile manifest within the caps still costs memory while parsed: up to
  about 0.6 GB for 8 million tiny JSON values.
- A hard link is a regular file: a hard link inside an input folder to a file
  elsewhere on the same file system is read like any other file (making one
  needs write access to that folder, and Linux's `protected_hardlinks` limits
  it to files the maker owns).
- Outside Linux, what was opened cannot be confirmed through `/proc/self/fd`,
  so a link swapped into an input folder between the check and the open is
  not caught there.
- As root, a read-only folder is still writable, so "missing permissions" is
  tested only as a read-only mount (`tests/test_faults.py`).
"""


def render(rows: list[tuple[Case, str, str]], faults: list[tuple[str, dict[str, int]]]) -> str:
    out = [HEADER]
    section = None
    for case, command, message in rows:
        if case.section != section:
            section = case.section
            out.append(f"\n### {section.capitalize()}\n\n| input | command | exit | error |\n|---|---|---:|---|")
        out.append(f"| {case.what} | {command} | {case.code} | {message} |")
    out.append("\n## Faults\n\n| fault | runs | recovered | lost |\n|---|---:|---:|---:|")
    for what, stats in faults:
        out.append(f"| {what} | {stats['runs']} | {stats['recovered']} | {stats['lost']} |")
    out.append(
        "\n`recovered`: runs after which the same command finished with output identical to the\n"
        "fine-tune. `lost`: files under a final name that were wrong (checked after every injected\n"
        "fault) plus bytes missing at the end; the goal is zero."
    )
    return "\n".join(out) + "\n" + FOOTER


def test_reliability_doc_is_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XORWEIGHTS_DEBUG", raising=False)
    rows = [(case, *run_case(case, tmp_path / f"case{k}")) for k, case in enumerate(CASES)]
    faults = [
        ("kill -9 of a decode at a random point, then the same command again", kill_9(tmp_path / "kill", 6)),
        (
            "disk full (ENOSPC) after 0.5, 1.5 and 2.5 MB of output, then the same command again",
            disk_full(tmp_path / "full", [500_000, 1_500_000, 2_500_000], monkeypatch),
        ),
        ("a second decode into the same OUT, then the first one dies (stale lock)", lock_contention(tmp_path / "lock")),
    ]
    for what, stats in faults:
        assert stats["recovered"] == stats["runs"] and stats["lost"] == 0, (what, stats)
    text = render(rows, faults)
    if os.environ.get("XORWEIGHTS_WRITE_DOCS") == "1":
        DOC.write_text(text)
    assert DOC.read_text() == text, (
        "docs/reliability.md is out of date: regenerate it with "
        "XORWEIGHTS_WRITE_DOCS=1 .venv/bin/python -m pytest tests/test_reliability_doc.py"
    )


def test_cases_are_unique() -> None:
    assert len({c.what for c in CASES}) == len(CASES)
