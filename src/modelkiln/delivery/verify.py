"""``kiln verify``: does this machine run the package as it was built to run?

Checks, in order: the manifest reads; its signature (required when a public key is given); every
file's size and SHA-256; per model and precision: the model loads, its INT8 format fits this CPU
(host), its outputs on the golden inputs are within the tolerances the manifest states (against
its own golden outputs and against FP32; golden.py says how they were derived), a repeat run is
bit-identical (determinism), 1 thread vs N threads agree within the self tolerance (threads); with
``soak_s`` a steady-state run whose latency drift and RSS growth are bounded (soak).
Models whose files fail integrity are not run: what would be measured is not what was sealed.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.delivery.crypto import ModelKey, load_encrypted_model, resolve_model_key
from modelkiln.delivery.errors import DeliveryError
from modelkiln.delivery.findings import Finding, Status
from modelkiln.delivery.golden import (
    COS_FLOOR,
    FLOAT_FLOOR,
    UNMEASURED,
    GoldenSet,
    check_outputs,
    load_golden,
    max_abs,
)
from modelkiln.delivery.manifest import (
    SIGNATURE_FILE,
    Manifest,
    ModelRecord,
    OutputTolerance,
    check_files,
    onnxruntime_version,
    read_manifest,
    resolve_in,
)
from modelkiln.delivery.signing import verify_manifest
from modelkiln.errors import ConfigError, KilnError
from modelkiln.runtime import cpu, kernels
from modelkiln.runtime.backends import Backend, BackendKind, ModelSource, load_backend
from modelkiln.runtime.backends.onnxruntime import OrtOptions

log = logging.getLogger(__name__)
#: Soak bounds: median latency of the last window vs the first, and resident memory growth after
#: warm-up. Beyond them the model is not in a steady state (a leak, throttling, a growing cache).
SOAK_MAX_DRIFT = 0.5
SOAK_MAX_RSS_GROWTH = 64 << 20
SOAK_WINDOW = 0.2  # share of the iterations in the first and in the last window
SOAK_WARMUP = 3


@dataclass(frozen=True)
class VerifyReport:
    """Everything verify found; ``ok`` only when no finding failed."""

    package: str
    backend: str
    threads: int | None
    host: str
    build_machine: str
    findings: tuple[Finding, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return not any(f.failed for f in self.findings)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.failed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "ok": self.ok,
            "backend": self.backend,
            "threads": self.threads,
            "host": self.host,
            "build_machine": self.build_machine,
            "seconds": round(self.seconds, 3),
            "counts": {s.value: sum(f.status is s for f in self.findings) for s in Status},
            "findings": [f.to_dict() for f in self.findings],
        }


def verify_package(
    package_dir: Path,
    backend: BackendKind | str = BackendKind.ONNXRUNTIME,
    threads: int | None = None,
    soak_s: float = 0.0,
    public_key: Path | None = None,
    model_key: Path | ModelKey | None = None,
) -> VerifyReport:
    """Verify ``package_dir`` on this machine (module docstring: the checks). ``model_key`` (a key
    file or a ModelKey) opens encrypted models; without it ``KILN_MODEL_KEY_FILE`` /
    ``KILN_MODEL_KEY`` are used when the package has encrypted models."""
    start = time.perf_counter()
    try:
        kind = BackendKind(backend)
    except ValueError:
        raise ConfigError(
            f"backend must be one of {[k.value for k in BackendKind]}, got {backend!r}"
        ) from None
    package_dir = Path(package_dir)
    host = cpu.cpu_info().describe()
    findings: list[Finding] = []

    def report(build: str = "unknown") -> VerifyReport:
        return VerifyReport(
            str(package_dir), kind.value, threads, host, build, tuple(findings), time.perf_counter() - start
        )

    try:
        manifest = read_manifest(package_dir)
    except KilnError as exc:
        findings.append(Finding("manifest", Status.FAIL, str(exc)))
        return report()
    findings.append(_versions(manifest))
    findings.append(_signature(package_dir, public_key))
    integrity = check_files(package_dir, manifest)
    findings.extend(integrity)
    if not any(f.failed for f in integrity):
        findings.append(Finding("integrity", Status.PASS, f"{len(manifest.files)} files match their SHA-256"))
    broken = {(f.model, f.precision) for f in integrity if f.failed and f.model}
    runner = _Runner(package_dir, kind, threads, soak_s, model_key, manifest)
    for model in manifest.model_names():
        records = manifest.records(model)
        if (model, None) in broken:
            findings.append(Finding("golden", Status.SKIP, "not run: its golden set failed integrity", model))
            continue
        golden = runner.golden(records, findings)
        for record in records:
            if (model, record.precision) in broken:
                findings.append(
                    Finding(
                        "golden", Status.SKIP, "not run: its files failed integrity", model, record.precision
                    )
                )
                continue
            findings.extend(runner.check(record, golden))
    return report(manifest.build_machine.description)


def _versions(manifest: Manifest) -> Finding:
    here = onnxruntime_version()
    if here != manifest.onnxruntime:
        return Finding(
            "manifest",
            Status.WARN,
            "ONNX Runtime differs from the build's (kernels, and so outputs, may differ)",
            expected=manifest.onnxruntime,
            got=here,
        )
    return Finding(
        "manifest",
        Status.PASS,
        f"modelkiln {manifest.modelkiln}, ONNX Runtime {here}, built {manifest.created}",
    )


def _signature(package_dir: Path, public_key: Path | None) -> Finding:
    signed = (package_dir / SIGNATURE_FILE).is_file()
    if public_key is None:
        if signed:
            return Finding(
                "signature", Status.WARN, f"{SIGNATURE_FILE} present but not checked (no public key given)"
            )
        return Finding("signature", Status.SKIP, "package not signed")
    try:
        verify_manifest(package_dir, public_key)
    except KilnError as exc:
        return Finding(
            "signature",
            Status.FAIL,
            str(exc),
            expected=f"signed by {public_key}",
            got="no signature" if not signed else "a signature that does not verify",
        )
    return Finding("signature", Status.PASS, f"manifest signed by the key of {public_key}")


class _Runner:
    """Loads and runs one record at a time, with the options verify was asked for."""

    def __init__(
        self,
        package_dir: Path,
        kind: BackendKind,
        threads: int | None,
        soak_s: float,
        model_key: Path | ModelKey | None,
        manifest: Manifest,
    ) -> None:
        self.package_dir, self.kind, self.threads = package_dir, kind, threads
        self.soak_s = soak_s / max(len(manifest.models), 1)
        self._key_arg = model_key
        self._key: ModelKey | None = None

    @property
    def exact(self) -> bool:
        """Golden outputs come from ONNX Runtime's CPU kernels: only there are they matched tightly."""
        return self.kind is BackendKind.ONNXRUNTIME

    def golden(self, records: Sequence[ModelRecord], findings: list[Finding]) -> GoldenSet | None:
        rel = next((r.golden for r in records if r.golden), None)
        model = records[0].model
        if rel is None:
            findings.append(
                Finding("golden", Status.WARN, "the package has no golden set for this model", model)
            )
            return None
        try:
            return load_golden(resolve_in(self.package_dir, rel))
        except KilnError as exc:
            findings.append(Finding("golden", Status.FAIL, str(exc), model))
            return None

    def model_key(self) -> ModelKey:
        if self._key is None:
            key = self._key_arg if isinstance(self._key_arg, ModelKey) else resolve_model_key(self._key_arg)
            if key is None:
                raise DeliveryError(
                    "the model is encrypted: give --model-key F, or set KILN_MODEL_KEY_FILE / KILN_MODEL_KEY"
                )
            self._key = key
        return self._key

    def source(self, record: ModelRecord) -> ModelSource:
        path = resolve_in(self.package_dir, record.file)
        if record.encrypted:
            return load_encrypted_model(path, self.model_key())
        return path

    def load(self, source: ModelSource, threads: int | None) -> Backend:
        options = (
            OrtOptions(providers=("CPUExecutionProvider",), intra_op_threads=threads) if self.exact else None
        )
        return load_backend(source, self.kind, options)

    def check(self, record: ModelRecord, golden: GoldenSet | None) -> list[Finding]:
        m, p = record.model, record.precision
        try:
            source = self.source(record)
            backend = self.load(source, self.threads)
        except KilnError as exc:
            return [
                Finding(
                    "load", Status.FAIL, str(exc), m, p, f"loads on {self.kind.value}", type(exc).__name__
                )
            ]
        found = [_host(record, backend)]
        if golden is None:
            return found
        try:
            outputs = [backend.infer(dict(feed)) for feed in golden.feeds]
        except KilnError as exc:
            return [*found, Finding("golden", Status.FAIL, f"running the golden inputs: {exc}", m, p)]
        tolerances = record.tolerances if self.exact else _loosened(record.tolerances)
        found += check_outputs(m, p, outputs, golden, tolerances)
        found.append(_determinism(record, backend, golden, outputs))
        if self.exact:
            found.append(self._threads(record, source, golden, outputs))
        if self.soak_s > 0:
            found += _soak(record, backend, golden, self.soak_s)
        return found

    def _threads(
        self,
        record: ModelRecord,
        source: ModelSource,
        golden: GoldenSet,
        outputs: Sequence[Mapping[str, np.ndarray]],
    ) -> Finding:
        """1 thread vs N threads (N: --threads, or every core when that is unset or 1), within the
        self tolerance of each output (bit-identical is reported as such)."""
        m, p = record.model, record.precision
        many = self.threads if self.threads and self.threads > 1 else os.cpu_count() or 1
        if many == 1:
            return Finding("threads", Status.SKIP, "one core: nothing to compare", m, p)
        other = many if self.threads == 1 else 1
        try:
            backend = self.load(source, other)
            alt = [backend.infer(dict(feed)) for feed in golden.feeds]
        except KilnError as exc:
            return Finding("threads", Status.FAIL, f"loading with {other} thread(s): {exc}", m, p)
        bound = {t.output: t.self_max_abs for t in record.tolerances}
        worst: tuple[float, str, float] = (-1.0, "", 0.0)  # (share of the bound, output, max-abs)
        identical = True
        for a, b in zip(alt, outputs, strict=True):
            for name, value in b.items():
                if name not in a or a[name].shape != value.shape:
                    return Finding(
                        "threads", Status.FAIL, f"output '{name}' changes shape with the thread count", m, p
                    )
                identical = identical and _same(a[name], value)
                d = max_abs(a[name], value)
                share = d / bound[name] if bound.get(name) else (0.0 if d == 0 else np.inf)
                worst = max(worst, (share, name, d))
        if identical:
            return Finding("threads", Status.PASS, f"1 vs {many} threads: bit-identical", m, p)
        share, name, d = worst
        return Finding(
            "threads",
            Status.PASS if share <= 1.0 else Status.FAIL,
            f"1 vs {many} threads: not bit-identical; output '{name}' within its self tolerance",
            m,
            p,
            f"max-abs <= {bound.get(name, 0.0):.6g}",
            f"max-abs {d:.6g}",
        )


def _loosened(tolerances: Sequence[OutputTolerance]) -> tuple[OutputTolerance, ...]:
    """For backends other than ONNX Runtime's CPU kernels the self check allows the FP32 tolerance
    (MARGIN x drift) and at least UNMEASURED float floors (e.g. TensorRT's TF32 in FP32 layers)."""
    return tuple(
        replace(
            t,
            self_cosine_min=min(t.self_cosine_min, t.fp32_cosine_min or 1.0, 1.0 - UNMEASURED * COS_FLOOR),
            self_max_abs=max(t.self_max_abs, t.fp32_max_abs or 0.0, UNMEASURED * FLOAT_FLOOR * t.scale),
        )
        for t in tolerances
    )


def _host(record: ModelRecord, backend: Backend) -> Finding:
    m, p = record.model, record.precision
    reason = cpu.unmet_requirement(backend.metadata)
    if reason is not None:
        need = (record.int8_format or {}).get("requires") or "int32_dot"
        return Finding("host", Status.FAIL, reason, m, p, f"a CPU with {need}", cpu.cpu_info().describe())
    if kernels.METADATA_KEY in backend.metadata and not kernels.available():
        return Finding(
            "host",
            Status.WARN,
            "the model asks for modelkiln's int8 lookup kernels, which this install did not build "
            "(no C compiler?): its activations run on ONNX Runtime's float path, slower",
            m,
            p,
            "the kernel library",
            "not built",
        )
    fmt = (record.int8_format or {}).get("format")
    return Finding(
        "host", Status.PASS, f"INT8 format '{fmt}' fits this CPU" if fmt else "no INT8 format needs", m, p
    )


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _determinism(
    record: ModelRecord, backend: Backend, golden: GoldenSet, outputs: Sequence[Mapping[str, np.ndarray]]
) -> Finding:
    m, p = record.model, record.precision
    again = backend.infer(dict(golden.feeds[0]))
    changed = [n for n, v in outputs[0].items() if n not in again or not _same(again[n], v)]
    if changed:
        d = max(
            max_abs(again[n], outputs[0][n])
            if n in again and again[n].shape == outputs[0][n].shape
            else np.inf
            for n in changed
        )
        return Finding(
            "determinism",
            Status.FAIL,
            f"a repeat run changed {changed}",
            m,
            p,
            "bit-identical",
            f"max-abs {d:.6g}",
        )
    return Finding("determinism", Status.PASS, "a repeat run is bit-identical", m, p)


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux /proc; None where unknown)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") if sys.platform != "win32" else None


def _soak(record: ModelRecord, backend: Backend, golden: GoldenSet, seconds: float) -> list[Finding]:
    """Run the golden inputs round-robin for ``seconds`` after a warm-up; median latency of the last
    window vs the first, and RSS growth over the run."""
    m, p = record.model, record.precision
    feeds = [dict(f) for f in golden.feeds]
    for i in range(SOAK_WARMUP):
        backend.infer(feeds[i % len(feeds)])
    rss0 = rss_bytes()
    times: list[float] = []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        backend.infer(feeds[i % len(feeds)])
        times.append((time.perf_counter() - t0) * 1e3)
        i += 1
    rss1 = rss_bytes()
    window = max(int(len(times) * SOAK_WINDOW), 1)
    if len(times) < 10:
        return [
            Finding(
                "soak", Status.SKIP, f"{len(times)} runs in {seconds:.1f} s: too few to compare windows", m, p
            )
        ]
    first, last = statistics.median(times[:window]), statistics.median(times[-window:])
    drift = last / first - 1.0 if first > 0 else 0.0
    found = [
        Finding(
            "soak",
            Status.PASS if drift <= SOAK_MAX_DRIFT else Status.FAIL,
            f"latency drift over {len(times)} runs in {seconds:.1f} s (median ms, last vs first {window} runs)",
            m,
            p,
            f"drift <= {SOAK_MAX_DRIFT:+.0%}",
            f"{first:.3f} -> {last:.3f} ms ({drift:+.1%})",
        )
    ]
    if rss0 is not None and rss1 is not None:
        growth = rss1 - rss0
        found.append(
            Finding(
                "soak",
                Status.PASS if growth <= SOAK_MAX_RSS_GROWTH else Status.FAIL,
                "resident memory growth after warm-up",
                m,
                p,
                f"<= {SOAK_MAX_RSS_GROWTH / 2**20:.0f} MiB",
                f"{growth / 2**20:+.1f} MiB",
            )
        )
    return found
