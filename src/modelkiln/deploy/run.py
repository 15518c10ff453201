"""``kiln deploy``: export -> optimize -> FP16 / INT8 -> compare -> evaluate -> bench -> serve-ready
repository, Triton repository and a report. Every stage is timed and shown; a failing stage stops
the run with its name and keeps (and lists) what the earlier stages wrote."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import BadInput, KilnError, MissingDependency
from modelkiln.onnx_io import model_bytes
from modelkiln.zoo import ZooModel

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")
INT8_CPUS = ("portable", "u8", "vnni", "native")


class DeployError(KilnError):
    """A stage failed; the message names it and where the partial results are."""


@dataclass
class DeployOptions:
    model: str
    out: Path
    weights: str | None = None
    calib: Path | None = None
    eval_data: Path | None = None
    labels: Path | None = None
    precisions: tuple[str, ...] = PRECISIONS
    max_drop: float | None = None
    target: str = "cpu"
    bench_seconds: float = 3.0
    calib_size: int = 100
    eval_limit: int | None = None
    command: str = ""
    cpu: str = "portable"  # INT8 format (quant.config.Int8Cpu): portable, u8, vnni or native

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or "fp32" not in self.precisions:
            raise BadInput(f"--precision takes fp32 (required), fp16, int8; got {','.join(self.precisions)}")
        if self.max_drop is not None and self.eval_data is None:
            raise BadInput("--max-drop needs --eval DIR: the data the accuracy drop is measured on")
        if self.target not in ("cpu", "trt"):
            raise BadInput(f"--target must be cpu or trt, got {self.target!r}")
        if self.cpu not in INT8_CPUS:
            raise BadInput(f"--cpu must be one of {', '.join(INT8_CPUS)}, got {self.cpu!r}")


def measured_on() -> dict[str, Any]:
    """This CPU and its INT8 instruction sets: every figure of a deployment was measured here."""
    from modelkiln.runtime.cpu import cpu_info

    info = cpu_info()
    return {"description": info.describe(), **info.to_dict()}


def metadata_props(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props (weights in external files are not read)."""
    import onnx

    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def int8_format(props: dict[str, str], requested: str | None = None) -> dict[str, str]:
    """The INT8 format as the written model's metadata states it (the truth of the file, whatever
    was asked); "unknown" where a key is absent."""
    from modelkiln.quant.formats import format_fields

    found = format_fields(props)
    return {**found, "requested": requested} if requested else found


@dataclass
class DeploySummary:
    model: str
    zoo: str | None
    task: str | None
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds, in order
    files: dict[str, str] = field(default_factory=dict)
    precisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    optimize: dict[str, Any] = field(default_factory=dict)
    int8: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failed: str | None = None
    command: str = ""
    cpu: dict[str, Any] = field(default_factory=measured_on)  # the CPU every figure comes from
    int8_format: dict[str, str] = field(default_factory=dict)  # from the INT8 file's metadata

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Stages:
    """Runs named stages with timing and progress, saving summary.json after each."""

    def __init__(self, summary: DeploySummary, out: Path, status: Any = None) -> None:
        self.summary, self.out, self.status = summary, out, status

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.status is not None:
            self.status(f"{name}…")
        log.info("stage %s", name)
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.summary.failed = f"{name}: {exc}"
            self.save()
            kept = ", ".join(sorted(self.summary.files)) or "nothing yet"
            raise DeployError(f"stage '{name}' failed: {exc} (kept in {self.out}: {kept})") from exc
        self.summary.stages[name] = time.perf_counter() - start
        self.save()

    def save(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary.to_dict(), indent=1, default=str))


def deploy(opts: DeployOptions, status: Any = None) -> DeploySummary:
    """Run every stage; returns the summary also written to ``OUT/summary.json``."""
    if Path(opts.model).suffix != ".onnx":
        from modelkiln import zoo

        entry = zoo.get(opts.model)
        if entry.task == "generation":  # a chat model: its own stages (deploy/genai.py)
            from modelkiln.deploy.genai import deploy_genai

            return deploy_genai(opts, entry, status)
    out = opts.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    summary = DeploySummary(opts.model, None, None, command=opts.command)
    stage = Stages(summary, out, status)
    models: dict[str, Path] = {}
    with stage("export"):
        exported, entry = _export(opts, work)
        summary.zoo, summary.task = (entry.name, entry.task) if entry else (None, None)
        summary.files["exported"] = str(exported)
    with stage("optimize"):
        from modelkiln.graph import optimize

        result = optimize(exported, work / "fp32.onnx")
        summary.optimize = {
            "before": vars(result.before),
            "after": vars(result.after),
            "rewrites": result.rewrites,
        }
        models["fp32"] = work / "fp32.onnx"
        summary.files["fp32"] = str(models["fp32"])
    calib = opts.calib
    with stage("calibration data"):
        if calib is None:
            calib = _builtin_calibration(work / "calib", entry)
            summary.notes.append(
                "No --calib: calibrated on 16 crops of matplotlib's public-domain sample photo (grace_hopper.jpg). Task accuracy "
                "needs --eval data (and --labels); agreement with FP32 below is measured on those crops."
            )
    if "fp16" in opts.precisions:
        with stage("fp16"):
            models["fp16"] = _fp16(models["fp32"], work / "fp16.onnx")
            summary.files["fp16"] = str(models["fp16"])
    if "int8" in opts.precisions:
        with stage("int8"):
            models["int8"] = work / "int8.onnx"
            summary.int8 = _int8(opts, models["fp32"], models["int8"], calib, entry)
            summary.files["int8"] = str(models["int8"])
            props = metadata_props(models["int8"])
            summary.int8_format = int8_format(props, opts.cpu)
            _note_cpu_mismatch(summary, props)
    compare_data = opts.eval_data or calib
    with stage("compare"):
        from modelkiln.deploy.measure import agreement

        for name, path in models.items():
            summary.precisions.setdefault(name, {})["agreement"] = agreement(
                models["fp32"], path, compare_data, entry, out, name
            )
    if opts.eval_data is not None and entry is not None:
        with stage("evaluate"):
            from modelkiln.deploy.measure import task_metrics

            for name, path in models.items():
                summary.precisions[name]["task"] = task_metrics(
                    path, entry, opts.eval_data, opts.labels, opts.eval_limit
                )
    with stage("bench"):
        from modelkiln.deploy.measure import bench

        for name, figures in bench(models, compare_data, entry, opts.bench_seconds).items():
            summary.precisions[name]["bench"] = figures
            summary.precisions[name]["size_mb"] = model_bytes(models[name]) / 1e6
    with stage("repository"):
        summary.files.update(_repositories(out, models, entry, opts.model))
    with stage("report"):
        from modelkiln.deploy.report import write_reports

        summary.files.update(write_reports(summary, out))
    return summary


def _export(opts: DeployOptions, work: Path) -> tuple[Path, ZooModel | None]:
    from modelkiln import zoo
    from modelkiln.runtime.session import model_metadata, ort_session

    src = Path(opts.model)
    if src.suffix == ".onnx":
        if not src.is_file():
            raise BadInput(f"model file not found: {src}")
        target = work / "exported.onnx"
        shutil.copyfile(src, target)
        meta = model_metadata(ort_session(target))
        name = meta.get("modelkiln.zoo")
        entry = zoo.get(name) if name else None
        if entry is not None:
            entry.configure(meta)
        return target, entry
    from modelkiln.export import export

    entry = zoo.get(opts.model)
    if len(entry.parts) != 1:
        raise BadInput(f"{entry.name} has {len(entry.parts)} parts; deploy one exported part file instead")
    export(opts.model, work / "exported.onnx", weights=opts.weights)
    return work / "exported.onnx", entry


def _builtin_calibration(folder: Path, entry: ZooModel | None, count: int = 16) -> Path:
    """Random crops, flips and scales of matplotlib's public-domain sample photo (grace_hopper.jpg,
    a U.S. Navy portrait; no image data shipped by us)."""
    import cv2

    from modelkiln.data.samples import sample_images

    if entry is None or entry.task not in ("classification", "detection", "embedding"):
        raise BadInput(
            "without --calib, deploy needs an image model from the zoo (or give --calib .npz feeds)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    images = [cv2.imread(str(p)) for p in sample_images()]
    rng = np.random.default_rng(0)
    for i in range(count):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        s = rng.uniform(0.5, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        cv2.imwrite(str(folder / f"sample_{i:02d}.png"), np.ascontiguousarray(crop))
    return folder


def _fp16(src: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    onnx.save(model, out)
    return out


def _int8(opts: DeployOptions, fp32: Path, out: Path, calib: Path, entry: ZooModel | None) -> dict[str, Any]:
    """INT8 within the budget when one is given. Models with SiLU get two candidates (SiLU float
    between int8 convolutions, and SiLU in int8): the faster one that meets the budget is kept,
    timed side by side; without a budget the default placement is kept."""
    import dataclasses

    from modelkiln.errors import QuantizationError
    from modelkiln.quant.config import Int8Cpu, QuantConfig, Target

    config = QuantConfig(target=Target(opts.target), cpu=Int8Cpu(opts.cpu))
    if opts.max_drop is None:
        from modelkiln.quant.quantize import quantize

        return quantize(fp32, out, calib, _zoo_name(entry), config, opts.calib_size).to_dict()
    candidates = [config]
    if _has_silu(fp32) and config.target is Target.CPU:
        candidates.append(dataclasses.replace(config, int8_silu=True))
    found: dict[Path, dict[str, Any]] = {}
    errors = []
    for i, cfg in enumerate(candidates):
        path = out.with_name(f"int8_candidate{i}.onnx")
        try:
            found[path] = {**_within_budget(opts, fp32, path, calib, entry, cfg), "int8_silu": cfg.int8_silu}
        except QuantizationError as exc:
            errors.append(str(exc))
    if not found:
        raise QuantizationError("; ".join(errors))
    best = min(found, key=lambda p: _latency(p, calib, entry)) if len(found) > 1 else next(iter(found))
    shutil.copyfile(best, out)
    return {**found[best], "candidates": {str(p.name): v.get("budget") for p, v in found.items()}}


def _within_budget(
    opts: DeployOptions, fp32: Path, out: Path, calib: Path, entry: ZooModel | None, config: Any
) -> dict[str, Any]:
    from modelkiln.accuracy.budget import quantize_within_budget

    metric = {"classification": "top1", "detection": "map"}.get(entry.task if entry else "", "cosine")
    labels = opts.labels or _labels_beside(opts.eval_data)
    r = quantize_within_budget(
        fp32,
        out,
        calib,
        opts.eval_data,
        opts.max_drop,
        metric,
        _zoo_name(entry),
        labels,
        config,
        opts.calib_size,
    )
    return {**r.quantize.to_dict(), "budget": r.fallback.to_dict()}


def _note_cpu_mismatch(summary: DeploySummary, props: dict[str, str]) -> None:
    """Say so when this CPU cannot run the INT8 model as built (its figures are then not what a
    fitting CPU gives, and kiln serve refuses it here)."""
    from modelkiln.runtime.cpu import unmet_requirement

    reason = unmet_requirement(props)
    if reason is not None:
        summary.notes.append(f"INT8 model on this CPU: {reason}.")


def _zoo_name(entry: ZooModel | None) -> str | None:
    return entry.name if entry is not None and entry.task != "embedding" else None


def _has_silu(model: Path) -> bool:
    import onnx

    return any(n.op_type == "Sigmoid" for n in onnx.load(model, load_external_data=False).graph.node)


def _latency(model: Path, calib: Path, entry: ZooModel | None) -> float:
    """Median ms at batch 8 on calibration inputs (a quick comparison between candidates)."""
    from modelkiln.deploy.measure import calibration_feed
    from modelkiln.runtime.session import interleaved_latency_ms

    feed = calibration_feed(model, calib, entry, 8)
    return interleaved_latency_ms({"m": model}, feed, rounds=3, iterations=5)["m"]["median"]


def _labels_beside(data: Path | None) -> Path | None:
    if data is not None and (data / "labels.csv").is_file():
        return data / "labels.csv"
    return None


def _repositories(out: Path, models: dict[str, Path], entry: ZooModel | None, model: str) -> dict[str, str]:
    from modelkiln.deploy.triton import validate_pbtxt, write_triton_model
    from modelkiln.runtime.backends.onnxruntime import OrtBackend
    from modelkiln.serve.config import DynamicBatching, ModelConfig, dump_config
    from modelkiln.serve.model import ServedModel

    base = (entry.name if entry else Path(model).stem).replace("-", "_")
    files = {}
    for precision, path in models.items():
        name = f"{base}_{precision}"
        config = ModelConfig(
            name,
            max_batch_size=8,
            dynamic_batching=DynamicBatching((8,), 2000),
            instance_count=1,
            threads_per_instance=1,
            priority=0 if precision == "int8" else 1,
        )
        served = ServedModel(config, 1, [OrtBackend.load(path)])
        folder = out / "repository" / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / "1" / "model.onnx")
        (folder / "config.yaml").write_text(dump_config(config))
        pbtxt = write_triton_model(out / "triton", path, config, served.inputs, served.outputs)
        with contextlib.suppress(MissingDependency):  # validated where tritonclient[grpc] is installed
            validate_pbtxt(pbtxt.read_text())
        files[f"repository_{precision}"] = str(folder)
        files[f"triton_{precision}"] = str(pbtxt.parent)
    return files
