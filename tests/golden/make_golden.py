"""Regenerate the golden fixtures. Run only when the format version is bumped:

    .venv/bin/python tests/golden/make_golden.py

It writes tests/golden/v<N>/ (a tiny delta, committed forever so every later
release is tested against it) and checksums/fixtures/golden-*.json (checksum
manifests of the deterministic base and fine-tune it was made from).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import xorweights
from xorweights.delta.manifest import DELTA_VERSION, load_checksums
from xorweights.fixtures import LlamaSpec, make_pair

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_SPEC = LlamaSpec(vocab=32, hidden=16, intermediate=40, layers=1, heads=2)
GOLDEN_BF16 = {"model.layers.0.self_attn.q_proj.weight": "BF16"}


def golden_pair(root: Path):
    return make_pair(root, GOLDEN_SPEC, ft_dtypes=GOLDEN_BF16, seed=7)


def main() -> None:
    target = ROOT / "tests" / "golden" / f"v{DELTA_VERSION}"
    if target.exists():
        sys.exit(f"{target} exists: golden deltas are never regenerated in place")
    with tempfile.TemporaryDirectory() as tmp:
        pair = golden_pair(Path(tmp))
        sums = ROOT / "checksums" / "fixtures"
        for folder, name in ((pair.base, "golden-base.json"), (pair.finetuned, "golden-finetuned.json")):
            if (sums / name).exists() and xorweights.checksum(folder).tensors != load_checksums(sums / name).tensors:
                sys.exit(f"the fixtures no longer match {sums / name}: fix the generator, do not regenerate")
        # allow_unprotected: the added rows and value head are 8% of so tiny a model.
        xorweights.encode(
            pair.finetuned,
            pair.base,
            target,
            frame_bytes=256,
            base_description="golden base, seed 7",
            allow_unprotected=True,
        )
        xorweights.checksum(pair.base, sums / "golden-base.json")
        xorweights.checksum(pair.finetuned, sums / "golden-finetuned.json")
    shutil.rmtree(target / ".xorweights", ignore_errors=True)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
