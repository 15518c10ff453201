"""A served model's configuration (``<repo>/<model>/config.yaml``): frozen dataclasses validated
on load, so a typo is an error naming the file and the key, never a silently ignored option.

    backend: onnxruntime          # the runtime of a plain model (the only one served today),
                                  # or pipeline / genai for the other kinds of served model
    max_batch_size: 8             # 0: the model has no batch axis (requests run as they come)
    dynamic_batching:             # omit to run each request alone
      preferred_batch_sizes: [4, 8]
      max_queue_delay_us: 2000
    instance_count: 1             # sessions of this model running at once
    threads_per_instance: 1       # intra-op threads per session
    priority: 1                   # 0 most urgent … 2
    queue: {max_queue_size: 64, default_timeout_us: 0}
    warmup: true                  # one inference per instance on zeros (batch 1) before ready;
                                  # or, as Triton's model_warmup: {batch_sizes: [1, 8], count: 2,
                                  # data: zero|random}; false: none
    allow_cpu_mismatch: false     # serve an INT8 model this CPU cannot run exactly (else refused)
    pin: false                    # with kiln serve --memory-budget: load at start, never evict
    inputs: [{name: images, dtype: float32, dims: [3, 640, 640]}]   # optional: read from the model
    pipeline: {kind: detect_classify, steps: {detector: yolo, classifier: lite0}}   # instead of a file

A generative model (``backend: genai``) has a folder from ``kiln export qwen2-vl…`` as its version
(``<version>/genai.json`` beside the graphs) and is served at ``/v1/chat/completions``:

    backend: genai
    genai: {max_sequences: 4, max_new_tokens: 512, decoder: decoder.int8.onnx, continuous_batching: true}
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelkiln.errors import ConfigError
from modelkiln.runtime.backends.base import BackendKind

PRIORITY_LEVELS = 3


class ModelKind(str, enum.Enum):
    """What a repository entry serves; the server keeps one loader per kind. The value of the two
    kinds that are not plain models is what ``backend:`` says in config.yaml."""

    MODEL = "model"  # one ONNX file per version on a runtime backend, dynamically batched
    PIPELINE = "pipeline"  # other served models chained with the zoo's pre/post-processing
    GENERATION = "genai"  # an exported chat folder per version, decoded token by token


#: Runtimes a plain model can be served on (serve/model.py has a loader for each).
SERVED_BACKENDS: tuple[BackendKind, ...] = (BackendKind.ONNXRUNTIME,)
#: config.yaml ``backend:`` values: a served runtime, or a kind of model that is not a plain one.
BACKEND_VALUES: dict[str, BackendKind | ModelKind] = {
    **{kind.value: kind for kind in SERVED_BACKENDS},
    ModelKind.PIPELINE.value: ModelKind.PIPELINE,
    ModelKind.GENERATION.value: ModelKind.GENERATION,
}
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass(frozen=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 1000

    def __post_init__(self) -> None:
        if any(b < 1 for b in self.preferred_batch_sizes):
            raise ConfigError(f"preferred_batch_sizes must be >= 1, got {list(self.preferred_batch_sizes)}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's queue policy (docs/serving.md, "Priority and queue policy"), plus aging."""

    max_queue_size: int = 64
    default_timeout_us: int = 0  # 0: no timeout
    #: Whether a request's own ``timeout`` parameter replaces default_timeout_us (else ignored).
    allow_timeout_override: bool = True
    #: reject: a request whose timeout expires in the queue fails; delay: it stays queued, last.
    timeout_action: str = "reject"
    #: A waiting request gains one priority level per aging_ms of wait (0: strict priority).
    aging_ms: int = 100

    def __post_init__(self) -> None:
        for key in ("max_queue_size", "default_timeout_us", "aging_ms"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"queue.{key} must be an integer, got {value!r}")
        if self.max_queue_size < 1:
            raise ConfigError(f"queue.max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.default_timeout_us < 0:
            raise ConfigError(f"queue.default_timeout_us must be >= 0, got {self.default_timeout_us}")
        if self.aging_ms < 0:
            raise ConfigError(f"queue.aging_ms must be >= 0 (0: no aging), got {self.aging_ms}")
        if not isinstance(self.allow_timeout_override, bool):  # YAML "no" in quotes would be truthy
            raise ConfigError(
                f"queue.allow_timeout_override must be true or false, got {self.allow_timeout_override!r}"
            )
        if self.timeout_action not in ("reject", "delay"):
            raise ConfigError(
                f"queue.timeout_action must be 'reject' or 'delay', got {self.timeout_action!r}"
            )


@dataclass(frozen=True)
class TensorConfig:
    """dims exclude the batch axis when max_batch_size > 0 (Triton's convention); -1 is dynamic."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"tensor '{self.name}': dtype must be one of {DTYPES}, got {self.dtype!r}")
        if any(d < -1 or d == 0 for d in self.dims):
            raise ConfigError(f"tensor '{self.name}': dims must be positive or -1, got {list(self.dims)}")


@dataclass(frozen=True)
class PipelineConfig:
    kind: str  # "detect_classify" | "clip_zero_shot"
    steps: dict[str, str] = field(default_factory=dict)  # role -> served model name
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenAIConfig:
    """A generative model: how many sequences decode at once (each holds a KV cache), the most
    new tokens a request may ask for, and which decoder file of the folder to run."""

    max_sequences: int = 4
    max_new_tokens: int = 512
    decoder: str | None = None
    #: Decode all running sequences in one batched step (weights read once per step for all).
    continuous_batching: bool = True
    #: Run the folder's weight-only INT8 vision encoder (vision.int8.onnx; per-bucket
    #: vision_HxW.int8.onnx in folders exported before the any-size encoder).
    vision_int8: bool = False

    def __post_init__(self) -> None:
        if self.max_sequences < 1 or self.max_new_tokens < 1:
            raise ConfigError("genai: max_sequences and max_new_tokens must be >= 1")


@dataclass(frozen=True)
class Warmup:
    """Inferences every instance runs before its model is ready (Triton's ``model_warmup``): at each
    of ``batch_sizes``, ``count`` times, on zeros or random data, so the first requests of each
    batch size pay neither session start-up nor first-run allocation."""

    batch_sizes: tuple[int, ...] = (1,)
    count: int = 1
    data: str = "zero"  # zero | random

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ConfigError(f"warmup: batch_sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if not isinstance(self.count, int) or not 1 <= self.count <= MAX_WARMUP_COUNT:
            raise ConfigError(f"warmup: count must be 1..{MAX_WARMUP_COUNT}, got {self.count!r}")
        if self.data not in ("zero", "random"):
            raise ConfigError(f"warmup: data must be zero or random, got {self.data!r}")


#: Most warm-up runs per batch size (each instance runs them before the model serves).
MAX_WARMUP_COUNT = 100


@dataclass(frozen=True)
class ModelConfig:
    name: str
    #: A plain model's runtime, or ModelKind.PIPELINE / GENERATION; strings are converted on init.
    backend: BackendKind | ModelKind = BackendKind.ONNXRUNTIME
    max_batch_size: int = 0
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = 1
    threads_per_instance: int = 1
    priority: int = 1
    queue: QueuePolicy = field(default_factory=QueuePolicy)
    warmup: bool | Warmup = True
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    pipeline: PipelineConfig | None = None
    genai: GenAIConfig | None = None
    #: Serve a model even when this CPU lacks what its INT8 format needs (it runs, less accurately).
    allow_cpu_mismatch: bool = False
    #: Under ``kiln serve --memory-budget``: loaded at start and never evicted (no effect without one).
    pin: bool = False

    def __post_init__(self) -> None:
        value = self.backend.value if isinstance(self.backend, enum.Enum) else self.backend
        backend = BACKEND_VALUES.get(value) if isinstance(value, str) else None
        if backend is None:
            raise ConfigError(
                f"model '{self.name}': config key 'backend' must be one of {list(BACKEND_VALUES)}, "
                f"got {value!r}"
            )
        object.__setattr__(self, "backend", backend)  # frozen: the string becomes its enum once here
        if backend is ModelKind.GENERATION and self.genai is None:
            object.__setattr__(self, "genai", GenAIConfig())  # frozen: defaults filled in once here
        if self.genai is not None and backend is not ModelKind.GENERATION:
            raise ConfigError(f"model '{self.name}': a genai section needs backend: genai")
        if self.max_batch_size < 0:
            raise ConfigError(f"model '{self.name}': max_batch_size must be >= 0, got {self.max_batch_size}")
        for key in ("allow_cpu_mismatch", "pin"):
            if not isinstance(getattr(self, key), bool):  # YAML "no" in quotes would be truthy
                raise ConfigError(
                    f"model '{self.name}': {key} must be true or false, got {getattr(self, key)!r}"
                )
        if self.instance_count < 1 or self.threads_per_instance < 1:
            raise ConfigError(f"model '{self.name}': instance_count and threads_per_instance must be >= 1")
        if not 0 <= self.priority < PRIORITY_LEVELS:
            raise ConfigError(
                f"model '{self.name}': priority must be 0..{PRIORITY_LEVELS - 1}, got {self.priority}"
            )
        if isinstance(self.warmup, Warmup):
            most = self.max_batch_size or 1  # 0: no batch axis, requests run one at a time
            if max(self.warmup.batch_sizes) > most:
                raise ConfigError(
                    f"model '{self.name}': warmup batch_sizes {list(self.warmup.batch_sizes)} exceed "
                    f"max_batch_size {self.max_batch_size}"
                )
        elif not isinstance(self.warmup, bool):
            raise ConfigError(
                f"model '{self.name}': warmup must be true, false or a mapping "
                f"(batch_sizes, count, data), got {self.warmup!r}"
            )
        if self.dynamic_batching is not None and self.max_batch_size == 0:
            raise ConfigError(f"model '{self.name}': dynamic_batching needs max_batch_size > 0")
        too_big = [
            b for b in getattr(self.dynamic_batching, "preferred_batch_sizes", ()) if b > self.max_batch_size
        ]
        if too_big:
            raise ConfigError(f"model '{self.name}': preferred batch sizes {too_big} exceed max_batch_size")

    @property
    def warmup_plan(self) -> Warmup | None:
        """What warming up runs: ``true`` is one batch-1 inference on zeros, ``false`` nothing."""
        if isinstance(self.warmup, Warmup):
            return self.warmup
        return Warmup() if self.warmup else None

    @property
    def threads(self) -> int:
        return self.instance_count * self.threads_per_instance

    @property
    def kind(self) -> ModelKind:
        """A pipeline section makes a pipeline whatever ``backend`` says (as it always has)."""
        if self.pipeline is not None:
            return ModelKind.PIPELINE
        return ModelKind.GENERATION if self.backend is ModelKind.GENERATION else ModelKind.MODEL

    @property
    def runtime(self) -> BackendKind:
        """The runtime of a plain model (a ``backend: pipeline`` without a pipeline section is
        served as an ONNX Runtime model, as it always has been)."""
        return self.backend if isinstance(self.backend, BackendKind) else BackendKind.ONNXRUNTIME


#: Size units of --memory-budget: decimal (kB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB).
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from ``700MB``, ``4GB``, ``1.5GiB`` or a plain byte count. Strict (no negative, empty,
    zero or unknown unit): a budget that silently meant something else would be worse than none."""
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in SIZE_UNITS:
        raise ConfigError(
            f"{what}: expected a size such as 700MB, 4GB or 1.5GiB (units {', '.join(u for u in SIZE_UNITS if u)}), "
            f"got {text!r}"
        )
    number = float(match.group(1))
    size = int(number * SIZE_UNITS[unit])
    if size < 1 or (unit in ("", "B") and not number.is_integer()):
        raise ConfigError(f"{what}: must be a whole number of bytes >= 1, got {text!r}")
    return size


def _build(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a mapping, refusing unknown keys (the typo a dict of options would swallow)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    return data


def parse_config(data: dict[str, Any] | None, name: str, where: str = "config") -> ModelConfig:
    """Validate a config mapping (as read from YAML) into a ModelConfig."""
    data = dict(_build(ModelConfig, data or {}, where))
    data.setdefault("name", name)
    try:
        if data.get("dynamic_batching") is not None:
            db = _build(DynamicBatching, data["dynamic_batching"], f"{where}: dynamic_batching")
            data["dynamic_batching"] = DynamicBatching(
                tuple(db.get("preferred_batch_sizes", ())), int(db.get("max_queue_delay_us", 1000))
            )
        if isinstance(data.get("warmup"), dict):
            w = _build(Warmup, data["warmup"], f"{where}: warmup")
            data["warmup"] = Warmup(**{**w, "batch_sizes": tuple(w.get("batch_sizes", (1,)))})
        if "queue" in data:
            data["queue"] = QueuePolicy(**_build(QueuePolicy, data["queue"], f"{where}: queue"))
        for key in ("inputs", "outputs"):
            specs = data.get(key) or []
            data[key] = tuple(
                TensorConfig(
                    **{**_build(TensorConfig, s, f"{where}: {key}"), "dims": tuple(s.get("dims", ()))}
                )
                for s in specs
            )
        if data.get("pipeline") is not None:
            data["pipeline"] = PipelineConfig(
                **_build(PipelineConfig, data["pipeline"], f"{where}: pipeline")
            )
            data.setdefault("backend", "pipeline")
        if data.get("genai") is not None:
            data["genai"] = GenAIConfig(**_build(GenAIConfig, data["genai"], f"{where}: genai"))
        return ModelConfig(**data)
    except TypeError as exc:  # a missing required field, e.g. a tensor without dtype
        raise ConfigError(f"{where}: {exc}") from exc
    except ConfigError as exc:
        if str(exc).startswith(where):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def load_config(path: Path, name: str) -> ModelConfig:
    """Read ``config.yaml`` (absent: all defaults) with errors naming the file."""
    if not path.is_file():
        return parse_config({}, name, str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(data, name, str(path))


def dump_config(config: ModelConfig) -> str:
    """YAML for ``config`` (what ``kiln repo add`` writes)."""
    data = dataclasses.asdict(config)
    data.pop("name")
    data["backend"] = config.backend.value
    for key in ("pipeline", "genai"):
        if getattr(config, key) is None:
            data.pop(key)
    for key in ("inputs", "outputs"):
        data[key] = [{**t, "dims": list(t["dims"])} for t in data[key]]
        if not data[key]:
            data.pop(key)
    if isinstance(data.get("warmup"), dict):
        data["warmup"]["batch_sizes"] = list(data["warmup"]["batch_sizes"])
    if data.get("dynamic_batching"):
        data["dynamic_batching"]["preferred_batch_sizes"] = list(
            data["dynamic_batching"]["preferred_batch_sizes"]
        )
    text: str = yaml.safe_dump(data, sort_keys=False)
    return text
