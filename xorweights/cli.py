"""The ``xorweights`` command line: parse, call the library, print, map errors to exit codes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from . import __version__
from .checksums import checksum as checksum_api
from .checksums import verify as verify_api
from .decode import check_base as check_base_api
from .decode import decode as decode_api
from .delta.coding import CODINGS, DEFAULT_CODING
from .delta.kernel import DEFAULT_FRAME_BYTES
from .delta.manifest import MANIFEST_NAME
from .delta.summary import DeltaSummary, summarize
from .encode import EncodeResult
from .encode import encode as encode_api
from .errors import EXIT_INTERNAL, EXIT_OS, EXIT_VERIFY_FAILED, UsageError, XorWeightsError, XorWeightsWarning
from .exposure import DEFAULT_MAX_UNPROTECTED_PCT, enforce, report_lines
from .hub.refs import at_revision, hub_token
from .interrupts import INTERRUPTED, INTERRUPTED_EXIT, ignore_interrupts, interruptible, was_interrupted
from .printable import printable
from .readers.dtypes import NAMED
from .report import inspect as inspect_api
from .sizes import human_bytes

F = TypeVar("F", bound=Callable[..., Any])


def _say(line: str, err: bool = False) -> None:
    """Print one line on stdout, or stderr when ``err``: every line the CLI prints goes through here.

    Names, paths and messages in it may come from an input, so control
    characters are escaped: a name holding a newline, a carriage return or an
    escape sequence can neither fake a second line nor move the cursor.
    """
    click.echo(printable(line), err=err)


def _say_json(data: object) -> None:
    """Print ``data``, library result objects included (see :func:`_jsonable`), as the one JSON document on stdout."""
    # json.dumps escapes every control and non-ASCII character itself; each of
    # its lines is then printed like any other.
    for line in json.dumps(_jsonable(data), indent=1).splitlines():
        _say(line)


def _jsonable(obj: object) -> object:
    """``obj`` as plain JSON values: a result dataclass field by field, paths as strings, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fail(message: str, code: int) -> NoReturn:
    _say(f"xorweights: error: {message}", err=True)
    sys.exit(code)


def _warn(message: str) -> None:
    _say(f"xorweights: warning: {message}", err=True)


@contextlib.contextmanager
def _one_line_warnings(debug: bool) -> Iterator[None]:
    """Print the library's warnings as one ``xorweights: warning:`` line each; silence all others.

    torch, numpy and huggingface_hub warn about their own affairs, over several
    lines; with ``debug`` they are shown as Python shows them.
    """
    with warnings.catch_warnings():
        previous = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, XorWeightsWarning):
                _warn(str(message))
            else:
                previous(message, category, *args, **kwargs)

        if not debug:
            warnings.simplefilter("ignore")
        warnings.simplefilter("always", XorWeightsWarning)
        warnings.showwarning = show
        yield


def translate_errors(fn: F) -> F:
    """Turn every error and Ctrl-C into one line on stderr, and warnings too; tracebacks only with XORWEIGHTS_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = os.environ.get("XORWEIGHTS_DEBUG") == "1"
        try:
            with _one_line_warnings(debug), interruptible():
                return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            _fail_interrupted()
        except Exception as exc:
            if was_interrupted():  # failed while a Ctrl-C unwound it: a write cut short, a lock left broken
                _fail_interrupted()
            if debug:
                if not isinstance(exc, XorWeightsError | OSError):
                    raise
                traceback.print_exc()
            _fail(_error_line(exc), _exit_code(exc))

    return wrapper  # type: ignore[return-value]


def _exit_code(exc: Exception) -> int:
    """The code the CLI exits with for ``exc``: its class's (errors.py), that of an OS error, or that of a bug."""
    if isinstance(exc, XorWeightsError):
        return exc.exit_code
    if isinstance(exc, OSError):
        return EXIT_OS
    return EXIT_INTERNAL


def _error_line(exc: Exception) -> str:
    if isinstance(exc, XorWeightsError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc} (hint: check the path and its permissions)"
    # A bug: still one line unless debugging.
    return f"internal error: {type(exc).__name__}: {exc} (hint: set XORWEIGHTS_DEBUG=1 for the full traceback and report it)"


def _fail_interrupted() -> NoReturn:
    ignore_interrupts()
    _fail(INTERRUPTED, INTERRUPTED_EXIT)


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars or summaries.")
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of the summary."
)


def hub_options(target: str, what: str) -> Callable[[F], F]:
    """``--revision`` for the Hub repo in the parameter ``target`` and ``--token``, as `hf download` has them.

    Goes below ``translate_errors``, so a conflicting ``@rev`` is one usage line.
    The token is handed to huggingface_hub (see :func:`xorweights.hub.refs.hub_token`), never printed.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, revision: str | None, token: str | None, **kwargs: Any) -> Any:
            if kwargs.get(target) is None and revision is not None:
                raise UsageError(f"--revision {revision}: applies to {what}, which was not given")
            if kwargs.get(target) is not None:
                kwargs[target] = at_revision(kwargs[target], revision)
            with hub_token(token):
                return fn(*args, **kwargs)

        wrapper = click.option(
            "--token",
            metavar="TOKEN",
            default=None,
            help="Hugging Face token for private or gated repos (default: HF_TOKEN or `hf auth login`).",
        )(wrapper)
        wrapper = click.option(
            "--revision", metavar="REV", default=None, help=f"Branch, tag or commit of {what}, like org/name@REV."
        )(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


max_unprotected_option = click.option(
    "--max-unprotected",
    type=click.FloatRange(0, 100),
    default=DEFAULT_MAX_UNPROTECTED_PCT,
    show_default=True,
    metavar="PCT",
    help="Refuse when more than PCT% of tensor bytes would be stored in the clear.",
)
license_option = click.option(
    "--license",
    "license_id",
    metavar="ID",
    default=None,
    help="Hub license id for the model card (apache-2.0, llama3.1, other, ...); usually the base's.",
)
jobs_option = click.option(
    "--jobs", "-j", type=click.IntRange(min=1), default=None, help="Threads to use (default: one per core)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})  # inherited by every command
@click.version_option(__version__, prog_name="xorweights")
def main() -> None:
    """Publish and rebuild fine-tunes as per-tensor XOR deltas.

    Each class of failure has its own exit code, listed in docs/decoding.md
    ("Exit codes"): 1 is a failed verification or the wrong base.

    Examples:

    \b
      xorweights decode org/my-delta --base huggyllama/llama-7b -o my-finetune
      xorweights encode -h
    """


@main.command()
@click.argument("finetuned", type=click.Path(path_type=Path))
@click.option(
    "--base",
    "base",
    required=True,
    type=click.Path(path_type=Path),
    help="The base: a folder, or a Hub repo org/name[@revision].",
)
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="The delta folder to write.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave matching non-tensor files out (repeatable).")
@click.option("--no-compress", is_flag=True, help="Store frames without zstd.")
@click.option(
    "--codec",
    type=click.Choice(CODINGS),
    default=DEFAULT_CODING,
    show_default=True,
    help="How frames store the XOR: zigzag-diff (format 3, smaller) or xor (format 2, the literal XOR).",
)
@click.option(
    "--frame-mib", type=click.IntRange(1, 64), default=DEFAULT_FRAME_BYTES >> 20, show_default=True, help="Frame size."
)
@click.option("--base-description", default="", help="How downloaders get the base, in words.")
@click.option("--base-repo", default=None, help="Hub repo id of the base, recorded in the manifest.")
@click.option("--base-revision", default=None, help="Hub revision of the base, recorded in the manifest.")
@click.option(
    "--rename",
    "renames",
    multiple=True,
    metavar="FROM=TO",
    help="Regex mapping base tensor names onto the fine-tune's.",
)
@max_unprotected_option
@click.option(
    "--allow-unprotected", is_flag=True, help="Publish unprotected tensor bytes anyway; recorded in the delta."
)
@click.option("--dry-run", is_flag=True, help="Print the plan and the unprotected report; write nothing.")
@click.option("--push-to-hub", metavar="REPO", default=None, help="Then upload the delta to this Hub repo (org/name).")
@click.option("--private", is_flag=True, help="Create the --push-to-hub repo as private.")
@license_option
@jobs_option
@quiet_option
@json_option
@translate_errors
@hub_options("finetuned", "the Hub repo FINETUNED")
def encode(
    finetuned: Path,
    base: Path,
    out: Path,
    exclude: tuple[str, ...],
    no_compress: bool,
    codec: str,
    frame_mib: int,
    base_description: str,
    base_repo: str | None,
    base_revision: str | None,
    renames: tuple[str, ...],
    max_unprotected: float,
    allow_unprotected: bool,
    dry_run: bool,
    push_to_hub: str | None,
    private: bool,
    license_id: str | None,
    jobs: int | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Write the XOR delta of FINETUNED against --base into --out (for releasers).

    Before writing anything, encode refuses a delta that would publish more
    than --max-unprotected percent of the tensor bytes in the clear (for
    example against the wrong base), unless --allow-unprotected is given.
    Run it with --dry-run before every release. FINETUNED and --base may be
    Hub repos, org/name[@revision]; a Hub base's repo and commit are recorded.

    Examples:

    \b
      xorweights encode finetuned --base base -o my-delta --dry-run
      xorweights encode finetuned --base org/base -o my-delta --push-to-hub org/my-delta
    """
    if private and not push_to_hub:
        raise click.UsageError("--private applies to --push-to-hub REPO; pass both")
    if license_id is not None and not push_to_hub:
        raise click.UsageError("--license applies to --push-to-hub REPO; pass both")
    if push_to_hub:
        from .hub.publish import check_license, check_repo_id

        push_to_hub = check_repo_id(push_to_hub)
        if license_id is not None:
            check_license(license_id)
    result = encode_api(
        finetuned,
        base,
        out,
        exclude=list(exclude),
        compress=not no_compress,
        codec=codec,
        frame_bytes=frame_mib << 20,
        base_description=base_description,
        base_repo_id=base_repo,
        base_revision=base_revision,
        progress=not quiet and not dry_run and not as_json,
        jobs=jobs,
        renames=renames,
        max_unprotected=max_unprotected,
        allow_unprotected=allow_unprotected,
        dry_run=dry_run,
    )
    if as_json:
        url = _push(out, push_to_hub, private, license_id, quiet=True) if push_to_hub and not dry_run else None
        _say_json({**_encode_report(out, result), "pushed_to": push_to_hub if url else None, "url": url})
        if dry_run:
            enforce(result.exposure, max_unprotected, allow_unprotected)
        return
    if dry_run:
        _echo_plan(result)
        enforce(result.exposure, max_unprotected, allow_unprotected)
        if (out / MANIFEST_NAME).exists():
            _say(f"dry run: nothing was written to {out}")
            _say(
                f"note: {out} already holds a finished delta, which encode without --dry-run refuses; "
                "choose a new output folder or remove the old delta"
            )
        else:
            _say(f"dry run: encode would write {out}; nothing was written")
        if push_to_hub:
            _say(f"dry run: nothing was pushed to {push_to_hub}")
        return
    if not quiet:
        _echo_encoded(out, result)
    if push_to_hub:
        _push(out, push_to_hub, private, license_id)


def _echo_encoded(out: Path, result: EncodeResult) -> None:
    assert result.manifest is not None
    s = summarize(result.manifest, result.delta_bytes)
    _say(f"wrote {out}: {s.tensors_xored} of {s.tensors} tensors XORed against the base")
    _say(f"exposure: {s.exposure_line()}")
    _echo_summary(s)
    for line in result.plan.not_shipped:
        _say(f"  not shipped: {line}")
    for name, twin in result.exposure.aliases.items():
        _say(f"  warning: {name} is byte-identical to the base's {twin}")
    for rule in result.plan.auto_renames:
        _say(f"  names mapped automatically with --rename '{rule}'")


def _push(delta: Path, repo_id: str, private: bool, license_id: str | None, quiet: bool = False) -> str:
    from .hub.publish import push_to_hub

    url = push_to_hub(delta, repo_id, private=private, license_id=license_id)
    if not quiet:
        _say(f"pushed {delta} to {repo_id}: {url}")
    return str(url)


def _encode_report(out: Path, result: EncodeResult) -> dict[str, object]:
    """What encode (or its dry run) did, for --json: every tensor and file with its size, and the exposure."""
    plan = result.plan
    return {
        "out": out,
        "dry_run": result.manifest is None,
        "summary": summarize(result.manifest, result.delta_bytes) if result.manifest is not None else None,
        "tensors": [
            {
                "name": t.target.name,
                "base": t.base.name if t.base is not None else None,
                "method": t.method,
                "nbytes": t.target.nbytes,
                "unprotected_bytes": t.unprotected_bytes,
                "note": t.note,
            }
            for t in plan.tensors()
        ],
        "weight_files": [{"name": f.name, "size": f.size} for f in plan.weight_files],
        "other_files": plan.other_files,
        "unprotected_bytes": result.exposure.unprotected_bytes,
        "exposure": result.exposure,
        "not_shipped": plan.not_shipped,
        "auto_renames": plan.auto_renames,
    }


@main.command()
@click.argument("delta", type=click.Path(path_type=Path))
@click.argument("repo_id", metavar="REPO")
@click.option("--private", is_flag=True, help="Create REPO as private (an existing repo keeps its visibility).")
@license_option
@quiet_option
@translate_errors
def push(delta: Path, repo_id: str, private: bool, license_id: str | None, quiet: bool) -> None:
    """Upload the finished delta folder DELTA to the Hub repo REPO (org/name), with a model card.

    The card (DELTA/README.md), generated for REPO at each push, names the
    base, the decode command, the expected checksums and the unprotected
    bytes; a README.md you wrote or edited in DELTA is kept. The token comes
    from HF_TOKEN or `hf auth login`.

    Examples:

    \b
      xorweights push my-delta org/my-delta --license apache-2.0
      xorweights push my-delta org/my-delta --private
    """
    _push(delta, repo_id, private, license_id, quiet)


def _echo_plan(result: EncodeResult) -> None:
    tensors = result.plan.tensors()
    xored = [t for t in tensors if t.base is not None]
    renamed = [t for t in xored if t.base is not None and t.base.name != t.target.name]
    _say(
        f"plan: {len(xored)} of {len(tensors)} tensors XORed against the base, in {len(result.plan.weight_files)} files"
    )
    for rule in result.plan.auto_renames:
        _say(
            f"  names: every fine-tune tensor pairs with a base tensor through --rename '{rule}', applied automatically"
        )
    for t in renamed if not result.plan.auto_renames else []:
        _say(f"  {t.target.name} <- base {t.base.name if t.base else ''}")
    for line in report_lines(result.exposure):
        _say(line)
    for of in result.plan.other_files:
        if of.mode == "reference":
            _say(f"  taken from the base: {of.name}")
    for line in result.plan.not_shipped:
        _say(f"  not shipped: {line}")


@main.command()
@click.argument("delta", type=click.Path(path_type=Path))
@click.option(
    "--base",
    "base",
    required=True,
    type=click.Path(path_type=Path),
    help="Your copy of the base: a folder, or a Hub repo org/name[@revision].",
)
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), help="The folder to rebuild the fine-tune in.")
@click.option("--dtype", type=click.Choice(sorted(NAMED)), default=None, help="Convert float tensors after verifying.")
@click.option("--check-base", is_flag=True, help="Only check the whole base against the delta; write nothing.")
@click.option(
    "--skip-file",
    "skip_files",
    multiple=True,
    metavar="GLOB",
    help="Leave matching non-tensor files out of the rebuild (repeatable).",
)
@click.option(
    "--take-from-base",
    multiple=True,
    metavar="GLOB",
    help="Copy your base's version of matching non-tensor files as is, unverified (repeatable).",
)
@click.option(
    "--download-first",
    is_flag=True,
    help="For a Hub DELTA: download it whole into the Hugging Face cache, then decode (default: stream it).",
)
@jobs_option
@quiet_option
@json_option
@translate_errors
@hub_options("delta", "the Hub repo DELTA")
def decode(
    delta: Path,
    base: Path,
    out: Path | None,
    dtype: str | None,
    check_base: bool,
    skip_files: tuple[str, ...],
    take_from_base: tuple[str, ...],
    download_first: bool,
    jobs: int | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Rebuild the fine-tune from DELTA and --base into --out (for downloaders).

    DELTA and --base are folders or Hub repos, org/name[@revision] (HF_HUB_OFFLINE,
    HF_HUB_CACHE, HF_TOKEN and HF_ENDPOINT apply). A Hub DELTA is streamed: its
    data files are fetched by range as the rebuild goes and never written to
    disk, and a re-run resumes where a stopped one left off; --download-first
    fetches it into the Hugging Face cache first. A Hub --base is fetched into
    the cache, at the revision the delta records when it names that repo
    without @revision. With --check-base, exits 1 when the base differs, after
    listing every difference.

    Examples:

    \b
      xorweights decode org/my-delta --base huggyllama/llama-7b -o my-finetune
      xorweights decode my-delta --base base --check-base
    """
    if check_base:
        problems = check_base_api(
            delta, base, progress=not quiet and not as_json, skip_files=skip_files, take_from_base=take_from_base
        )
        if as_json:
            _say_json({"base": base, "ok": not problems, "problems": problems})
        for p in problems if not as_json else []:
            _say(p)
        if problems:
            _fail(
                f"{base}: {len(problems)} difference(s) from the base this delta needs, listed above "
                "(hint: get the base named by `xorweights inspect DELTA`)",
                EXIT_VERIFY_FAILED,
            )
        if not as_json:
            _say(f"{base} is the base this delta needs: every tensor and referenced file matches")
        return
    if out is None:
        raise click.UsageError("missing option '-o' / '--out' (or pass --check-base)")
    result = decode_api(
        delta,
        base,
        out,
        dtype=dtype,
        progress=not quiet and not as_json,
        jobs=jobs,
        skip_files=skip_files,
        take_from_base=take_from_base,
        download_first=download_first,
    )
    if as_json:
        sizes = {name: (out / name).stat().st_size for name in [*result.written, *result.skipped]}
        _say_json({**dataclasses.asdict(result), "already_complete": not result.written, "sizes": sizes})
    elif not quiet:
        how = f"converted to {dtype}" if dtype else "byte-identical to the release"
        how += ", except the files listed below" if result.skipped_files or result.unverified else ""
        how += f"; config.json's dtype set to {result.config_dtype}" if result.config_dtype else ""
        if result.written:
            done = f"{len(result.written)} files written, {len(result.skipped)} already done"
            _say(f"rebuilt {out}: {done}; every tensor verified, {how}")
        else:
            _say(f"{out}: already complete ({len(result.skipped)} files, verified when written, {how})")
        if result.skipped_files:
            _say(f"  left out (--skip-file): {', '.join(result.skipped_files)}")
        if result.unverified:
            _say(f"  copied from your base as is, NOT verified (--take-from-base): {', '.join(result.unverified)}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Where to write the JSON.")
@quiet_option
@json_option
@translate_errors
def checksum(path: Path, out: Path, quiet: bool, as_json: bool) -> None:
    """Write per-tensor xxh3-128 and per-file sha256 of the checkpoint at PATH.

    Examples:

    \b
      xorweights checksum out -o checksums/my-model.json
    """
    sums = checksum_api(path, out, progress=not quiet and not as_json)
    if as_json:
        _say_json({"out": out, "files": sums.files, "tensors": sums.tensors})
    elif not quiet:
        _say(f"wrote {out}: {len(sums.tensors)} tensors, {len(sums.files)} files")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--manifest", type=click.Path(path_type=Path), help="A checksum manifest from `xorweights checksum`.")
@click.option(
    "--delta",
    type=click.Path(path_type=Path),
    help="A delta (folder or org/name[@revision]) whose target or base side to check against.",
)
@click.option(
    "--side",
    type=click.Choice(["target", "base"]),
    default="target",
    show_default=True,
    help="With --delta: check PATH as the fine-tune the delta rebuilds (target) or as the base it needs.",
)
@json_option
@quiet_option
@translate_errors
@hub_options("delta", "the Hub repo --delta names")
def verify(path: Path, manifest: Path | None, delta: Path | None, side: str, as_json: bool, quiet: bool) -> None:
    """Check the checkpoint at PATH; exit 0 when it matches, 1 when not.

    Without --manifest or --delta, PATH's own xorweights-checksums.json (written
    by decode --dtype) is used.

    Examples:

    \b
      xorweights verify out --manifest checksums/my-model.json --json
      xorweights verify out --delta my-delta
    """
    report = verify_api(path, manifest=manifest, delta=delta, side=side, progress=not quiet and not as_json)
    if as_json:
        _say_json(report.to_dict())
    else:
        for p in report.problems:
            _say(p)
        if report.ok and not quiet:
            _say(f"{path}: OK, {report.checked_tensors} tensors and {report.checked_files} files match")
    if not report.ok:
        if not as_json:
            _fail(
                f"{path}: {len(report.problems)} mismatches (hint: re-run decode into a fresh folder)",
                EXIT_VERIFY_FAILED,
            )
        sys.exit(EXIT_VERIFY_FAILED)


@main.command()
@click.argument("delta")
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (the summary is what inspect prints).")
@translate_errors
@hub_options("delta", "the Hub repo DELTA")
def inspect(delta: str, as_json: bool, quiet: bool) -> None:
    """Show which base DELTA needs, its sizes, unprotected bytes and format version.

    DELTA is a folder or a Hub repo, org/name[@revision] or its
    https://huggingface.co URL, of which only the manifest is fetched.

    Examples:

    \b
      xorweights inspect my-delta
      xorweights inspect org/my-delta --json
    """
    s = inspect_api(delta, progress=not as_json and not quiet)
    if as_json:
        _say_json(s.to_dict())
        return
    coding = f", coding {' and '.join(s.codings)}" if s.codings else ""
    _say(f"delta format {s.format_version}, made by xorweights {s.tool_version}, compression {s.compression}{coding}")
    _say(f"base: {s.base.description}")
    if s.base.repo_id:
        _say(f"  repo {s.base.repo_id} at revision {s.base.revision or '(unpinned)'}")
    _say(f"tensors: {s.tensors}, XORed against the base: {s.tensors_xored}")
    _say(f"exposure: {s.exposure_line()}")
    _echo_summary(s)
    _say(f"  files rebuilt: {', '.join(s.files_rebuilt)}")


def _echo_summary(s: DeltaSummary) -> None:
    _say(f"  delta {human_bytes(s.delta_bytes)} for {human_bytes(s.tensor_bytes)} of tensors ({s.ratio}x smaller)")
    _say(f"  {human_bytes(s.unprotected_bytes)} of tensor bytes stored unprotected by the base")
    for line in s.unprotected:
        _say(f"    {line}")
    _say(f"  files taken from the base: {', '.join(s.files_referenced) or 'none'}")
    _say(f"  files shipped in the delta: {', '.join(s.files_shipped) or 'none'}")


@main.command()
@click.option("--keep", type=click.Path(path_type=Path), default=None, help="Build in this folder and keep it.")
@quiet_option
@translate_errors
def demo(keep: Path | None, quiet: bool) -> None:
    """Build a tiny LLaMA-shaped base and fine-tune, then encode, decode and verify them.

    Examples:

    \b
      xorweights demo
      xorweights demo --keep /tmp/xorweights-demo
    """
    from .demo import run_demo

    if quiet:
        run_demo(keep, lambda line: None)
    else:
        run_demo(keep, _say)


def _legacy_options(fn: F) -> F:
    """The md5-list options shared by decode-legacy and migrate."""
    options = [
        click.option(
            "--checksums", metavar="NAME", help="Release folder under checksums/ (found from file names if omitted)."
        ),
        click.option("--base-md5", type=click.Path(path_type=Path), help="md5sum list of the base files."),
        click.option("--out-md5", type=click.Path(path_type=Path), help="md5sum list of the decoded files."),
        click.option("--no-check", is_flag=True, help="Do not check the base files before decoding."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _echo_legacy(result: Any, quiet: bool, decoded: str | None = None) -> None:
    """Warnings always (on stderr), then what was checked and written unless quiet.

    ``decoded`` names what was decoded (default: the output folder).
    """
    for line in result.warnings:
        _warn(line)
    if quiet:
        return
    if result.base_list:
        _say(f"base checked: {len(result.base_checked)} files match {result.base_list}")
    checked = f"every file matches {result.out_list}" if result.out_list else "not checked"
    if result.out_list and result.unchecked:
        checked = f"checked against {result.out_list}, except {len(result.unchecked)} it does not list"
    what = decoded or f"decoded {result.out}"
    _say(f"{what}: {len(result.written)} files written, {len(result.skipped)} already done; {checked}")


@main.command("decode-legacy")
@click.argument("payload", type=click.Path(path_type=Path))
@click.option("--base", "base", required=True, type=click.Path(path_type=Path), help="The exact base files.")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="The folder to decode into.")
@_legacy_options
@quiet_option
@json_option
@translate_errors
def decode_legacy(
    payload: Path,
    base: Path,
    out: Path,
    checksums: str | None,
    base_md5: Path | None,
    out_md5: Path | None,
    no_check: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Decode a whole-file XOR release made with OpenAssistant's xor_codec.py.

    Each base file is checked against the release's published md5 list, and
    every decoded file against the output list, before the decoded file gets
    its final name; both md5s are computed while the bytes are read once. A
    second run resumes.

    Examples:

    \b
      xorweights decode-legacy oasst-sft-6-llama-30b-xor/ --base llama30b_hf/ -o oasst-sft-6-llama-30b/
    """
    from .legacy import decode_legacy as decode_legacy_api

    result = decode_legacy_api(
        payload, base, out, base_md5, out_md5, checksums=checksums, check=not no_check, progress=not (quiet or as_json)
    )
    _echo_legacy(result, quiet or as_json)
    if as_json:
        _say_json(result)


@main.command()
@click.argument("payload", type=click.Path(path_type=Path))
@click.option("--base", "base", required=True, type=click.Path(path_type=Path), help="The exact base files.")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="The delta folder to write.")
@_legacy_options
@click.option("--base-description", default="", help="How downloaders get the base, in words.")
@max_unprotected_option
@click.option("--allow-unprotected", is_flag=True, help="Publish unprotected tensor bytes anyway.")
@jobs_option
@quiet_option
@json_option
@translate_errors
def migrate(
    payload: Path,
    base: Path,
    out: Path,
    checksums: str | None,
    base_md5: Path | None,
    out_md5: Path | None,
    no_check: bool,
    base_description: str,
    max_unprotected: float,
    allow_unprotected: bool,
    jobs: int | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Turn a whole-file XOR release into a per-tensor delta against the same base (for releasers).

    Anyone who holds the exact base files can run this once; downloaders of
    the new delta then need only the same tensors, not the same file bytes.

    Examples:

    \b
      xorweights migrate oasst-sft-6-llama-30b-xor/ --base llama30b_hf/ -o oasst-sft-6-llama-30b-delta/
    """
    from .legacy import migrate as migrate_api

    result = migrate_api(
        payload,
        base,
        out,
        base_md5,
        out_md5,
        checksums=checksums,
        check=not no_check,
        base_description=base_description,
        max_unprotected=max_unprotected,
        allow_unprotected=allow_unprotected,
        progress=not quiet and not as_json,
        jobs=jobs,
    )
    if as_json:
        _echo_legacy(result.legacy, True)  # the warnings, on stderr
        _say_json(
            {
                "out": out,
                "legacy_bytes": result.legacy_bytes,
                "delta_bytes": result.delta_bytes,
                "saved_bytes": result.saved_bytes,
                "legacy": result.legacy,
                "encoded": _encode_report(out, result.encoded),
            }
        )
        return
    _echo_legacy(result.legacy, quiet, "decoded the legacy release")  # its scratch folder is no concern of the user
    if quiet:
        return
    saved = result.saved_bytes
    change = f"{human_bytes(saved)} smaller" if saved >= 0 else f"{human_bytes(-saved)} larger"
    _say(
        f"wrote {out}: per-tensor delta of {human_bytes(result.delta_bytes)} against the legacy payload's "
        f"{human_bytes(result.legacy_bytes)} ({change})"
    )
