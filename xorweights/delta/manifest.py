"""The delta manifest and the checksum manifest: dataclasses <-> JSON, validated.

Both are plain JSON so a person can read them. Loading validates every field
and every file name before anything else happens, because a delta is a file
downloaded from a stranger. See docs/format.md for the layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from .. import __version__
from ..errors import DeltaCorruptError, ManifestError
from ..inputs import MAX_MANIFEST_BYTES, InputFolder, load_json
from ..readers.dtypes import ITEMSIZE, can_cast, tensor_nbytes
from .coding import CODINGS, LITERAL_XOR

DELTA_FORMAT = "xorweights-delta"
DELTA_VERSION = 3  # 2 added "exposure", 3 the per-tensor "coding"; every version back to 1 still decodes
CODING_VERSION = 3  # the first version whose tensors record their coding
MANIFEST_NAME = "xorweights-delta.json"
SHIPPED_DIR = "files"
DATA_SUFFIX = ".xwd"

CHECKSUM_FORMAT = "xorweights-checksums"
CHECKSUMS_NAME = "xorweights-checksums.json"  # written into OUT by decode --dtype
CHECKSUM_VERSION = 2  # 2 added the optional "source" of a converted decode; 1 still reads

METHODS = ("xor", "partial_xor", "raw")


@dataclass(frozen=True)
class BaseRef:
    """How to get the base: free text, and a Hub repo and revision when known."""

    description: str = ""
    repo_id: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class BaseTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    xxh3: str


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the fine-tune and how its bytes are stored.

    ``xor_bytes`` leading bytes of the tensor are XORed with the base (cast to
    ``dtype``); the rest are stored as they are, unprotected by the base.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    xxh3: str
    method: str
    base: BaseTensor | None
    xor_bytes: int
    frames: tuple[tuple[int, int], ...]  # (stored bytes, decoded bytes), in data-file order
    coding: str = LITERAL_XOR  # how frames store the bytes the base covers (delta.coding); format 3 on

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def unprotected_bytes(self) -> int:
        return self.nbytes - self.xor_bytes


@dataclass(frozen=True)
class WeightFile:
    """One safetensors file of the fine-tune, rebuilt byte for byte on decode."""

    name: str
    size: int
    sha256: str
    header: str  # the JSON header exactly as on disk, padding included
    data_file: str
    tensors: tuple[TensorEntry, ...]

    @property
    def header_bytes(self) -> bytes:
        return self.header.encode("utf-8")


@dataclass(frozen=True)
class OtherFile:
    """A non-tensor file: ``reference`` copies it from the base, ``ship`` from the delta."""

    name: str
    size: int
    sha256: str
    mode: str


@dataclass(frozen=True)
class ExposureRecord:
    """What the releaser accepted to publish in the clear (format version 2 on)."""

    allowed: bool  # --allow-unprotected was given
    max_unprotected_pct: float
    unprotected_bytes: int  # tensor bytes the base does not mask


@dataclass(frozen=True)
class Manifest:
    base: BaseRef
    compression: str
    frame_bytes: int
    weight_files: tuple[WeightFile, ...]
    other_files: tuple[OtherFile, ...]
    tool_version: str = __version__
    format_version: int = DELTA_VERSION
    exposure: ExposureRecord | None = None  # None only in version 1 deltas

    def tensors(self) -> list[TensorEntry]:
        return [t for f in self.weight_files for t in f.tensors]

    def to_json(self) -> str:
        obj = {"format": DELTA_FORMAT, "format_version": self.format_version, **asdict(self)}
        if self.format_version < CODING_VERSION:  # older decoders refuse fields they do not know
            for wf in obj["weight_files"]:
                for tensor in wf["tensors"]:
                    del tensor["coding"]
        return json.dumps(obj) + "\n"


# ---------------------------------------------------------------- validation


def check_relpath(name: Any, where: str, allow_dirs: bool = False, suffix: str = "") -> str:
    """Refuse a file name that could escape the folder it belongs to, or hide in it."""
    if not isinstance(name, str) or not name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ManifestError(f"{where}: invalid file name {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or any(p in ("", ".", "..") or p.startswith(".") for p in name.split("/")):
        raise ManifestError(f"{where}: file name {name!r} escapes the output folder", "the delta is hostile or damaged")
    if not allow_dirs and len(path.parts) != 1:
        raise ManifestError(f"{where}: file name {name!r} must not contain a folder")
    if not name.endswith(suffix):
        raise ManifestError(f"{where}: file name {name!r} must end with {suffix}")
    return name


class _Reader:
    """Pulls typed fields out of parsed JSON with messages that say where."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        self.obj = obj
        self.where = where
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        self.used.add(key)
        if key not in self.obj:
            if optional:
                return None
            raise ManifestError(f"{self.where}: missing field {key!r}")
        value = self.obj[key]
        if value is None and optional:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ManifestError(f"{self.where}: field {key!r} has the wrong type ({type(value).__name__})")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ManifestError(f"{self.where}: field {key!r} is negative")
        return value

    def done(self) -> None:
        extra = set(self.obj) - self.used
        if extra:
            raise ManifestError(f"{self.where}: unexpected fields {sorted(extra)}")


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ManifestError(f"{where}: invalid shape {value!r}")
    return tuple(value)


def _dtype(value: Any, where: str) -> str:
    if not isinstance(value, str) or value not in ITEMSIZE:
        raise ManifestError(f"{where}: unknown dtype {value!r}")
    return str(value)


def _hexdigest(value: Any, length: int, where: str) -> str:
    if not isinstance(value, str) or len(value) != length or any(c not in "0123456789abcdef" for c in value):
        raise ManifestError(f"{where}: invalid checksum {value!r}")
    return value


def _header(value: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{where}: header is not valid UTF-8") from None
    return value


def _tensor(obj: Any, where: str, version: int) -> TensorEntry:
    r = _Reader(obj, where)
    name = r.get("name", str)
    where = r.where = f"{where} {name}"
    dtype = _dtype(r.get("dtype", str), where)
    shape = _shape(r.get("shape", list), where)
    xxh3 = _hexdigest(r.get("xxh3", str), 32, where)
    method = r.get("method", str)
    if method not in METHODS:
        raise ManifestError(f"{where}: unknown method {method!r}")
    base = None
    base_obj = r.get("base", dict, optional=True)
    if base_obj is not None:
        b = _Reader(base_obj, f"{where} base")
        base = BaseTensor(
            b.get("name", str),
            _dtype(b.get("dtype", str), where),
            _shape(b.get("shape", list), where),
            _hexdigest(b.get("xxh3", str), 32, where),
        )
        b.done()
    xor_bytes = r.get("xor_bytes", int)
    frames_obj = r.get("frames", list)
    frames = []
    for fr in frames_obj:
        if not (isinstance(fr, list) and len(fr) == 2 and all(isinstance(v, int) and v >= 0 for v in fr)):
            raise ManifestError(f"{where}: invalid frame {fr!r}")
        frames.append((fr[0], fr[1]))
    coding = r.get("coding", str) if version >= CODING_VERSION else LITERAL_XOR
    if coding not in CODINGS:
        raise ManifestError(
            f"{where}: unknown coding {coding!r}",
            "the delta is damaged, or was made by a newer xorweights: pip install -U xorweights",
        )
    r.done()
    entry = TensorEntry(name, dtype, shape, xxh3, method, base, xor_bytes, tuple(frames), coding)
    decoded = sum(raw for _, raw in frames)
    if decoded != entry.nbytes:
        raise ManifestError(f"{where}: frames decode to {decoded} bytes, the tensor has {entry.nbytes}")
    if base is not None and not can_cast(base.dtype, dtype):
        raise ManifestError(f"{where}: a {base.dtype} base tensor cannot stand in for {dtype}")
    if xor_bytes != _expected_xor_bytes(entry):
        raise ManifestError(f"{where}: method {method!r} with xor_bytes {xor_bytes} does not fit its base")
    return entry


def _expected_xor_bytes(t: TensorEntry) -> int | None:
    """How many leading bytes the base can cover, or None when the pairing is invalid."""
    if t.method == "raw":
        return 0 if t.base is None else None
    b = t.base
    if b is None or len(b.shape) != len(t.shape):
        return None
    if t.method == "xor":
        return t.nbytes if b.shape == t.shape else None
    if not t.shape or b.shape[1:] != t.shape[1:] or not t.shape[0]:
        return None
    return t.nbytes // t.shape[0] * min(t.shape[0], b.shape[0])


def parse_weight_file(obj: Any, where: str, version: int = DELTA_VERSION) -> WeightFile:
    """Validate one ``weight_files`` entry of a format ``version`` manifest (also used for encode's resume records)."""
    w = _Reader(obj, where)
    name = check_relpath(w.get("name", str), w.where, suffix=".safetensors")
    w.where = f"{w.where} {name}"
    wf = WeightFile(
        name,
        w.get("size", int),
        _hexdigest(w.get("sha256", str), 64, w.where),
        _header(w.get("header", str), w.where),
        check_relpath(w.get("data_file", str), w.where, suffix=DATA_SUFFIX),
        tuple(_tensor(t, f"{w.where} tensor", version) for t in w.get("tensors", list)),
    )
    w.done()
    return wf


def parse_manifest(text: str, where: str) -> Manifest:
    """Parse and validate a delta manifest."""
    try:
        obj = load_json(text, where)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{where}: not valid JSON ({type(exc).__name__}: {exc})") from None
    r = _Reader(obj, where)
    if r.get("format", str) != DELTA_FORMAT:
        raise ManifestError(f"{where}: not an xorweights delta manifest")
    version = r.get("format_version", int)
    if version > DELTA_VERSION:
        raise ManifestError(
            f"{where}: format version {version} was made by a newer xorweights (this one reads up to {DELTA_VERSION})",
            "upgrade: pip install -U xorweights",
        )
    if version < 1:
        raise ManifestError(f"{where}: invalid format version {version}")
    tool_version = r.get("tool_version", str)
    b = _Reader(r.get("base", dict), f"{where} base")
    base = BaseRef(b.get("description", str), b.get("repo_id", str, True), b.get("revision", str, True))
    b.done()
    compression = r.get("compression", str)
    if compression not in ("zstd", "none"):
        raise ManifestError(f"{where}: unknown compression {compression!r}")
    frame_bytes = r.get("frame_bytes", int)
    weight_files = []
    tensor_names: set[str] = set()
    for i, wf_obj in enumerate(r.get("weight_files", list)):
        wf = parse_weight_file(wf_obj, f"{where} weight_files[{i}]", version)
        for t in wf.tensors:
            if t.name in tensor_names:
                raise ManifestError(f"{where}: tensor {t.name!r} is listed twice")
            tensor_names.add(t.name)
        weight_files.append(wf)
    other_files = []
    for i, of_obj in enumerate(r.get("other_files", list)):
        o = _Reader(of_obj, f"{where} other_files[{i}]")
        of = OtherFile(
            check_relpath(o.get("name", str), o.where, allow_dirs=True),
            o.get("size", int),
            _hexdigest(o.get("sha256", str), 64, o.where),
            o.get("mode", str),
        )
        o.done()
        if of.mode not in ("reference", "ship"):
            raise ManifestError(f"{o.where}: unknown mode {of.mode!r}")
        other_files.append(of)
    names = [f.name for f in weight_files] + [f.name for f in other_files]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: a file is listed twice")
    exposure = None
    if version >= 2:
        e = _Reader(r.get("exposure", dict), f"{where} exposure")
        pct = e.get("max_unprotected_pct", (int, float))
        if not 0 <= pct <= 100:
            raise ManifestError(f"{e.where}: max_unprotected_pct {pct} is not a percentage")
        exposure = ExposureRecord(e.get("allowed", bool), float(pct), e.get("unprotected_bytes", int))
        e.done()
        actual = sum(t.unprotected_bytes for f in weight_files for t in f.tensors)
        if exposure.unprotected_bytes != actual:
            raise ManifestError(
                f"{where}: exposure says {exposure.unprotected_bytes} unprotected bytes, the tensors hold {actual}"
            )
    users: dict[str, str] = {}
    for wf in weight_files:
        if wf.data_file in users:
            raise ManifestError(
                f"{where}: data file {wf.data_file} is used by both {users[wf.data_file]} and {wf.name}"
            )
        users[wf.data_file] = wf.name
    r.done()
    return Manifest(
        base, compression, frame_bytes, tuple(weight_files), tuple(other_files), tool_version, version, exposure
    )


def load_manifest(delta: Path) -> Manifest:
    path = Path(delta) / MANIFEST_NAME
    try:
        data = InputFolder(delta).read(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        hint = "run `xorweights encode` to make a delta, or point at the folder that holds " + MANIFEST_NAME
        if Path(delta).is_dir():
            raise ManifestError(f"{delta}: no {MANIFEST_NAME}; this is not a complete delta", hint) from None
        raise ManifestError(f"{delta}: no such delta folder", hint) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: cannot read ({exc})") from None
    return parse_manifest(text, str(path))


# ---------------------------------------------------------------- checksums


@dataclass(frozen=True)
class TensorSum:
    dtype: str
    shape: tuple[int, ...]
    xxh3: str


@dataclass(frozen=True)
class FileSum:
    size: int
    sha256: str


@dataclass
class Checksums:
    """Per-tensor xxh3-128 and per-file sha256 of a checkpoint folder."""

    tensors: dict[str, TensorSum] = field(default_factory=dict)
    files: dict[str, FileSum] = field(default_factory=dict)
    # What a converted folder was decoded from, so a re-run can vouch for its files:
    # {"delta": sha256 of the delta's manifest, "dtype": the --dtype}; None elsewhere.
    source: dict[str, str] | None = None

    def to_json(self) -> str:
        obj: dict[str, Any] = {
            "format": CHECKSUM_FORMAT,
            "format_version": CHECKSUM_VERSION,
            "tool_version": __version__,
            "files": {k: asdict(v) for k, v in sorted(self.files.items())},
            "tensors": {k: asdict(v) for k, v in sorted(self.tensors.items())},
        }
        if self.source is not None:
            obj["source"] = self.source
        return json.dumps(obj, indent=1) + "\n"


def load_checksums(path: Path) -> Checksums:
    where = str(path)
    try:
        text = InputFolder(path).read(Path(path), MAX_MANIFEST_BYTES).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise ManifestError(
            f"{where}: cannot read checksum manifest ({exc})", "pass a file made by `xorweights checksum`"
        ) from None
    return parse_checksums(text, where)


def parse_checksums(text: str, where: str) -> Checksums:
    """Parse and validate a checksum manifest."""
    try:
        obj = load_json(text, where)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(
            f"{where}: cannot read checksum manifest ({exc})", "pass a file made by `xorweights checksum`"
        ) from None
    r = _Reader(obj, where)
    if r.get("format", str) != CHECKSUM_FORMAT:
        raise ManifestError(
            f"{where}: not an xorweights checksum manifest", "pass a file made by `xorweights checksum`"
        )
    version = r.get("format_version", int)
    if version > CHECKSUM_VERSION:
        raise ManifestError(f"{where}: made by a newer xorweights", "upgrade: pip install -U xorweights")
    r.get("tool_version", str)
    out = Checksums()
    for name, t in r.get("tensors", dict).items():
        tr = _Reader(t, f"{where} tensor {name}")
        out.tensors[name] = TensorSum(
            _dtype(tr.get("dtype", str), tr.where),
            _shape(tr.get("shape", list), tr.where),
            _hexdigest(tr.get("xxh3", str), 32, tr.where),
        )
        tr.done()
    for name, f in r.get("files", dict).items():
        check_relpath(name, where, allow_dirs=True)
        fr = _Reader(f, f"{where} file {name}")
        out.files[name] = FileSum(fr.get("size", int), _hexdigest(fr.get("sha256", str), 64, fr.where))
        fr.done()
    source = r.get("source", dict, optional=True) if version >= 2 else None
    if source is not None:
        sr = _Reader(source, f"{where} source")
        out.source = {
            "delta": _hexdigest(sr.get("delta", str), 64, sr.where),
            "dtype": _dtype(sr.get("dtype", str), sr.where),
        }
        sr.done()
    r.done()
    return out


def open_delta_file(folder: InputFolder, path: Path, size: int) -> BinaryIO:
    """A file of the delta, opened only if it is a regular file inside it of exactly the size the manifest declares."""
    try:
        f, found = folder.open(path)
    except FileNotFoundError:
        raise DeltaCorruptError(
            f"{path}: missing; the delta is incomplete", "re-download the whole delta folder"
        ) from None
    if found != size:
        f.close()
        raise DeltaCorruptError(
            f"{path}: expected {size} bytes, found {found}", "the delta is truncated or damaged; re-download it"
        )
    return f
