"""``manifest.json``: what a delivered package holds and what it was measured to do.

Every file with its SHA-256 and size (paths relative, POSIX, never absolute and never ``..``), the
modelkiln and ONNX Runtime versions and the build machine (CPU, INT8 instruction sets, cores), and
per model and precision: the model file, its INT8 format (from the file's own metadata), the
accuracy the build measured, the golden set and the tolerances derived for it (see golden.py).
Signing the manifest (signing.py) seals every file it lists.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import json
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import onnx

import modelkiln
from modelkiln.delivery.errors import DeliveryError, IntegrityError, ManifestError
from modelkiln.delivery.findings import Finding, Status
from modelkiln.runtime.cpu import (
    INT8_ACTIVATIONS_KEY,
    INT8_FORMAT_KEY,
    INT8_REQUIRES_KEY,
    INT8_WEIGHTS_KEY,
    cpu_info,
)

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.json.sig"
FORMAT = "modelkiln.package/1"
#: Files that hold a model or its weights: an unlisted one in a package is reported (as a warning).
MODEL_SUFFIXES = (".onnx", ".onnx.enc", ".onnx.data", ".onnx.data.enc", ".data.enc", ".engine", ".plan")
_CHUNK = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class FileEntry:
    """One file of the package: path relative to the package root (POSIX), SHA-256 and size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class OutputTolerance:
    """How far one output of one precision may move on a target (derived in golden.py).

    ``self_*`` bound the difference to this precision's own golden outputs (a faithful rerun
    differs only by float rounding); ``fp32_*`` bound the difference to the FP32 reference outputs
    (what the precision was measured to cost, with a margin); ``measured_*`` are those build-machine
    figures; ``top1_min`` is the least top-1 agreement with FP32 (classifiers only)."""

    output: str
    self_cosine_min: float
    self_max_abs: float
    fp32_cosine_min: float | None  # None: not comparable to FP32 (shapes differ, e.g. detections)
    fp32_max_abs: float | None
    measured_cosine: float | None
    measured_max_abs: float | None
    top1_min: float | None = None
    measured_top1: float | None = None
    scale: float = 0.0  # largest |FP32 value| on the golden inputs (floors are relative to it)


@dataclass(frozen=True)
class ModelRecord:
    """One precision of one model in the package."""

    model: str
    precision: str
    file: str  # the model file, relative: model.onnx, or model.onnx.enc when encrypted (crypto.py)
    encrypted: bool = False
    data_files: tuple[str, ...] = ()  # external-data weights beside it (encrypted when it is)
    task: str | None = None  # "classification" adds top-1 checks
    int8_format: dict[str, str] | None = None  # modelkiln.int8.* metadata of the file (None: not INT8)
    accuracy: dict[str, Any] = field(default_factory=dict)  # what the build measured (caller's figures)
    golden: str | None = None  # the golden set (.npz) shared by the model's precisions
    tolerances: tuple[OutputTolerance, ...] = ()


@dataclass(frozen=True)
class BuildMachine:
    """The machine the golden outputs and tolerances were measured on."""

    description: str
    cpu_model: str
    arch: str
    int8_flags: tuple[str, ...]
    int32_dot: bool
    cores: int

    @classmethod
    def this(cls) -> BuildMachine:
        info = cpu_info()
        return cls(
            info.describe(),
            info.model,
            info.arch,
            tuple(info.int8_flags()),
            info.int32_dot,
            os.cpu_count() or 1,
        )


@dataclass(frozen=True)
class Manifest:
    """The whole manifest; ``to_json``/``from_json`` round-trip exactly."""

    files: tuple[FileEntry, ...]
    models: tuple[ModelRecord, ...]
    build_machine: BuildMachine
    modelkiln: str = modelkiln.__version__
    onnxruntime: str = "unknown"
    created: str = ""
    excluded: tuple[str, ...] = ()  # glob patterns of files deliberately left out (not warned about)
    format: str = FORMAT

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    def model_names(self) -> list[str]:
        """Model names in manifest order, each once."""
        return list(dict.fromkeys(r.model for r in self.models))

    def records(self, model: str) -> list[ModelRecord]:
        return [r for r in self.models if r.model == model]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created": self.created,
            "modelkiln": self.modelkiln,
            "onnxruntime": self.onnxruntime,
            "build_machine": {**vars(self.build_machine), "int8_flags": list(self.build_machine.int8_flags)},
            "excluded": list(self.excluded),
            "files": [vars(f) for f in self.files],
            "models": [_record_dict(r) for r in self.models],
        }

    def to_json(self) -> str:
        """Stable JSON (fixed key order, no NaN): the bytes that are hashed and signed."""
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_FILE) -> Manifest:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{source}: not valid JSON ({exc})") from None
        return _parse(_Reader(source), data)


def _record_dict(r: ModelRecord) -> dict[str, Any]:
    d = dict(vars(r))
    d["data_files"] = list(r.data_files)
    d["tolerances"] = [vars(t) for t in r.tolerances]
    return d


def onnxruntime_version() -> str:
    """The installed ONNX Runtime's version, read from package metadata (no import of the library)."""
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


# --- building -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def excluded_by(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def walk_package(package_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, path) of every entry under ``package_dir`` except the manifest and its
    signature, sorted; directories are descended, symbolic links are returned (never followed)."""
    for root, dirs, files in os.walk(package_dir, followlinks=False):
        dirs.sort()
        base = Path(root)
        links = [d for d in dirs if (base / d).is_symlink()]
        for name in sorted([*files, *links]):
            path = base / name
            rel = path.relative_to(package_dir).as_posix()
            if rel not in (MANIFEST_FILE, SIGNATURE_FILE):
                yield rel, path


def int8_format_of(path: Path) -> dict[str, str] | None:
    """The modelkiln.int8.* metadata of an ONNX file (weights are not read); None for a model
    without an INT8 format."""
    props = {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props}
    if INT8_FORMAT_KEY not in props:
        return None
    keys = {
        "format": INT8_FORMAT_KEY,
        "weights": INT8_WEIGHTS_KEY,
        "activations": INT8_ACTIVATIONS_KEY,
        "requires": INT8_REQUIRES_KEY,
    }
    return {name: props.get(key, "unknown") for name, key in keys.items()}


def build_manifest(
    package_dir: Path,
    models: Sequence[ModelRecord],
    exclude: Sequence[str] = (),
    created: str | None = None,
) -> Manifest:
    """Hash every file under ``package_dir`` (but the manifest, its signature and ``exclude`` glob
    patterns, matched against relative POSIX paths, e.g. ``"work/*"``) and describe ``models``.

    A record's INT8 format is read from its (plaintext) file when the record has none. Symbolic
    links are refused: a package is copied to machines where a link could point anywhere."""
    package_dir = Path(package_dir)
    if not package_dir.is_dir():
        raise DeliveryError(f"package folder not found: {package_dir}")
    entries = []
    for rel, path in walk_package(package_dir):
        if excluded_by(rel, exclude):
            continue
        if path.is_symlink():
            raise DeliveryError(
                f"{package_dir}: '{rel}' is a symbolic link; a package holds plain files only"
            )
        entries.append(FileEntry(rel, sha256_file(path), path.stat().st_size))
    listed = {e.path for e in entries}
    records = []
    for r in models:
        for key, rel in _record_paths(r):
            _check_relpath(rel, f"{r.model}/{r.precision} {key}", DeliveryError)
            if rel not in listed:
                raise DeliveryError(
                    f"{r.model}/{r.precision}: {key} '{rel}' is not a file of the package {package_dir}"
                    + (" (it matches an exclude pattern)" if excluded_by(rel, exclude) else "")
                )
        try:
            json.dumps(r.accuracy, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise DeliveryError(f"{r.model}/{r.precision}: accuracy is not plain JSON ({exc})") from None
        if r.int8_format is None and not r.encrypted:
            r = replace(r, int8_format=int8_format_of(package_dir / r.file))
        records.append(r)
    stamp = created if created is not None else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Manifest(
        tuple(entries),
        tuple(records),
        BuildMachine.this(),
        onnxruntime=onnxruntime_version(),
        created=stamp,
        excluded=tuple(exclude),
    )


def _record_paths(r: ModelRecord) -> Iterable[tuple[str, str]]:
    yield "file", r.file
    for d in r.data_files:
        yield "data file", d
    if r.golden is not None:
        yield "golden", r.golden


def write_manifest(manifest: Manifest, package_dir: Path) -> Path:
    path = Path(package_dir) / MANIFEST_FILE
    path.write_text(manifest.to_json(), encoding="utf-8")
    return path


def read_manifest(package_dir: Path) -> Manifest:
    """The manifest of ``package_dir`` (a folder, or the manifest file itself)."""
    path = Path(package_dir)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_FILE} in {path.parent}: not a sealed package (kiln deploy writes one)"
        )
    return Manifest.from_json(path.read_bytes(), str(path))


# --- checking -------------------------------------------------------------------------------


def resolve_in(package_dir: Path, rel: str) -> Path:
    """``package_dir/rel``, refused when ``rel`` is not a safe relative path or a link leads out."""
    _check_relpath(rel, "path", DeliveryError)
    root = Path(package_dir).resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise DeliveryError(f"'{rel}' leads outside the package {package_dir}")
    return path


def check_files(package_dir: Path, manifest: Manifest) -> list[Finding]:
    """Integrity findings (only problems): a missing file, a changed size or byte (naming the
    file, and the model and precision it belongs to) are failures; a model file in the package
    that the manifest does not list is a warning (it is not what was sealed, but nothing listed
    loads it)."""
    package_dir = Path(package_dir)
    owners = file_owners(manifest)
    found: list[Finding] = []
    for entry in manifest.files:
        problem = _check_entry(package_dir, entry)
        if problem is not None:
            message, expected, got = problem
            model, precision = owners.get(entry.path, (None, None))
            found.append(
                Finding("integrity", Status.FAIL, f"{entry.path}: {message}", model, precision, expected, got)
            )
    listed = {e.path for e in manifest.files}
    for rel, _ in walk_package(package_dir):
        if rel in listed or excluded_by(rel, manifest.excluded):
            continue
        if rel.endswith(MODEL_SUFFIXES):
            found.append(
                Finding("integrity", Status.WARN, f"'{rel}' is a model file the manifest does not list")
            )
    return found


def file_owners(manifest: Manifest) -> dict[str, tuple[str, str | None]]:
    """Package path -> (model, precision) for model and data files, (model, None) for golden sets."""
    owners: dict[str, tuple[str, str | None]] = {}
    for r in manifest.models:
        owners[r.file] = (r.model, r.precision)
        owners.update({d: (r.model, r.precision) for d in r.data_files})
        if r.golden is not None:
            owners[r.golden] = (r.model, None)
    return owners


def _check_entry(package_dir: Path, entry: FileEntry) -> tuple[str, str, str] | None:
    """(problem, expected, got) for a file that is not as listed, else None."""
    try:
        path = resolve_in(package_dir, entry.path)
    except DeliveryError:
        return "leads outside the package", "a file inside the package", "a path outside it"
    if (package_dir / entry.path).is_symlink():
        return "is a symbolic link", "a plain file", "a link"
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing file", f"{entry.size} bytes, sha256 {entry.sha256}", "no such file"
    if not stat.S_ISREG(st.st_mode):
        return "not a plain file", "a plain file", "a folder or device"
    if st.st_size != entry.size:
        return "size changed", f"{entry.size} bytes", f"{st.st_size} bytes"
    digest = sha256_file(path)
    if digest != entry.sha256:
        return "content changed (a byte differs)", f"sha256 {entry.sha256}", f"sha256 {digest}"
    return None


def find_manifest(path: Path, levels: int = 6) -> Path | None:
    """The package folder holding ``path``: the nearest parent (at most ``levels`` up) with a
    manifest.json (a deploy's model sits at ``OUT/repository/<name>/<version>/model.onnx``)."""
    folder = Path(path).resolve().parent
    for _ in range(levels):
        if (folder / MANIFEST_FILE).is_file():
            return folder
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def check_file_against_manifest(path: Path, package_dir: Path | None = None) -> FileEntry | None:
    """For a server about to load ``path``: raise IntegrityError when the package manifest lists
    the file with another SHA-256 or size; the entry when it matches; None when no manifest is
    found or it does not list the file (the caller decides whether that is acceptable)."""
    package_dir = package_dir or find_manifest(path)
    if package_dir is None:
        return None
    manifest = read_manifest(package_dir)
    rel = Path(path).resolve().relative_to(Path(package_dir).resolve()).as_posix()
    entry = manifest.file(rel)
    if entry is None:
        return None
    problem = _check_entry(Path(package_dir), entry)
    if problem is not None:
        message, expected, got = problem
        raise IntegrityError(
            f"{path}: {message} against {package_dir / MANIFEST_FILE} (expected {expected}, got {got})"
        )
    return entry


# --- reading with errors that name the key ---------------------------------------------------


def _check_relpath(rel: str, key: str, error: type[DeliveryError]) -> None:
    """Refuse absolute paths, drive letters, backslashes, empty parts, ``.`` and ``..``."""
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\0" in rel
        or (len(rel) > 1 and rel[1] == ":")
        or any(p in ("", ".", "..") for p in parts)
        or PurePosixPath(rel).is_absolute()
    ):
        raise error(
            f"{key} '{rel}' is not a relative path inside the package (absolute, '..' or empty parts)"
        )


class _Reader:
    """Typed access to parsed JSON; errors say ``source: key 'models[1].file' ...``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.source}: key '{key}' {problem}")

    def obj(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"must be an object, got {type(value).__name__}")
        return value

    def get(
        self,
        obj: dict[str, Any],
        key: str,
        where: str,
        kind: type[T] | tuple[type, ...],
        optional: bool = False,
    ) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj:
            if optional:
                return None
            raise self.error(name, "is missing")
        value = obj[key]
        if value is None and optional:
            return None
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.error(name, f"must be {_kind_name(kind)}, got bool")
        if not isinstance(value, kind):
            raise self.error(name, f"must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def path(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"must be a string path, got {type(value).__name__}")
        _check_relpath(value, f"{self.source}: key '{key}'", ManifestError)
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "must be a list of strings")
        return tuple(value)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = [k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,))]
    return {"str": "a string", "int": "an integer", "dict": "an object", "list": "a list"}.get(
        "|".join(names), " or ".join(names)
    )


_NUM = (int, float)


def _parse(rd: _Reader, data: Any) -> Manifest:
    top = rd.obj(data, "(top level)")
    fmt = rd.get(top, "format", "", str)
    if fmt != FORMAT:
        raise rd.error("format", f"is '{fmt}', this modelkiln reads '{FORMAT}'")
    bm = rd.obj(rd.get(top, "build_machine", "", dict), "build_machine")
    machine = BuildMachine(
        rd.get(bm, "description", "build_machine", str),
        rd.get(bm, "cpu_model", "build_machine", str),
        rd.get(bm, "arch", "build_machine", str),
        rd.strings(rd.get(bm, "int8_flags", "build_machine", list), "build_machine.int8_flags"),
        rd.get(bm, "int32_dot", "build_machine", bool),
        rd.get(bm, "cores", "build_machine", int),
    )
    files = []
    seen: set[str] = set()
    for i, item in enumerate(rd.get(top, "files", "", list)):
        where = f"files[{i}]"
        f = rd.obj(item, where)
        rel = rd.path(rd.get(f, "path", where, str), f"{where}.path")
        if rel in seen:
            raise rd.error(f"{where}.path", f"lists '{rel}' twice")
        seen.add(rel)
        digest = rd.get(f, "sha256", where, str)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise rd.error(f"{where}.sha256", "must be 64 lowercase hex digits")
        size = rd.get(f, "size", where, int)
        if size < 0:
            raise rd.error(f"{where}.size", "must be >= 0")
        files.append(FileEntry(rel, digest, size))
    records = [_parse_record(rd, item, i, seen) for i, item in enumerate(rd.get(top, "models", "", list))]
    return Manifest(
        tuple(files),
        tuple(records),
        machine,
        modelkiln=rd.get(top, "modelkiln", "", str),
        onnxruntime=rd.get(top, "onnxruntime", "", str),
        created=rd.get(top, "created", "", str),
        excluded=rd.strings(rd.get(top, "excluded", "", list), "excluded"),
        format=fmt,
    )


def _number(rd: _Reader, obj: dict[str, Any], key: str, where: str) -> float | None:
    value = rd.get(obj, key, where, _NUM, optional=True)
    return None if value is None else float(value)


def _parse_record(rd: _Reader, item: Any, i: int, listed: set[str]) -> ModelRecord:
    where = f"models[{i}]"
    m = rd.obj(item, where)

    def listed_path(key: str, value: Any) -> str:
        rel = rd.path(value, key)
        if rel not in listed:
            raise rd.error(key, f"names '{rel}', which is not among the manifest's files")
        return rel

    fmt = rd.get(m, "int8_format", where, dict, optional=True)
    if fmt is not None and not all(isinstance(v, str) for v in fmt.values()):
        raise rd.error(f"{where}.int8_format", "must map names to strings")
    golden = rd.get(m, "golden", where, str, optional=True)
    tolerances = []
    for j, t in enumerate(rd.get(m, "tolerances", where, list)):
        tw = f"{where}.tolerances[{j}]"
        t = rd.obj(t, tw)
        tolerances.append(
            OutputTolerance(
                output=rd.get(t, "output", tw, str),
                self_cosine_min=float(rd.get(t, "self_cosine_min", tw, _NUM)),
                self_max_abs=float(rd.get(t, "self_max_abs", tw, _NUM)),
                fp32_cosine_min=_number(rd, t, "fp32_cosine_min", tw),
                fp32_max_abs=_number(rd, t, "fp32_max_abs", tw),
                measured_cosine=_number(rd, t, "measured_cosine", tw),
                measured_max_abs=_number(rd, t, "measured_max_abs", tw),
                top1_min=_number(rd, t, "top1_min", tw),
                measured_top1=_number(rd, t, "measured_top1", tw),
                scale=_number(rd, t, "scale", tw) or 0.0,
            )
        )
    return ModelRecord(
        model=rd.get(m, "model", where, str),
        precision=rd.get(m, "precision", where, str),
        file=listed_path(f"{where}.file", rd.get(m, "file", where, str)),
        encrypted=rd.get(m, "encrypted", where, bool),
        data_files=tuple(
            listed_path(f"{where}.data_files[{k}]", d)
            for k, d in enumerate(rd.strings(rd.get(m, "data_files", where, list), f"{where}.data_files"))
        ),
        task=rd.get(m, "task", where, str, optional=True),
        int8_format=None if fmt is None else {str(k): str(v) for k, v in fmt.items()},
        accuracy=rd.get(m, "accuracy", where, dict),
        golden=None if golden is None else listed_path(f"{where}.golden", golden),
        tolerances=tuple(tolerances),
    )
