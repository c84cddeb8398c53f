"""The install: what works without the [torch] extra, every safetensors dtype, and an import that works everywhere.

"Without torch" is simulated in a subprocess that sets ``sys.modules["torch"]``
(and ``"safetensors"``, which only the tests use) to None before xorweights
is imported: any import of them then fails as if they were not installed.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from safetensors.torch import save_file

import xorweights
from tests.conftest import run
from xorweights.errors import CheckpointError, UsageError
from xorweights.fixtures import Pair, make_pair
from xorweights.readers.dtypes import ITEMSIZE, SUBBYTE_BITS, TORCH_NAMES
from xorweights.torch_import import INSTALL_HINT

BLOCKED = "import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"
CLI = "from xorweights.entry import main\nsys.argv[0] = 'xorweights'\nmain()\n"


def without(modules: tuple[str, ...], code: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where ``modules`` cannot be imported."""
    script = BLOCKED.format(modules=modules) + code
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def cli_without_torch(*args: object) -> subprocess.CompletedProcess[str]:
    """The ``xorweights`` command with neither torch nor safetensors importable."""
    return without(("torch", "safetensors"), CLI, *args)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------ without torch


def test_safetensors_commands_work_without_torch(tmp_path: Path) -> None:
    pair = make_pair(tmp_path / "pair")
    delta, out = tmp_path / "delta", tmp_path / "out"
    steps = [
        ("encode", pair.finetuned, "--base", pair.base, "-o", delta, "--base-description", "demo base", "--quiet"),
        ("inspect", delta),
        ("decode", delta, "--base", pair.base, "-o", out, "--quiet"),
        ("verify", out, "--delta", delta, "--quiet"),
        ("checksum", out, "-o", tmp_path / "out.sums.json", "--quiet"),
        ("verify", out, "--manifest", tmp_path / "out.sums.json", "--quiet"),
        ("demo",),
    ]
    for step in steps:
        done = cli_without_torch(*step)
        assert done.returncode == 0, f"{step[0]}: {done.stderr}"
    rebuilt = sorted(p.name for p in pair.finetuned.glob("*.safetensors"))
    assert rebuilt and all(sha256(out / name) == sha256(pair.finetuned / name) for name in rebuilt)


def _bin_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save({"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("command", ["checksum", "encode"])
def test_bin_checkpoint_without_torch_is_one_line_naming_the_extra(tmp_path: Path, command: str) -> None:
    model = _bin_checkpoint(tmp_path / "model")
    args = {
        "checksum": ("checksum", model, "-o", tmp_path / "sums.json"),
        "encode": ("encode", model, "--base", model, "-o", tmp_path / "delta", "--base-description", "itself"),
    }[command]
    done = cli_without_torch(*args)
    assert done.returncode == UsageError.exit_code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pytorch_model.bin" in lines[0] and "needs torch, which is not installed" in lines[0]
    assert f"hint: {INSTALL_HINT}" in lines[0] and "pip install 'xorweights[torch]'" in lines[0]


def test_load_state_dict_without_torch_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import xorweights\n"
        "try:\n"
        "    xorweights.load_state_dict(sys.argv[1], sys.argv[2])\n"
        "except xorweights.XorWeightsError as exc:\n"
        "    print(type(exc).__name__, exc.exit_code, exc)\n"
    )
    done = without(("torch",), code, tmp_path / "no-delta", tmp_path / "no-base")
    assert done.returncode == 0, done.stderr
    # Refused before the delta is even looked for: nothing is downloaded or planned first.
    assert done.stdout.startswith(
        f"UsageError {UsageError.exit_code} load_state_dict needs torch, which is not installed"
    )
    assert INSTALL_HINT in done.stdout


def test_importing_xorweights_loads_no_torch() -> None:
    code = "import xorweights, xorweights.cli, xorweights.readers.checkpoint, xorweights.load\nprint(sorted(sys.modules))\n"
    done = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True, check=True)
    loaded = eval(done.stdout)  # a list of module names
    assert "torch" not in loaded and "safetensors" not in loaded


def test_locks_import_without_fcntl() -> None:
    """fcntl exists only on POSIX: importing the package must not need it."""
    done = without(("fcntl",), "import xorweights, xorweights.locks, xorweights.cli, xorweights.decode\nprint('ok')\n")
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


# ------------------------------------------------------------ dtypes


def safetensors_dtypes() -> list[str]:
    """Every dtype the installed safetensors knows, as listed by its own header parser."""
    header = json.dumps({"t": {"dtype": "NOT_A_DTYPE", "shape": [1], "data_offsets": [0, 1]}}).encode()
    with pytest.raises(safetensors.SafetensorError) as caught:
        safetensors.deserialize(struct.pack("<Q", len(header)) + header + b"\0")
    listed = re.search(r"expected one of (.*?)(?: at line|$)", str(caught.value))
    assert listed, f"safetensors no longer lists its dtypes this way: {caught.value}"
    return re.findall(r"`(\w+)`", listed.group(1))


def test_dtype_table_covers_every_safetensors_dtype() -> None:
    known = safetensors_dtypes()
    assert "BF16" in known and "F8_E8M0" in known
    assert set(known) == set(ITEMSIZE) | set(SUBBYTE_BITS)
    assert not set(ITEMSIZE) & set(SUBBYTE_BITS)
    assert set(TORCH_NAMES) == set(ITEMSIZE)


def _random_tensor(dtype: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes seen as ``dtype``: XOR works on bytes, whatever they mean."""
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * ITEMSIZE[dtype], dtype=np.uint8)
    if dtype == "BOOL":
        raw &= 1  # a bool byte is 0 or 1
    return torch.from_numpy(raw).view(getattr(torch, TORCH_NAMES[dtype])).reshape(shape)


def _checkpoint(folder: Path, dtype: str, seed: int) -> Path:
    folder.mkdir(parents=True)
    tensors = {"a.weight": _random_tensor(dtype, (6, 5), seed), "b.weight": _random_tensor(dtype, (7,), seed + 1)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("dtype", sorted(ITEMSIZE))
def test_every_whole_byte_dtype_round_trips(tmp_path: Path, dtype: str) -> None:
    """A file the safetensors library wrote, encoded and decoded: bit-exact, for every dtype of whole bytes."""
    pair = Pair(_checkpoint(tmp_path / "base", dtype, 1), _checkpoint(tmp_path / "ft", dtype, 2))
    header = json.loads((pair.finetuned / "model.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert header["a.weight"]["dtype"] == dtype  # written by safetensors itself under this name
    xorweights.encode(pair.finetuned, pair.base, tmp_path / "delta", base_description="random bytes")
    xorweights.decode(tmp_path / "delta", pair.base, tmp_path / "out")
    assert sha256(tmp_path / "out" / "model.safetensors") == sha256(pair.finetuned / "model.safetensors")
    assert xorweights.verify(tmp_path / "out", delta=tmp_path / "delta").ok
    loaded = xorweights.load_state_dict(tmp_path / "delta", pair.base)
    with safetensors.safe_open(pair.finetuned / "model.safetensors", framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            want = f.get_tensor(name)
            assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape
            assert loaded[name].view(torch.uint8).equal(want.view(torch.uint8))


def _subbyte_file(folder: Path, dtype: str) -> Path:
    """A one-tensor file of a packed dtype, as safetensors writes it (by hand where torch has no such dtype)."""
    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    if dtype == "F4":
        packed = torch.from_numpy(np.arange(8, dtype=np.uint8)).view(torch.float4_e2m1fn_x2).reshape(2, 4)
        save_file({"w": packed}, str(path))
    else:
        # No framework holds F6, so the library cannot be handed one: write the header it would.
        header = json.dumps({"w": {"dtype": dtype, "shape": [2, 8], "data_offsets": [0, 12]}}).encode()
        header += b" " * (-len(header) % 8)
        path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(12)))
    [(name, view)] = safetensors.deserialize(path.read_bytes())  # the official reader takes the file
    assert (name, view["dtype"]) == ("w", dtype)
    return folder


@pytest.mark.parametrize("dtype", sorted(SUBBYTE_BITS))
def test_packed_dtypes_are_refused_as_unsupported_not_damaged(tmp_path: Path, dtype: str) -> None:
    model = _subbyte_file(tmp_path / "model", dtype)
    result = run("checksum", model, "-o", tmp_path / "sums.json")
    assert result.exit_code == CheckpointError.exit_code
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert f"tensor 'w': dtype {dtype} is unsupported: its {SUBBYTE_BITS[dtype]}-bit elements" in line
    assert "not a valid safetensors" not in line and "damaged" not in line and "re-download" not in line
