"""One line, and nothing more, on every terminal.

Names, paths and descriptions from inputs reach the terminal and the model card
with their control characters escaped, so a tensor named "...\\nrebuilt OK"
cannot fake a line or move the cursor; other libraries' warnings are silenced;
and Ctrl-C at any moment, imports included, is one error line and exit 130.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from conftest import files_digest, run
from test_errors import edit_manifest, entry

import xorweights
import xorweights.cli
import xorweights.interrupts as entry_module
from xorweights.delta.manifest import load_manifest
from xorweights.delta.summary import summarize
from xorweights.errors import XorWeightsWarning
from xorweights.fixtures import LlamaSpec, Pair, make_pair
from xorweights.hub.publish import model_card
from xorweights.interrupts import INTERRUPTED, INTERRUPTED_EXIT
from xorweights.printable import printable

PACKAGE = Path(xorweights.__file__).parent
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
# A new line, a return to column 0, "erase the line", "set the window title", a right-to-left override.
HOSTILE = "\n\r\x1b[2K\x1b]0;title\x07\u202e"
ESCAPED = r"\x0a\x0d\x1b[2K\x1b]0;title\x07\u202e"
# Stands where HOSTILE goes, for the same command's output without it; as long
# as HOSTILE in JSON, so that the edited manifests have the same size.
PLAIN = "P" * len(json.dumps(HOSTILE)[1:-1])
INTERRUPTED_LINE = f"xorweights: error: {INTERRUPTED}\n"


# ---------------------------------------------------------------- helpers


def steers(char: str) -> bool:
    """Whether a terminal or a line splitter would act on ``char`` rather than show it."""
    category = unicodedata.category(char)
    return category.startswith("C") or category in ("Zl", "Zp")


def lines_of(text: str) -> list[str]:
    """The lines of ``text``, after checking every character: only the line ends may be controls."""
    for i, char in enumerate(text):
        assert char == "\n" or not steers(char), f"raw {char!r} at {i} of {text!r}"
    assert text == "" or text.endswith("\n"), repr(text)
    return text.split("\n")[:-1]


def assert_twins(hostile: Result, plain: Result) -> tuple[list[str], list[str]]:
    """The run with HOSTILE in a name printed what the run with PLAIN there printed, line for line, escaped.

    Returns the hostile run's stdout and stderr lines.
    """
    assert "Traceback" not in hostile.output, hostile.output
    assert hostile.exit_code == plain.exit_code, (hostile.output, plain.output)
    out, err = lines_of(hostile.stdout), lines_of(hostile.stderr)
    assert out == lines_of(plain.stdout.replace(PLAIN, ESCAPED))
    assert err == lines_of(plain.stderr.replace(PLAIN, ESCAPED))
    return out, err


def name_base_tensor(delta: Path, name: str) -> None:
    """Make the delta need a base tensor called ``name`` where it needed q_proj: a base without it."""

    def edit(m: dict[str, Any]) -> None:
        entry(m, Q_PROJ)["base"]["name"] = name

    edit_manifest(delta, edit)


def describe_base(delta: Path, description: str) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["base"]["description"] = description

    edit_manifest(delta, edit)


# ---------------------------------------------------------------- the escaping itself


def test_printable_escapes_what_would_steer_a_terminal_and_nothing_else():
    assert printable(HOSTILE) == ESCAPED
    assert printable("\x00\x7f\x85\x9b") == r"\x00\x7f\x85\x9b"  # NUL, DEL, NEL and CSI (C1 controls)
    assert printable("a\u200bb\ufeff") == r"a\u200bb\ufeff"  # zero-width space, BOM (format characters)
    assert printable("\u2028\u2029") == r"\u2028\u2029"  # line and paragraph separators
    assert printable("model\udcff.bin") == r"model\udcff.bin"  # a file name that is not UTF-8
    assert printable("\ue000\U000e0001") == r"\ue000\U000e0001"  # private use, a tag character
    for text in ("model.embed_tokens.weight", "base: Llama-2 7B, fp16 (meta)", "é ü 中文 Ω", "a\\x0a", ""):
        assert printable(text) == text
    assert printable(Path("/tmp/x\ny")) == r"/tmp/x\x0ay"


# ---------------------------------------------------------------- through the CLI


def test_an_error_naming_a_hostile_tensor_is_one_escaped_line(pair, delta, tmp_path):
    name_base_tensor(delta, f"{Q_PROJ}{PLAIN}rebuilt OK")
    plain = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    name_base_tensor(delta, f"{Q_PROJ}{HOSTILE}rebuilt OK")
    hostile = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    out, err = assert_twins(hostile, plain)
    assert hostile.exit_code == 1
    assert out == []
    assert len(err) == 1
    assert err[0].startswith(f"xorweights: error: base tensor {Q_PROJ}{ESCAPED}rebuilt OK: ")


def test_check_base_lines_name_a_hostile_tensor_escaped(pair, delta):
    name_base_tensor(delta, f"{Q_PROJ}{PLAIN}")
    plain = run("decode", delta, "--base", pair.base, "--check-base", "-q")
    name_base_tensor(delta, f"{Q_PROJ}{HOSTILE}")
    out, err = assert_twins(run("decode", delta, "--base", pair.base, "--check-base", "-q"), plain)
    assert len(out) == 1 and f"{Q_PROJ}{ESCAPED}" in out[0]
    assert len(err) == 1 and err[0].startswith("xorweights: error: ")


def test_verify_problem_lines_name_a_hostile_tensor_escaped(pair, delta, tmp_path):
    # Against a checksum manifest whose tensor name was edited: the real tensor is
    # then unexpected and the edited one missing.
    sums = tmp_path / "sums.json"
    assert run("checksum", pair.finetuned, "-o", sums, "-q").exit_code == 0
    original = json.loads(sums.read_text())

    def rename(name: str) -> Result:
        s = json.loads(json.dumps(original))
        s["tensors"][f"{Q_PROJ}{name}"] = s["tensors"].pop(Q_PROJ)
        sums.write_text(json.dumps(s))
        return run("verify", pair.finetuned, "--manifest", sums, "-q")

    plain = rename(PLAIN)
    out, err = assert_twins(rename(HOSTILE), plain)
    assert plain.exit_code == 1
    assert any(f"{Q_PROJ}{ESCAPED}" in line for line in out), out
    assert len(err) == 1 and err[0].startswith("xorweights: error: ")
    # And against a delta, the base side.
    name_base_tensor(delta, f"{Q_PROJ}{PLAIN}")
    plain = run("verify", pair.base, "--delta", delta, "--side", "base", "-q")
    name_base_tensor(delta, f"{Q_PROJ}{HOSTILE}")
    out, err = assert_twins(run("verify", pair.base, "--delta", delta, "--side", "base", "-q"), plain)
    assert out == [f"tensor {Q_PROJ}{ESCAPED}: missing"]
    assert len(err) == 1


def test_inspect_prints_a_hostile_description_on_its_one_line(delta):
    describe_base(delta, f"the base{PLAIN}xorweights: error: fake")
    plain = run("inspect", delta)
    describe_base(delta, f"the base{HOSTILE}xorweights: error: fake")
    out, err = assert_twins(run("inspect", delta), plain)
    assert err == []
    assert f"base: the base{ESCAPED}xorweights: error: fake" in out
    assert not any(line.startswith("xorweights: error") for line in out)


def test_json_output_escapes_control_characters_itself(pair, delta):
    description = f"the base{HOSTILE}"
    describe_base(delta, description)
    r = run("inspect", delta, "--json")
    assert r.exit_code == 0
    lines_of(r.stdout)
    assert json.loads(r.stdout)["base"]["description"] == description
    assert "\\u001b[2K" in r.stdout and "\\u202e" in r.stdout  # json.dumps's own escapes

    name_base_tensor(delta, f"{Q_PROJ}{HOSTILE}")
    r = run("verify", pair.base, "--delta", delta, "--side", "base", "--json")
    assert r.exit_code == 1 and r.stderr == ""
    lines_of(r.stdout)
    assert any(f"{Q_PROJ}{HOSTILE}" in p for p in json.loads(r.stdout)["problems"])


def test_hostile_folder_names_are_escaped_in_summaries(pair, delta, tmp_path):
    out = tmp_path / f"out{HOSTILE}"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert r.exit_code == 0, r.output
    lines = lines_of(r.stdout)
    assert len(lines) == 1 and lines[0].startswith(f"rebuilt {tmp_path}/out{ESCAPED}: ")
    assert lines_of(r.stderr) == []
    assert files_digest(out) == files_digest(pair.finetuned)

    base = tmp_path / f"base{HOSTILE}"
    shutil.copytree(pair.base, base)
    r = run("decode", delta, "--base", base, "--check-base", "-q")
    assert r.exit_code == 0, r.output
    assert lines_of(r.stdout) == [
        f"{tmp_path}/base{ESCAPED} is the base this delta needs: every tensor and referenced file matches"
    ]


def _warning_inspect(monkeypatch: pytest.MonkeyPatch) -> None:
    """inspect, warning like the library (XorWeightsWarning) and like torch or numpy (the rest)."""
    real = xorweights.cli.inspect_api

    def noisy(delta: Path, **kwargs: Any) -> Any:
        warnings.warn(f"base org/base{HOSTILE}: made from another revision", XorWeightsWarning, stacklevel=2)
        warnings.warn("TypedStorage is deprecated.\n  It will be removed", UserWarning, stacklevel=2)
        warnings.warn("old API", DeprecationWarning, stacklevel=2)
        warnings.warn("overflow in cast", RuntimeWarning, stacklevel=2)
        return real(delta, **kwargs)

    monkeypatch.setattr(xorweights.cli, "inspect_api", noisy)


def test_our_warning_is_one_escaped_line_and_other_libraries_warnings_are_silenced(delta, monkeypatch):
    quiet = run("inspect", delta)
    _warning_inspect(monkeypatch)
    r = run("inspect", delta)
    assert r.exit_code == 0
    assert lines_of(r.stderr) == [f"xorweights: warning: base org/base{ESCAPED}: made from another revision"]
    assert lines_of(r.stdout) == lines_of(quiet.stdout)
    assert "TypedStorage" not in r.output and "old API" not in r.output and "overflow" not in r.output


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")
def test_other_libraries_warnings_show_with_xorweights_debug(delta, monkeypatch):
    _warning_inspect(monkeypatch)
    monkeypatch.setenv("XORWEIGHTS_DEBUG", "1")
    # Shown as Python shows them: handed on to warnings.showwarning, which pytest records here.
    with pytest.warns(UserWarning, match="TypedStorage is deprecated"):
        r = run("inspect", delta)
    assert r.exit_code == 0
    assert f"xorweights: warning: base org/base{ESCAPED}: made from another revision\n" in r.stderr


WRITERS = {"print", "echo", "secho", "click.echo", "click.secho", "sys.stdout.write", "sys.stderr.write"}


class _Writes(ast.NodeVisitor):
    """Every call that writes to the terminal, with the function it is in."""

    def __init__(self) -> None:
        self.where = ["<module>"]
        self.found: list[tuple[str, str]] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.where.append(node.name)
        self.generic_visit(node)
        self.where.pop()

    def visit_Call(self, node: ast.Call) -> None:
        if ast.unparse(node.func) in WRITERS:
            self.found.append((self.where[-1], ast.unparse(node.func)))
        self.generic_visit(node)


def test_every_line_the_cli_prints_goes_through_one_function():
    """A new echo or print in cli.py would bypass the escaping: only ``_say`` may write."""
    source = (PACKAGE / "cli.py").read_text()
    writes = _Writes()
    writes.visit(ast.parse(source))
    assert writes.found == [("_say", "click.echo")]
    assert "run_demo(keep, _say)" in source  # the demo reports through it too


def test_progress_bar_labels_are_fixed_strings():
    """tqdm prints its ``desc`` as is: no name from an input may get there."""
    calls = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in {"byte_bar", "tqdm"}:
                descs = [k.value for k in node.keywords if k.arg == "desc"]
                if ast.unparse(node.func).endswith("byte_bar") and len(node.args) >= 2:
                    descs.append(node.args[1])
                calls.append((path.name, descs))
                for desc in descs:
                    passed_on = path.name == "progress.py" and isinstance(desc, ast.Name)  # byte_bar's own parameter
                    assert isinstance(desc, ast.Constant) or passed_on, f"{path.name}: desc={ast.unparse(desc)}"
    assert any(name == "decode.py" for name, _ in calls), calls


# ---------------------------------------------------------------- the model card


def unescaped_pipes(line: str) -> int:
    count, backslashes = 0, 0
    for char in line:
        if char == "|" and backslashes % 2 == 0:
            count += 1
        backslashes = backslashes + 1 if char == "\\" else 0
    return count


def test_the_model_card_keeps_its_structure_whatever_the_names(delta):
    manifest = load_manifest(delta)
    summary = summarize(manifest, 1000)
    wf, of = manifest.weight_files[0], manifest.other_files[0]
    injection = "\n---\nlicense: mit\n---\n# Owned\n| a | b |\n```\n<script>x</script> [link](http://x) `code` \\"

    def card(text: str) -> str:
        m = dataclasses.replace(
            manifest,
            base=dataclasses.replace(manifest.base, description=f"the base{text}", repo_id="org/base", revision="abc"),
            weight_files=(dataclasses.replace(wf, name=f"model{text}.safetensors"), *manifest.weight_files[1:]),
            other_files=(dataclasses.replace(of, name=f"config{text}.json"), *manifest.other_files[1:]),
        )
        s = dataclasses.replace(
            summary,
            tool_version=f"0.1.0{text}",
            unprotected=[f"4 rows of emb{text} are stored unprotected (256 bytes)", *summary.unprotected],
            files_shipped=[f"config{text}.json", *summary.files_shipped],
        )
        return model_card(m, s, "me/ft-delta")

    plain, hostile = card(PLAIN), card(HOSTILE + injection)
    lines = lines_of(hostile)
    assert len(lines) == len(lines_of(plain)) == len(hostile.splitlines())
    front = '---\ntags:\n- xorweights\n- xor-delta\nlibrary_name: xorweights\nbase_model: "org/base"\n---\n'
    assert hostile.startswith(front) and lines.count("---") == 2
    assert [line for line in lines if line.startswith("#")] == [x for x in plain.splitlines() if x.startswith("#")]
    assert [line for line in lines if line.startswith("```")] == [x for x in plain.splitlines() if x.startswith("```")]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == len([x for x in plain.splitlines() if x.startswith("|")])
    assert all(unescaped_pipes(line) == 5 for line in table), table
    # Every line differs from the plain card's only where PLAIN was, and there
    # the text holds no Markdown that could act: no tag, link, code span, cell end.
    for h, p in zip(lines, plain.splitlines(), strict=True):
        if PLAIN not in p:
            assert h == p
            continue
        head, tail = p.split(PLAIN, 1)
        assert h.startswith(head) and h.endswith(tail), (h, p)
        inserted = h[len(head) : len(h) - len(tail)]
        assert re.search(r"(?<!\\)[<`\[|&*]", inserted.replace("\\\\", "")) is None, inserted
        assert r"\\x0a\\x0d\\x1b\[2K\\x1b\]0;title\\x07\\u202e" in inserted, inserted
    assert "The releaser describes it as: the base\\\\x0a" in hostile


# ---------------------------------------------------------------- the package and its entry point


def test_the_package_loads_only_the_standard_library_until_a_function_is_used():
    code = (
        "import sys, xorweights, xorweights.entry, xorweights.printable\n"
        "heavy = {'numpy', 'zstandard', 'torch', 'click', 'tqdm', 'huggingface_hub', 'xxhash', 'safetensors'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
        "print(xorweights.__version__)\n"
        "from xorweights import decode, encode, inspect, XorWeightsError\n"
        "print(callable(decode), callable(encode), callable(inspect), issubclass(XorWeightsError, Exception))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines() == ["[]", xorweights.__version__, "True True True True"]


def test_public_names_stay_the_functions_after_their_modules_are_imported():
    import importlib

    # cli.py imports the submodules xorweights.decode and xorweights.encode,
    # which the import system binds on the package under the functions' names.
    assert xorweights.decode is importlib.import_module("xorweights.decode").decode
    assert xorweights.encode is importlib.import_module("xorweights.encode").encode
    from xorweights import check_base, decode, verify

    assert callable(decode) and callable(check_base) and callable(verify)
    assert set(xorweights.__all__) <= set(dir(xorweights))
    with pytest.raises(AttributeError):
        xorweights.no_such_name  # noqa: B018


# ---------------------------------------------------------------- Ctrl-C, for real


SLOW = LlamaSpec(vocab=4096, hidden=256, intermediate=688, layers=4, heads=4)  # about 0.5 s to decode
CONSOLE_SCRIPT = Path(sys.executable).with_name("xorweights")


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pair, Path]:
    root = tmp_path_factory.mktemp("slow")
    pair = make_pair(root / "pair", SLOW, shards=3)
    xorweights.encode(pair.finetuned, pair.base, root / "delta", frame_bytes=4096)
    return pair, root / "delta"


def start(command: list[str]) -> subprocess.Popen[str]:
    # PYTHONFAULTHANDLER: if it hangs, SIGABRT prints where every thread is (see finish).
    env = {k: v for k, v in os.environ.items() if k != "XORWEIGHTS_DEBUG"} | {"PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def start_decode(slow: tuple[Pair, Path], out: Path, command: list[str] | None = None) -> subprocess.Popen[str]:
    pair, delta = slow
    args = ["decode", str(delta), "--base", str(pair.base), "-o", str(out), "-q", "-j", "2"]
    return start((command or [sys.executable, "-m", "xorweights"]) + args)


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        assert proc.poll() is None, f"the command ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.001)


def loading_numpy(proc: subprocess.Popen[str]) -> Callable[[], bool]:
    """True once numpy's C extension is mapped: the CLI's imports are under way (they take ~0.4 s more)."""
    maps = Path(f"/proc/{proc.pid}/maps")

    def ready() -> bool:
        try:
            return "_multiarray_umath" in maps.read_text()
        except OSError:
            return False

    return ready


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        stdout, stderr = proc.communicate()
        pytest.fail(f"still running 20 s after Ctrl-C; its threads were at:\n{stderr}")
    return proc.returncode, stdout, stderr


def assert_interrupted(proc: subprocess.Popen[str]) -> None:
    code, stdout, stderr = finish(proc)
    assert (code, stdout, stderr) == (INTERRUPTED_EXIT, "", INTERRUPTED_LINE)


def finished_files_are_complete(out: Path, pair: Pair) -> None:
    """What the message promises: nothing half-written under a final name."""
    expected = files_digest(pair.finetuned)
    for name, digest in files_digest(out).items() if out.exists() else []:
        assert digest == expected[name], name


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the imports")


@needs_proc
@pytest.mark.parametrize("how", ["python -m xorweights", "console script"])
def test_ctrl_c_while_modules_load_is_one_line_and_130(slow, tmp_path, how):
    if how == "console script" and not CONSOLE_SCRIPT.exists():
        pytest.skip("no xorweights console script next to this Python")
    command = [str(CONSOLE_SCRIPT)] if how == "console script" else None
    out = tmp_path / "out"
    proc = start_decode(slow, out, command)
    wait_for(proc, loading_numpy(proc), "numpy loading")
    proc.send_signal(signal.SIGINT)
    assert_interrupted(proc)
    assert not out.exists()  # it was stopped before the decode began


def test_ctrl_c_during_decode_is_one_line_and_130_and_the_next_run_resumes(slow, tmp_path):
    pair, delta = slow
    out = tmp_path / "out"
    proc = start_decode(slow, out)
    wait_for(proc, lambda: out.exists() and any(out.iterdir()), "the decode start")
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert_interrupted(proc)
    finished_files_are_complete(out, pair)
    xorweights.decode(delta, pair.base, out)
    assert files_digest(out) == files_digest(pair.finetuned)


def test_ctrl_c_pressed_again_and_again_is_still_one_line(slow, tmp_path):
    out = tmp_path / "out"
    proc = start_decode(slow, out)
    wait_for(proc, lambda: out.exists() and any(out.iterdir()), "the decode start")
    for _ in range(50):  # through the unwinding, the error line and the exit
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT)
        time.sleep(0.002)
    assert_interrupted(proc)
    finished_files_are_complete(out, slow[0])


def test_an_error_while_a_ctrl_c_unwinds_the_command_is_the_interrupted_line(delta, monkeypatch):
    # A KeyboardInterrupt cutting through a write or a lock can make the
    # unwinding fail in turn: the user pressed Ctrl-C, and that is what to say.
    monkeypatch.setattr(xorweights.cli, "was_interrupted", lambda: True)

    def broken(delta: Path) -> Any:
        raise RuntimeError("cannot release un-acquired lock")

    monkeypatch.setattr(xorweights.cli, "inspect_api", broken)
    r = run("inspect", delta)
    assert (r.exit_code, r.stdout, r.stderr) == (INTERRUPTED_EXIT, "", INTERRUPTED_LINE)


def test_ctrl_c_waits_until_the_main_thread_is_out_of_threading_code():
    """Raised inside a lock or a queue, KeyboardInterrupt can leave it broken and the worker threads stuck."""
    seen: list[bool] = []
    timer = threading.Timer(0, lambda: seen.append(entry_module._in_locking_code(sys._getframe())))
    timer.start()
    timer.join()
    assert seen == [True]  # a frame with threading's code below it
    assert not entry_module._in_locking_code(sys._getframe())


STUCK = """
import time
import click
import xorweights.cli as cli
import xorweights.entry as entry

@click.command()
@cli.translate_errors
def stuck():
    try:
        click.echo("working")
        time.sleep(60)
    finally:
        time.sleep(60)  # a cleanup that never ends, like a worker thread that never finishes

cli.main = stuck
entry.main()
"""


def test_a_second_ctrl_c_leaves_a_cleanup_that_hangs_with_the_same_one_line():
    proc = start([sys.executable, "-c", STUCK])
    assert proc.stdout is not None and proc.stdout.readline() == "working\n"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # the first one is unwinding: into the endless cleanup
    proc.send_signal(signal.SIGINT)
    assert finish(proc) == (INTERRUPTED_EXIT, "", INTERRUPTED_LINE)


@needs_proc
@pytest.mark.parametrize("after", [0.0, 0.1, 0.2, 0.3, 0.45, 0.6])
def test_ctrl_c_at_any_moment_is_one_line(slow, tmp_path, after):
    """From numpy's import on: the rest of the imports, click's parsing, the decode, the summary, the exit."""
    out = tmp_path / "out"
    proc = start_decode(slow, out)
    wait_for(proc, loading_numpy(proc), "numpy loading")
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(proc)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    if code == 0:  # finished before the signal came: a Ctrl-C after the work changes nothing
        assert (stdout, stderr) == ("", "")
        assert files_digest(out) == files_digest(slow[0].finetuned)
    else:
        assert (code, stdout, stderr) == (INTERRUPTED_EXIT, "", INTERRUPTED_LINE)
        finished_files_are_complete(out, slow[0])


def test_a_json_line_holding_a_hostile_name_passes_the_cli_unchanged():
    line = json.dumps({"name": HOSTILE})
    assert line.isascii() and not any(steers(c) for c in line)
    assert printable(line) == line
