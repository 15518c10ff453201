"""The figures of a deployment, as dataclasses: what each precision measured (agreement with FP32,
task metrics, latency per batch, size; for chat models quality and speed of generation), the INT8
format of the written file and the CPU it was measured on. ``summary.json`` is their ``to_dict``
(its keys are a user-facing format: they do not change); ``from_dict`` reads one back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from modelkiln.runtime import cpu
from modelkiln.zoo import Task


@dataclass(frozen=True)
class OutputAgreement:
    """One output of a precision vs FP32 over the same inputs."""

    name: str
    cosine: float
    snr_db: float
    max_abs: float
    topk_agreement: dict[str, float] | None = None  # {"top1", "top5"} for classifiers

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cosine": self.cosine,
            "snr_db": self.snr_db,
            "max_abs": self.max_abs,
            "topk_agreement": self.topk_agreement,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputAgreement:
        return cls(d["name"], d["cosine"], d["snr_db"], d["max_abs"], d.get("topk_agreement"))


@dataclass(frozen=True)
class LayerSnr:
    name: str
    snr_db: float


@dataclass(frozen=True)
class LayerAgreement:
    """Per-layer comparison (INT8): the SNR plot, the first layer that collapses, the worst ten."""

    plot: str
    first_collapse: str | None
    worst: tuple[LayerSnr, ...]


@dataclass(frozen=True)
class Agreement:
    samples: int
    outputs: tuple[OutputAgreement, ...]
    layers: LayerAgreement | None = None

    @property
    def first_cosine(self) -> float | None:
        """Cosine of the first output (the model's main one), None when there is none."""
        return self.outputs[0].cosine if self.outputs else None

    @property
    def first_top1(self) -> float | None:
        first = self.outputs[0].topk_agreement if self.outputs else None
        return (first or {}).get("top1")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"samples": self.samples, "outputs": [o.to_dict() for o in self.outputs]}
        if self.layers is not None:
            d["layer_plot"] = self.layers.plot
            d["first_collapse"] = self.layers.first_collapse
            d["worst_layers"] = [{"name": x.name, "snr_db": x.snr_db} for x in self.layers.worst]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Agreement:
        layers = None
        if "layer_plot" in d:
            worst = tuple(LayerSnr(x["name"], x["snr_db"]) for x in d.get("worst_layers") or [])
            layers = LayerAgreement(d["layer_plot"], d.get("first_collapse"), worst)
        return cls(d["samples"], tuple(OutputAgreement.from_dict(o) for o in d["outputs"]), layers)


@dataclass(frozen=True)
class BatchFigures:
    """Latency (ms) and throughput (items/s) at one batch size."""

    p50_ms: float
    p99_ms: float
    min_ms: float
    throughput: float
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BatchFigures:
        return cls(d["p50_ms"], d["p99_ms"], d["min_ms"], d["throughput"], d["iterations"])


@dataclass
class PrecisionFigures:
    """What one precision of an image (or embedding) model measured; stages fill it in turn."""

    agreement: Agreement | None = None
    task: dict[str, float] | None = None  # task metrics on --eval data (top1, map, ...)
    bench: dict[int, BatchFigures] = field(default_factory=dict)  # batch size -> figures
    size_mb: float | None = None

    @property
    def first_task_metric(self) -> float | None:
        return next(iter(self.task.values()), None) if self.task else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.agreement is not None:
            d["agreement"] = self.agreement.to_dict()
        if self.task is not None:
            d["task"] = dict(self.task)
        if self.bench:
            d["bench"] = {f"batch{b}": f.to_dict() for b, f in self.bench.items()}
        if self.size_mb is not None:
            d["size_mb"] = self.size_mb
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrecisionFigures:
        bench = {
            int(k.removeprefix("batch")): BatchFigures.from_dict(v) for k, v in (d.get("bench") or {}).items()
        }
        agreement = Agreement.from_dict(d["agreement"]) if d.get("agreement") is not None else None
        return cls(agreement, d.get("task"), bench, d.get("size_mb"))


@dataclass(frozen=True)
class ChatQuality:
    """A candidate decoder vs the reference, fed the same tokens (genai.measure.teacher_forced)."""

    logit_cosine_mean: float
    logit_cosine_min: float
    top1_agreement: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatQuality:
        return cls(d["logit_cosine_mean"], d["logit_cosine_min"], d["top1_agreement"], d["steps"])


@dataclass(frozen=True)
class ChatSpeed:
    """Time to first token and decode rate over interleaved rounds (genai.measure.speed)."""

    ttft_ms_median: float
    ttft_ms_min: float
    decode_tok_s_median: float
    decode_tok_s_max: float

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatSpeed:
        return cls(d["ttft_ms_median"], d["ttft_ms_min"], d["decode_tok_s_median"], d["decode_tok_s_max"])


@dataclass
class ChatFigures:
    """What one precision of a chat model measured."""

    parity_max_abs: float | None = None  # export parity (fp32)
    quality: ChatQuality | None = None  # vs fp32 (int8)
    vision_cosine_min: float | None = None  # vision embeddings vs fp32 (int8)
    bench: ChatSpeed | None = None
    size_mb: float | None = None  # the decoder file

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.parity_max_abs is not None:
            d["parity_max_abs"] = self.parity_max_abs
        if self.quality is not None:
            d["quality"] = self.quality.to_dict()
        if self.vision_cosine_min is not None:
            d["vision_cosine_min"] = self.vision_cosine_min
        if self.bench is not None:
            d["bench"] = self.bench.to_dict()
        if self.size_mb is not None:
            d["size_mb"] = self.size_mb
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatFigures:
        return cls(
            d.get("parity_max_abs"),
            ChatQuality.from_dict(d["quality"]) if d.get("quality") is not None else None,
            d.get("vision_cosine_min"),
            ChatSpeed.from_dict(d["bench"]) if d.get("bench") is not None else None,
            d.get("size_mb"),
        )


Figures: TypeAlias = PrecisionFigures | ChatFigures


@dataclass(frozen=True)
class Int8Format:
    """The INT8 format as the written model's metadata states it ("unknown" where a key is
    absent), and the --cpu format that was asked for."""

    format: str
    weights: str
    activations: str
    requires: str
    requested: str | None = None

    def to_dict(self) -> dict[str, str]:
        d = {"format": self.format, "weights": self.weights, "activations": self.activations}
        d["requires"] = self.requires
        if self.requested:
            d["requested"] = self.requested
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> Int8Format:
        return cls(d["format"], d["weights"], d["activations"], d["requires"], d.get("requested"))


def measured_on() -> dict[str, Any]:
    """This CPU and its INT8 instruction sets: every figure of a deployment was measured here."""
    info = cpu.cpu_info()
    return {"description": info.describe(), **info.to_dict()}


@dataclass
class DeploySummary:
    model: str
    zoo: str | None
    task: str | None
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds, in order
    files: dict[str, str] = field(default_factory=dict)
    precisions: dict[str, Figures] = field(default_factory=dict)
    optimize: dict[str, Any] = field(default_factory=dict)
    int8: dict[str, Any] = field(default_factory=dict)  # what quantization reported
    notes: list[str] = field(default_factory=list)
    failed: str | None = None
    command: str = ""
    cpu: dict[str, Any] = field(default_factory=measured_on)  # the CPU every figure comes from
    int8_format: Int8Format | None = None  # from the INT8 file's metadata

    @property
    def is_chat(self) -> bool:
        return self.task == Task.GENERATION

    def figures(self, precision: str) -> PrecisionFigures:
        """An image model's figures of ``precision`` (created empty the first time)."""
        found = self.precisions.setdefault(precision, PrecisionFigures())
        if not isinstance(found, PrecisionFigures):
            raise TypeError(f"{precision}: a chat model's figures, not an image model's")
        return found

    def chat_figures(self, precision: str) -> ChatFigures:
        """A chat model's figures of ``precision`` (created empty the first time)."""
        found = self.precisions.setdefault(precision, ChatFigures())
        if not isinstance(found, ChatFigures):
            raise TypeError(f"{precision}: an image model's figures, not a chat model's")
        return found

    def image_precisions(self) -> dict[str, PrecisionFigures]:
        return {k: v for k, v in self.precisions.items() if isinstance(v, PrecisionFigures)}

    def chat_precisions(self) -> dict[str, ChatFigures]:
        return {k: v for k, v in self.precisions.items() if isinstance(v, ChatFigures)}

    def to_dict(self) -> dict[str, Any]:
        """The form of ``summary.json`` (keys unchanged since the first release)."""
        return {
            "model": self.model,
            "zoo": self.zoo,
            "task": self.task,
            "stages": dict(self.stages),
            "files": dict(self.files),
            "precisions": {k: v.to_dict() for k, v in self.precisions.items()},
            "optimize": self.optimize,
            "int8": self.int8,
            "notes": list(self.notes),
            "failed": self.failed,
            "command": self.command,
            "cpu": self.cpu,
            "int8_format": self.int8_format.to_dict() if self.int8_format is not None else {},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeploySummary:
        """A summary read back from ``summary.json``."""
        chat = d.get("task") == Task.GENERATION
        precisions: dict[str, Figures] = {
            k: ChatFigures.from_dict(v) if chat else PrecisionFigures.from_dict(v)
            for k, v in (d.get("precisions") or {}).items()
        }
        fmt = d.get("int8_format") or None
        return cls(
            model=d["model"],
            zoo=d.get("zoo"),
            task=d.get("task"),
            stages=dict(d.get("stages") or {}),
            files=dict(d.get("files") or {}),
            precisions=precisions,
            optimize=dict(d.get("optimize") or {}),
            int8=dict(d.get("int8") or {}),
            notes=list(d.get("notes") or []),
            failed=d.get("failed"),
            command=d.get("command", ""),
            cpu=dict(d.get("cpu") or {}),
            int8_format=Int8Format.from_dict(fmt) if fmt else None,
        )
