"""Sealing a package at the end of ``kiln deploy``: golden sets, tolerances, (encryption), the
manifest and its signature.

Order matters: golden outputs are computed from the plaintext models, models are then encrypted
(the plaintext removed), and only then is every file hashed, so the manifest describes exactly
what ships; the signature covers the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelkiln.delivery.crypto import ENC_SUFFIX, encrypt_model, external_locations, load_key
from modelkiln.delivery.errors import DeliveryError
from modelkiln.delivery.golden import REFERENCE, GoldenSet, derive_tolerances, save_golden
from modelkiln.delivery.manifest import (
    MODEL_SUFFIXES,
    Manifest,
    ModelRecord,
    OutputTolerance,
    build_manifest,
    excluded_by,
    int8_format_of,
    resolve_in,
    walk_package,
    write_manifest,
)
from modelkiln.delivery.signing import sign_manifest
from modelkiln.runtime.backends.onnxruntime import OrtBackend, OrtOptions

log = logging.getLogger(__name__)
GOLDEN_DIR = "golden"
CPU = ("CPUExecutionProvider",)

Feed = Mapping[str, np.ndarray]


def seal_package(
    package_dir: Path,
    models: Mapping[str, Mapping[str, Path]],
    golden_feeds: Mapping[str, Sequence[Feed]],
    sign_key: Path | None = None,
    encrypt_key: Path | None = None,
    *,
    accuracy: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    tasks: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
) -> Manifest:
    """Seal ``package_dir``; returns the manifest written to ``package_dir/manifest.json``.

    ``models``: model name -> precision -> model file inside the package ("fp32" required: the
    reference). ``golden_feeds``: model name -> a few input feeds (name -> array; real inputs,
    each may be a batch). ``accuracy``: model -> precision -> figures measured by the caller
    (copied into the manifest). ``tasks``: model -> task ("classification" adds top-1 checks).
    ``exclude``: glob patterns of package files left out of the manifest (e.g. ``"work/*"``).
    With ``encrypt_key`` every model file (and its external data) is replaced by its encrypted
    ``.enc`` form; any other plaintext model file in the package is refused. With ``sign_key``
    the manifest is signed (``manifest.json.sig``)."""
    package_dir = Path(package_dir)
    plan = _plan(package_dir, models, golden_feeds)
    if encrypt_key is not None:
        _refuse_plaintext_leftovers(package_dir, plan, exclude)
    key = load_key(encrypt_key) if encrypt_key is not None else None
    records: list[ModelRecord] = []
    for model, files in plan.items():
        task = _task(tasks, model)
        golden_rel, tolerances = _golden(package_dir, model, files, golden_feeds[model], task)
        for precision, path in files.items():
            rel = path.relative_to(package_dir.resolve()).as_posix()
            fmt = int8_format_of(path)
            data = [
                str((path.parent / loc).relative_to(package_dir.resolve()).as_posix())
                for loc in _locations(path)
            ]
            encrypted = False
            if key is not None:
                written = encrypt_model(path, None, key)
                for plain in [path, *(package_dir / d for d in data)]:
                    plain.unlink()
                rel, data = _rel(package_dir, written[0]), [_rel(package_dir, w) for w in written[1:]]
                encrypted = True
            records.append(
                ModelRecord(
                    model,
                    precision,
                    rel,
                    encrypted=encrypted,
                    data_files=tuple(data),
                    task=task,
                    int8_format=fmt,
                    accuracy=plain_json(dict((accuracy or {}).get(model, {}).get(precision, {}))),
                    golden=golden_rel,
                    tolerances=tolerances[precision],
                )
            )
    manifest = build_manifest(package_dir, records, exclude)
    write_manifest(manifest, package_dir)
    if sign_key is not None:
        sign_manifest(package_dir, sign_key)
    log.info(
        "sealed %s: %d files, %d model precisions%s%s",
        package_dir,
        len(manifest.files),
        len(records),
        ", encrypted" if key is not None else "",
        ", signed" if sign_key is not None else "",
    )
    return manifest


def _plan(
    package_dir: Path, models: Mapping[str, Mapping[str, Path]], feeds: Mapping[str, Sequence[Feed]]
) -> dict[str, dict[str, Path]]:
    """Resolved model files per model; checks the reference, the feeds and that files lie inside."""
    if not package_dir.is_dir():
        raise DeliveryError(f"package folder not found: {package_dir}")
    root = package_dir.resolve()
    plan: dict[str, dict[str, Path]] = {}
    for model, files in models.items():
        if REFERENCE not in files:
            raise DeliveryError(f"{model}: no '{REFERENCE}' model; golden outputs are measured against it")
        if not feeds.get(model):
            raise DeliveryError(f"{model}: no golden feeds given")
        plan[model] = {}
        for precision, path in files.items():
            p = Path(path)
            if not p.is_absolute() and not p.exists():
                p = package_dir / p  # relative to the package
            resolved = p.resolve()
            if not resolved.is_relative_to(root):
                raise DeliveryError(f"{model}/{precision}: {path} is not inside the package {package_dir}")
            resolved = resolve_in(package_dir, resolved.relative_to(root).as_posix())
            if not resolved.is_file():
                raise DeliveryError(f"{model}/{precision}: model file not found: {resolved}")
            plan[model][precision] = resolved
    return plan


def _refuse_plaintext_leftovers(
    package_dir: Path, plan: Mapping[str, Mapping[str, Path]], exclude: Sequence[str]
) -> None:
    """An encrypted package ships no plaintext model: model files it would leave behind are refused."""
    root = package_dir.resolve()
    sealed = set()
    for files in plan.values():
        for path in files.values():
            sealed.add(path.relative_to(root).as_posix())
            sealed.update((path.parent / loc).relative_to(root).as_posix() for loc in _locations(path))
    plaintext = [
        rel
        for rel, _ in walk_package(package_dir)
        if rel not in sealed and rel.endswith(MODEL_SUFFIXES) and not rel.endswith(ENC_SUFFIX)
    ]
    leftovers = [rel for rel in plaintext if not excluded_by(rel, exclude)]
    if leftovers:
        raise DeliveryError(
            f"encrypting {package_dir}: plaintext model files would stay in the package: "
            f"{', '.join(leftovers[:5])}{' …' if len(leftovers) > 5 else ''} (remove them or exclude them)"
        )
    excluded = [rel for rel in plaintext if rel not in leftovers]
    if excluded:
        log.warning(
            "%s holds %d plaintext model files outside the sealed package (%s): do not ship them",
            package_dir,
            len(excluded),
            ", ".join(excluded[:3]) + (" …" if len(excluded) > 3 else ""),
        )


def plain_json(value: Any) -> Any:
    """``value`` as plain JSON types (the caller's accuracy figures go into the manifest):
    dataclasses become objects, numpy scalars and arrays numbers and lists, NaN and infinities
    None, other objects their str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_json(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain_json(value.tolist())
    if isinstance(value, np.generic):
        return plain_json(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _locations(path: Path) -> tuple[str, ...]:
    return external_locations(onnx.load(os.fspath(path), load_external_data=False))


def _rel(package_dir: Path, path: Path) -> str:
    return path.resolve().relative_to(package_dir.resolve()).as_posix()


def _task(tasks: Mapping[str, Any] | None, model: str) -> str | None:
    task = (tasks or {}).get(model)
    if task is None:
        return None
    return str(getattr(task, "value", task))


def golden_name(model: str) -> str:
    """A file name for a model's golden set."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", model).lstrip(".") or "model"


def _golden(
    package_dir: Path, model: str, files: Mapping[str, Path], feeds: Sequence[Feed], task: str | None
) -> tuple[str, dict[str, tuple[OutputTolerance, ...]]]:
    """Run every precision on ``feeds`` (ONNX Runtime, CPU), write the golden set; returns its
    relative path and each precision's tolerances."""
    inputs = [{k: np.ascontiguousarray(v) for k, v in feed.items()} for feed in feeds]
    outs: dict[str, tuple[dict[str, np.ndarray], ...]] = {}
    names: tuple[str, ...] = ()
    input_names: tuple[str, ...] = ()
    for precision, path in files.items():
        backend = OrtBackend.load(path, OrtOptions(providers=CPU))
        if precision == REFERENCE:
            names = tuple(m.name for m in backend.output_metadata)
            input_names = tuple(m.name for m in backend.input_metadata)
        outs[precision] = tuple(backend.infer(dict(feed)) for feed in inputs)
    golden = GoldenSet(
        model,
        input_names,
        names,
        tuple({n: feed[n] for n in input_names} for feed in inputs),
        outs[REFERENCE],
        {p: tuple({n: o[n] for n in names if n in o} for o in own) for p, own in outs.items()},
    )
    for p, own in golden.precisions.items():
        missing = [n for n in names if n not in own[0]]
        if missing:
            raise DeliveryError(f"{model}/{p}: outputs {missing} of the {REFERENCE} model are missing")
    rel = f"{GOLDEN_DIR}/{golden_name(model)}.npz"
    save_golden(package_dir / rel, golden)
    classifier = task == "classification"
    tolerances = {
        p: derive_tolerances(golden.reference, own, names, classifier, is_reference=p == REFERENCE)
        for p, own in golden.precisions.items()
    }
    return rel, tolerances
