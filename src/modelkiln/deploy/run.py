"""``kiln deploy``: export -> optimize -> FP16 / INT8 -> compare -> evaluate -> bench -> serve-ready
repository, Triton repository and a report. Every stage is timed and shown; a failing stage stops
the run with its name and keeps (and lists) what the earlier stages wrote. Chat models take their
own stages (deploy/genai.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from modelkiln import zoo
from modelkiln.accuracy.budget import AccuracyBudget, within_budget
from modelkiln.data.feeds import model_feeds
from modelkiln.delivery.seal import seal_package
from modelkiln.deploy.clip import deploy_clip
from modelkiln.deploy.genai import deploy_genai
from modelkiln.deploy.measure import agreement, bench, calibration_feed, task_metrics
from modelkiln.deploy.options import INT8_CPUS, PRECISIONS, DeployOptions
from modelkiln.deploy.report import write_reports
from modelkiln.deploy.samples import builtin_calibration
from modelkiln.deploy.stages import DeployError, Stages, Status
from modelkiln.deploy.summary import DeploySummary, Int8Format
from modelkiln.deploy.triton import validate_pbtxt, write_triton_model
from modelkiln.errors import BadInput, MissingDependency, QuantizationError
from modelkiln.export import export
from modelkiln.graph import optimize
from modelkiln.onnx_io import model_bytes
from modelkiln.quant.config import CalibrationData, Int8Cpu, QuantConfig, Target
from modelkiln.quant.formats import format_fields
from modelkiln.quant.quantizer import Quantizer
from modelkiln.runtime import cpu, kernels
from modelkiln.runtime.backends.onnxruntime import OrtBackend, cpu_backend
from modelkiln.runtime.timing import interleaved_latency_ms
from modelkiln.serve.config import DynamicBatching, ModelConfig, dump_config
from modelkiln.serve.model import ServedModel
from modelkiln.zoo import Task, ZooModel
from modelkiln.zoo.clip import DualEncoder

__all__ = [
    "INT8_CPUS",
    "PRECISIONS",
    "DeployError",
    "DeployOptions",
    "DeploySummary",
    "Int8Job",
    "deploy",
    "int8_format",
    "metadata_props",
]

log = logging.getLogger(__name__)


def deploy(opts: DeployOptions, status: Status | None = None) -> DeploySummary:
    """Run every stage; returns the summary also written to ``OUT/summary.json``."""
    if Path(opts.model).suffix != ".onnx":
        named = _dual_encoder_folder(Path(opts.model)) if Path(opts.model).is_dir() else zoo.get(opts.model)
        if isinstance(named, DualEncoder):  # CLIP: two towers, retrieval as the task metric
            return deploy_clip(opts, named, status)
        if named.task == Task.GENERATION:  # a chat model: its own stages
            return deploy_genai(opts, named, status)
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
            calib = builtin_calibration(work / "calib", entry)
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
            summary.int8 = _int8_candidates(Int8Job.of(opts, models["fp32"], models["int8"], calib, entry))
            summary.files["int8"] = str(models["int8"])
            props = metadata_props(models["int8"])
            summary.int8_format = int8_format(props, opts.cpu)
            _note_cpu_mismatch(summary, props)
    compare_data = opts.eval_data or calib
    with stage("compare"):
        for name, path in models.items():
            summary.figures(name).agreement = agreement(models["fp32"], path, compare_data, entry, out, name)
    if opts.eval_data is not None and entry is not None:
        with stage("evaluate"):
            for name, path in models.items():
                summary.figures(name).task = task_metrics(
                    path, entry, opts.eval_data, opts.labels_or_beside, opts.eval_limit
                )
    with stage("bench"):
        for name, figures in bench(models, compare_data, entry, opts.bench_seconds).items():
            found = summary.figures(name)
            found.bench = figures
            found.size_mb = model_bytes(models[name]) / 1e6
    with stage("repository"):
        summary.files.update(_repositories(out, models, entry, opts.model))
    with stage("report"):
        summary.files.update(write_reports(summary, out))
    with stage("seal", save=False):
        _seal(opts, summary, stage, entry, compare_data)
    return summary


#: Package files the manifest leaves out: deploy's working copies (and, once models are
#: encrypted, the plaintext Triton copies, which Triton needs as they are; ship them separately).
WORK_FILES = ("work/*",)


def _seal(
    opts: DeployOptions, summary: DeploySummary, stage: Stages, entry: ZooModel | None, data: Path
) -> None:
    """Golden inputs and outputs per precision, the manifest of every shipped file (signed with
    --sign-key), the served models encrypted with --encrypt-key. summary.json is written first:
    the manifest hashes it."""
    base = _base_name(entry, opts.model)
    served = {p: opts.out / "repository" / f"{base}_{p}" / "1" / "model.onnx" for p in summary.precisions}
    feeds = list(model_feeds(served["fp32"], data, entry, batch_size=2, limit=8))
    summary.files["manifest"] = str(opts.out / "manifest.json")
    if opts.sign_key is not None:
        summary.files["signature"] = str(opts.out / "manifest.json.sig")
    stage.save()
    seal_package(
        opts.out,
        {base: served},
        {base: feeds},
        sign_key=opts.sign_key,
        encrypt_key=opts.encrypt_key,
        accuracy={
            base: {
                p: {"agreement": f.agreement, "task": f.task} for p, f in summary.image_precisions().items()
            }
        },
        tasks={base: str(summary.task)} if summary.task else None,
        exclude=(*WORK_FILES, "triton/*") if opts.encrypt_key is not None else WORK_FILES,
    )


def _dual_encoder_folder(folder: Path) -> ZooModel:
    """The entry recorded in a folder of exported towers (image.onnx + text.onnx)."""
    image = folder / "image.onnx"
    if not image.is_file():
        raise BadInput(
            f"{folder}: deploy takes a zoo name, an .onnx file or a folder of CLIP towers (image.onnx, text.onnx)"
        )
    proto = onnx.load(image, load_external_data=False)
    dims = [[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    entry = zoo.entry_from_metadata(
        {p.key: p.value for p in proto.metadata_props}, zoo.input_image_size(dims)
    )
    if entry is None:
        raise BadInput(f"{image} carries no modelkiln metadata: export it with kiln export")
    return entry


def _base_name(entry: ZooModel | None, model: str) -> str:
    """The repository's model-name stem: the zoo name, or the ONNX file's stem."""
    return (entry.name if entry else Path(model).stem).replace("-", "_")


def metadata_props(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props (weights in external files are not read)."""
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def int8_format(props: dict[str, str], requested: str | None = None) -> Int8Format:
    """The INT8 format as the written model's metadata states it (the truth of the file, whatever
    was asked); "unknown" where a key is absent."""
    found = format_fields(props)
    return Int8Format(found["format"], found["weights"], found["activations"], found["requires"], requested)


def _export(opts: DeployOptions, work: Path) -> tuple[Path, ZooModel | None]:
    src = Path(opts.model)
    if src.suffix == ".onnx":
        if not src.is_file():
            raise BadInput(f"model file not found: {src}")
        target = work / "exported.onnx"
        shutil.copyfile(src, target)
        backend = cpu_backend(target)  # ONNX Runtime loads it, or the stage fails here
        size = zoo.input_image_size(m.shape for m in backend.input_metadata)
        return target, zoo.entry_from_metadata(backend.metadata, size)
    entry = zoo.get(opts.model)
    if len(entry.parts) != 1:
        raise BadInput(f"{entry.name} has {len(entry.parts)} parts; deploy one exported part file instead")
    export(opts.model, work / "exported.onnx", weights=opts.weights)
    return work / "exported.onnx", entry


def _fp16(src: Path, out: Path) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    onnx.save(model, out)
    return out


@dataclass(frozen=True)
class Int8Job:
    """Everything deploy's INT8 stage asks of quantization, in one object (one call to swap)."""

    fp32: Path
    out: Path
    calib: Path
    entry: ZooModel | None
    target: str = "cpu"
    cpu: str = "portable"
    calib_size: int = 100
    max_drop: float | None = None  # an accuracy budget (needs eval_data)
    eval_data: Path | None = None
    labels: Path | None = None

    def __post_init__(self) -> None:
        if self.max_drop is not None and self.eval_data is None:
            raise BadInput("an INT8 accuracy budget (--max-drop) needs --eval data to measure the drop on")

    @classmethod
    def of(cls, opts: DeployOptions, fp32: Path, out: Path, calib: Path, entry: ZooModel | None) -> Int8Job:
        return cls(
            fp32,
            out,
            calib,
            entry,
            opts.target,
            opts.cpu,
            opts.calib_size,
            opts.max_drop,
            opts.eval_data,
            opts.labels_or_beside,
        )

    @property
    def zoo_name(self) -> str | None:
        """The zoo entry whose preprocessing reads image samples (embedding models take feeds)."""
        entry = self.entry
        return entry.name if entry is not None and entry.task != Task.EMBEDDING else None

    @property
    def metric(self) -> str:
        """What the budget is measured in: the task's metric, else cosine to FP32."""
        if self.entry is None:
            return "cosine"
        return {Task.CLASSIFICATION: "top1", Task.DETECTION: "map"}.get(self.entry.task, "cosine")


def _int8_candidates(job: Int8Job) -> dict[str, Any]:
    """INT8 within the budget when one is given. SiLU between int8 convolutions runs as modelkiln's
    exact int8 lookup where the kernel library is built (the budget search scores that model);
    without the library, models with SiLU get two candidates (SiLU float, and SiLU as
    QLinearSigmoid/QLinearMul) and the faster one that meets the budget is kept, timed side by side.
    Without a budget the default placement is kept. Every quantization call of deploy's image models
    is here, each through one Quantizer per candidate configuration."""
    config = QuantConfig(target=Target(job.target), cpu=Int8Cpu(job.cpu))
    data = CalibrationData(job.calib, job.zoo_name, job.calib_size)
    if job.max_drop is None or job.eval_data is None:
        return Quantizer(job.fp32, config, data).save(job.out).to_dict()
    budget = AccuracyBudget(job.eval_data, job.max_drop, job.metric, job.labels)
    candidates = [config]
    if _has_silu(job.fp32) and config.target is Target.CPU and not kernels.available():
        candidates.append(dataclasses.replace(config, int8_silu=True))
    found: dict[Path, dict[str, Any]] = {}
    errors = []
    for i, cfg in enumerate(candidates):
        path = job.out.with_name(f"int8_candidate{i}.onnx")
        try:
            r = within_budget(Quantizer(job.fp32, cfg, data), budget, path)
        except QuantizationError as exc:
            errors.append(str(exc))
            continue
        found[path] = {**r.quantize.to_dict(), "budget": r.fallback.to_dict(), "int8_silu": cfg.int8_silu}
    if not found:
        raise QuantizationError("; ".join(errors))
    best = (
        min(found, key=lambda p: _latency(p, job.calib, job.entry)) if len(found) > 1 else next(iter(found))
    )
    shutil.copyfile(best, job.out)
    return {**found[best], "candidates": {str(p.name): v.get("budget") for p, v in found.items()}}


def _note_cpu_mismatch(summary: DeploySummary, props: dict[str, str]) -> None:
    """Say so when this CPU cannot run the INT8 model as built (its figures are then not what a
    fitting CPU gives, and kiln serve refuses it here)."""
    reason = cpu.unmet_requirement(props)
    if reason is not None:
        summary.notes.append(f"INT8 model on this CPU: {reason}.")


def _has_silu(model: Path) -> bool:
    return any(n.op_type == "Sigmoid" for n in onnx.load(model, load_external_data=False).graph.node)


def _latency(model: Path, calib: Path, entry: ZooModel | None) -> float:
    """Median ms at batch 8 on calibration inputs (a quick comparison between candidates)."""
    feed = calibration_feed(model, calib, entry, 8)
    return interleaved_latency_ms({"m": cpu_backend(model)}, feed, rounds=3, iterations=5)["m"]["median"]


def _repositories(out: Path, models: dict[str, Path], entry: ZooModel | None, model: str) -> dict[str, str]:
    base = _base_name(entry, model)
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
