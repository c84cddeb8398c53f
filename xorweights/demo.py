"""``xorweights demo``: the whole job on a tiny built-in example, explained as it goes."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .checksums import verify
from .decode import decode
from .delta.kernel import sha256_file
from .delta.summary import summarize
from .encode import encode
from .errors import OutputError, UnprotectedError, VerifyFailed
from .fixtures import LlamaSpec, make_base, make_pair, side_files, write_checkpoint

# Everything the demo creates in its folder, by name; the marker says a folder is the demo's own.
MARKER = ".xorweights-demo"
CREATED = ("base", "finetuned", "delta", "rebuilt", "base-without-prefix", "refused-delta")


def run_demo(keep: Path | None, say: Callable[[str], None]) -> None:
    """Run the demo in a temporary folder, or in ``keep``, which a second run rebuilds cleanly."""
    if keep is not None:
        _clean(Path(keep))
        _run(Path(keep), say)
        return
    with tempfile.TemporaryDirectory(prefix="xorweights-demo-") as tmp:
        _run(Path(tmp), say)


def _clean(root: Path) -> None:
    """Remove what an earlier demo created in ``root``, by name; refuse a name the demo did not make there."""
    found = [name for name in CREATED if os.path.lexists(root / name)]
    if not found:
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER).touch()
        return
    if not (root / MARKER).is_file():
        raise OutputError(
            f"{root}: already holds {', '.join(found)}, not made by `xorweights demo`",
            "pass --keep a new folder, or the folder of an earlier demo",
        )
    for name in found:
        path = root / name
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)  # fd-based on Linux: a link inside is removed, never followed
        else:
            path.unlink()


def _run(root: Path, say: Callable[[str], None]) -> None:
    spec = LlamaSpec()
    pair = make_pair(root, spec, ft_dtypes={"model.layers.0.self_attn.q_proj.weight": "BF16"})
    say(f"1. made a tiny LLaMA-shaped base (F16, {spec.layers} layers, vocab {spec.vocab}) in {pair.base}")
    say("   and a fine-tune of it with 4 added tokens, a BF16 tensor over the F16 base and a value head")
    delta = root / "delta"
    result = encode(pair.finetuned, pair.base, delta, base_description="the demo base")
    s = summarize(result.manifest, result.delta_bytes)
    say(f"2. encode: {s.tensors_xored} of {s.tensors} tensors XORed; {s.unprotected_bytes} bytes unprotected:")
    for line in s.unprotected:
        say(f"     {line}")
    say(f"   files taken from the base: {', '.join(s.files_referenced)}; shipped: {', '.join(s.files_shipped)}")
    out = root / "rebuilt"
    decode(delta, pair.base, out)
    say(f"3. decode: rebuilt {out}, checking every base tensor before use and every rebuilt tensor after")
    same = [
        p.name
        for p in sorted(pair.finetuned.iterdir())
        if p.is_file() and (out / p.name).is_file() and sha256_file(p) == sha256_file(out / p.name)
    ]
    total = sum(1 for p in pair.finetuned.iterdir() if p.is_file())
    report = verify(out, delta=delta)
    if len(same) != total or not report.ok:
        raise VerifyFailed(f"demo: only {len(same)} of {total} files rebuilt byte for byte: {report.problems}")
    say(f"4. verify: {report.checked_tensors} tensors and {report.checked_files} files match the delta's checksums")
    _show_refusal(root, pair.finetuned, say)
    say(f"proved: all {total} files of the fine-tune were rebuilt byte for byte (same sha256) from base + delta,")
    say(f"        and the only tensor bytes the delta holds in the clear are the {s.unprotected_bytes} listed above.")


def _show_refusal(root: Path, finetuned: Path, say: Callable[[str], None]) -> None:
    """Release safety: a base whose names lack "model." would publish the weights in the clear."""
    stripped = root / "base-without-prefix"
    base = make_base(LlamaSpec())
    write_checkpoint(stripped, {n.removeprefix("model."): t for n, t in base.items()}, files=side_files(LlamaSpec()))
    try:
        encode(finetuned, stripped, root / "refused-delta")
    except UnprotectedError as exc:
        say("5. release safety: encoding against a base whose tensor names lack 'model.' is refused, nothing written:")
        say(f"     {exc.message}")
        say(f"     fix: {exc.hint}")
        return
    raise VerifyFailed("demo: encode should have refused a base with mismatched names")
