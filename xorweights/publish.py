"""publish: a model card for a delta, and one upload of the delta folder to the Hugging Face Hub.

The card is generated from the manifest, so what it promises downloaders (the
base, the checksums, the unprotected bytes) is exactly what decode checks.
Every huggingface_hub error becomes one :class:`HubError` line whose hint says
how to push the delta, which stays complete on disk, again.
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path
from urllib.parse import quote

from huggingface_hub import HfApi
from huggingface_hub.utils import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    validate_repo_id,
)

from .decode import open_delta_file
from .errors import HubAuthError, HubError, InputFileError, UsageError
from .hub_client import CONNECTION_ERRORS
from .inputs import InputFolder
from .manifest import MANIFEST_NAME, SHIPPED_DIR, Manifest, load_manifest
from .outdir import write_file
from .printable import printable
from .report import DeltaSummary, delta_size, summarize

CARD_NAME = "README.md"  # not listed in the manifest; decode ignores it
# Encode's resume records (.xorweights/) and partial files (.NAME.xorweights-partial,
# also under files/) are hidden, and no hidden file is part of a delta.
IGNORE_PATTERNS = (".xorweights/*", ".*", "*/.*")


def check_repo_id(repo_id: str) -> None:
    """Refuse, before any work is done, a repository id the Hub would refuse or that lacks its namespace.

    The card's commands pass the id to decode and verify, which read a bare
    ``name`` as a local folder, so pushes name ``org/name`` in full.
    """
    hint = "name the repository org/name (your user name or organization), with letters, digits, '-', '_' and '.'"
    if repo_id.count("/") != 1:
        raise UsageError(f"{repo_id!r} is not an org/name Hub repository id", hint)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"{repo_id!r} is not a Hub repository id ({exc})", hint) from None


# Markdown characters that can start a link, an image, HTML, an entity, a code
# span, emphasis or strikethrough, or end a table cell. Each is made literal
# with a backslash (CommonMark allows one before any ASCII punctuation); the
# backslash comes first so that escapes already in the text stay literal too.
# "_" is left alone: inside names like embed_tokens it emphasizes nothing.
_MARKDOWN = "\\`*[]<>&|~"


def _text(text: object) -> str:
    """A name, path or description from the manifest, as inert Markdown text on one line.

    Control characters are escaped as on the terminal, so a newline cannot
    start a new block (a heading, a list, ``---``, a fence); Markdown
    punctuation is escaped so the text cannot become a link, HTML or a code
    span, nor break out of a table cell.
    """
    escaped = printable(text)
    for char in _MARKDOWN:
        escaped = escaped.replace(char, "\\" + char)
    return escaped


def _code(text: str) -> str:
    """``text`` as an inline code span, however many backticks it holds."""
    text = printable(text)
    run = max((len(r) for r in re.findall("`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _arg(text: str) -> str:
    """``text`` as one shell word on one line, for the commands in the card's code blocks."""
    return shlex.quote(printable(text))


def model_card(manifest: Manifest, summary: DeltaSummary, repo_id: str) -> str:
    """The README.md for the Hub repository ``repo_id`` that holds this delta."""
    base = manifest.base
    base_arg = _arg(base.repo_id) if base.repo_id else "PATH/TO/BASE"
    repo_arg = _arg(repo_id)
    lines = [
        "---",
        "tags:",
        "- xorweights",
        "- xor-delta",
        "library_name: xorweights",
        "---",
        "",
        f"# {_text(repo_id)}",
        "",
        "This repository holds a per-tensor XOR delta of a fine-tuned model, not a model you can load.",
        "Each tensor of the fine-tune was XORed with the tensor of the same name in its base model,",
        "so only someone who has that base can rebuild the fine-tune, with",
        f"[xorweights](https://pypi.org/project/xorweights/) {_text(summary.tool_version)} or later"
        f" (delta format {summary.format_version}).",
        "",
        "## The base you need",
        "",
        # Never at the start of a line: whatever it holds cannot begin a heading, a list or a rule.
        f"The releaser describes it as: {_text(base.description)}"
        if base.description
        else "The releaser gave no description of it.",
        "",
    ]
    if base.repo_id:
        lines.append(
            f"- Hub repository: [{_text(base.repo_id)}](https://huggingface.co/{quote(base.repo_id, safe='/')})"
        )
        if base.revision:
            lines.append(f"- Revision: {_code(base.revision)} (decode fetches this one when `--base` names the repo)")
        else:
            lines.append("- Revision: not recorded by the releaser")
        lines.append("")
    lines += [
        "Decode checks every base tensor against the checksums in `xorweights-delta.json` and stops",
        "with the name of any tensor that differs. To check your copy of the base, writing nothing:",
        "",
        "```",
        f"xorweights decode {repo_arg} --base {base_arg} --check-base",
        "```",
        "",
        "## Rebuild the fine-tune",
        "",
        "```",
        "pip install xorweights",
        f"xorweights decode {repo_arg} --base {base_arg} -o OUT",
        "```",
        "",
    ]
    if base.repo_id:
        lines += [f"`--base` also takes the folder of a copy of {_text(base.repo_id)} you already have.", ""]
    else:
        lines += ["`PATH/TO/BASE` is the folder of your copy of the base named above.", ""]
    lines += [
        "OUT receives the fine-tune's files, byte-identical to the releaser's. Each rebuilt file gets its",
        "final name only after every tensor in it matched its checksum. If decode stops, run the same",
        "command again: it resumes.",
        "",
        "## Expected checksums",
        "",
        "| File | Size (bytes) | sha256 | Comes from |",
        "|---|---:|---|---|",
    ]
    lines += [
        f"| {_text(f.name)} | {f.size} | {_code(f.sha256)} | rebuilt from the delta |" for f in manifest.weight_files
    ]
    for of in manifest.other_files:
        source = "your base" if of.mode == "reference" else f"`{SHIPPED_DIR}/` in this repository"
        lines.append(f"| {_text(of.name)} | {of.size} | {_code(of.sha256)} | {source} |")
    lines += [
        "",
        "To check a rebuilt copy at any time, every tensor (xxh3-128) and every file (sha256):",
        "",
        "```",
        f"xorweights verify OUT --delta {repo_arg}",
        "```",
        "",
        "## What the base does not protect",
        "",
        f"{summary.exposure_line()}.",
    ]
    if summary.unprotected:
        lines += [
            "The base cannot mask tensor bytes that have no counterpart in it (rows for added tokens,",
            "new heads, tensors whose shape or dtype does not fit), so anyone can read these in the delta:",
            "",
            *(f"- {_text(line)}" for line in summary.unprotected),
        ]
    else:
        lines.append("Every tensor byte is XORed with the base: none is stored in the clear.")
    shipped = ", ".join(_text(name) for name in summary.files_shipped) or "none"
    lines += [
        "",
        f"Non-tensor files shipped as they are, in `{SHIPPED_DIR}/`: {shipped}.",
        "",
        "## License",
        "",
        "This delta alone contains no weights of the base model beyond the unprotected bytes listed above:",
        "every other byte is XORed with the base and is noise without it. Rebuilding and using the",
        "fine-tune requires the base model, and so a license to the base model.",
        "",
    ]
    return "\n".join(lines)


def push_command(delta: Path, repo_id: str, private: bool) -> str:
    """The command that pushes ``delta`` again, for hints."""
    return f"xorweights push {shlex.quote(str(delta))} {repo_id}" + (" --private" if private else "")


def release_files(delta: Path, manifest: Manifest) -> list[str]:
    """The files that make up the delta, each checked before anything is uploaded.

    Each must be a regular file inside the delta (a link out of it would
    publish what it points at) and, for data and shipped files, of exactly the
    size the manifest declares. Only these are uploaded.
    """
    declared = {wf.data_file: sum(s for t in wf.tensors for s, _ in t.frames) for wf in manifest.weight_files}
    declared |= {f"{SHIPPED_DIR}/{of.name}": of.size for of in manifest.other_files if of.mode == "ship"}
    folder = InputFolder(delta)
    for rel, size in declared.items():
        open_delta_file(folder, delta / rel, size).close()
    for rel in (MANIFEST_NAME, CARD_NAME):
        folder.open(delta / rel)[0].close()
    return [MANIFEST_NAME, CARD_NAME, *declared]


def push_to_hub(delta: str | Path, repo_id: str, private: bool = False, api: HfApi | None = None) -> str:
    """Upload the delta folder ``delta`` to the Hub model repository ``repo_id`` in one commit.

    Writes the model card to ``delta/README.md`` first, unless the folder
    already has one (a card the releaser wrote or edited is kept; delete it to
    regenerate). Creates the repository if it does not exist; ``private``
    applies only then. Returns the commit URL. Hub failures raise
    :class:`HubAuthError` or :class:`HubError`, whose hint says how to retry.
    """
    delta = Path(delta)
    check_repo_id(repo_id)
    manifest = load_manifest(delta)
    card = delta / CARD_NAME
    if card.is_symlink() or not card.exists():  # a link would upload whatever it points at
        write_file(card, model_card(manifest, summarize(manifest, delta_size(delta)), repo_id).encode())
    files = release_files(delta, manifest)
    api = api or HfApi()
    retry = push_command(delta, repo_id, private)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=delta,
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload xorweights delta (format {manifest.format_version})",
            allow_patterns=[glob.escape(name) for name in files],  # exactly these, nothing planted beside them
            ignore_patterns=list(IGNORE_PATTERNS),  # a fresh list: upload_folder appends to it
        )
    except HFValidationError as exc:
        raise UsageError(f"the Hub refused {repo_id!r}: {_first_line(exc)}") from exc
    except LocalTokenNotFoundError as exc:
        raise HubAuthError(
            f"no Hugging Face token found to push to {repo_id}",
            f"set HF_TOKEN to a token with write access, or run `hf auth login`; then `{retry}`",
        ) from exc
    except HfHubHTTPError as exc:
        raise _http_error(exc, delta, repo_id, retry) from exc
    except CONNECTION_ERRORS as exc:
        if isinstance(exc, OSError) and exc.filename:  # reading the delta failed, not the network
            raise InputFileError(f"{exc.filename}: cannot read ({exc.strerror})", "check the delta folder") from exc
        raise HubError(
            f"cannot reach the Hugging Face Hub ({type(exc).__name__}: {_first_line(exc)})",
            f"the delta in {delta} is complete on disk; push it later with `{retry}`",
        ) from exc
    return str(getattr(info, "commit_url", None) or info)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _http_error(exc: HfHubHTTPError, delta: Path, repo_id: str, retry: str) -> HubError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    said = _first_line(exc)
    if status in (401, 403) or isinstance(exc, RepositoryNotFoundError):
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
        return HubAuthError(
            f"the Hub refused to let you write to {repo_id} ({said})",
            f"set HF_TOKEN to a token with write access to {namespace}, or run `hf auth login`; then `{retry}`",
        )
    if status is None or status == 429 or status >= 500:
        return HubError(
            f"the Hub could not take the upload to {repo_id} ({said})",
            f"the delta in {delta} is complete on disk; push it later with `{retry}`",
        )
    return HubError(
        f"the Hub refused the upload to {repo_id} ({said})",
        f"the delta in {delta} is complete on disk; fix the cause, then `{retry}`",
    )
