"""``Quantizer``: one float model, one preparation, any number of INT8 builds.

Every way of quantizing goes through it: ``kiln quantize`` (plain, ``--sensitivity``,
``--max-drop``), the ``quantize`` verb, deploy's candidates. The model is prepared once, on first
need (optimise, SmoothQuant, calibrate, FFN spread); ``build`` / ``save`` turn it into INT8 models,
``sensitivity`` ranks layers by the error each causes alone, and ``within_budget`` returns the most
sensitive layers to float until a scorer's drop stays within a budget. Scorers are plain callables
(model -> score), so quant knows nothing of what is scored (that is accuracy's side).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from modelkiln.data.feeds import Feed, model_feeds
from modelkiln.errors import ConfigError
from modelkiln.onnx_io import save_model
from modelkiln.quant.build import Built, QuantizeResult, build, quantized_layers, summarize
from modelkiln.quant.config import CalibrationData, QuantConfig
from modelkiln.quant.mixed_precision import FallbackResult, LayerSensitivity, fallback, sensitivity
from modelkiln.quant.prepare import Calibrated, prepare
from modelkiln.zoo.base import ZooModel

#: Makes one progress bar per step: (label, total or None) -> advance(n).
ProgressFactory = Callable[[str, int | None], Callable[[int], None]]
#: A model's score, higher is better (top-1, mAP, cosine to FP32 ...).
Scorer = Callable[[onnx.ModelProto], float]

#: QuantConfig fields a build may change from the prepared config: they act on weights, formats
#: or thresholds only, never on what was calibrated. ``exclude`` may grow (more layers float).
_BUILD_ONLY_FIELDS = frozenset(
    {
        "exclude",
        "cpu",
        "weights",
        "max_range_ratio",
        "ffn_spread",
        "weight_kernel",
        "block_size",
        "custom_kernels",
    }
)


@dataclass
class BudgetSearch:
    """The outcome of ``within_budget``: the chosen INT8 model, the search that found it, and the
    sensitivity ranking (empty when the full INT8 model met the budget and none was needed)."""

    fallback: FallbackResult
    built: Built
    sensitivity: list[LayerSensitivity] = field(default_factory=list)

    @property
    def model(self) -> onnx.ModelProto:
        return self.built.model


class Quantizer:
    """Quantizes ``source`` with ``config`` from the samples ``data`` describes."""

    def __init__(
        self,
        source: str | Path,
        config: QuantConfig | None = None,
        data: CalibrationData | None = None,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.source = source
        self.config = config or QuantConfig()
        self.data = data or CalibrationData()
        self._progress = progress
        self._calibrated: Calibrated | None = None
        self._feeds: dict[int, list[Feed]] = {}

    @property
    def calibrated(self) -> Calibrated:
        """The prepared float model: prepared on first use, then reused by every build."""
        if self._calibrated is None:
            self._calibrated = prepare(self.source, self.config, self.data, self._step("calibrating", None))
        return self._calibrated

    @property
    def entry(self) -> ZooModel | None:
        """The zoo family whose preprocessing the samples get (None for tensor samples)."""
        return self.calibrated.entry

    def make(self, config: QuantConfig | None = None) -> Built:
        """``build`` with what a summary needs (plan, op counts, config)."""
        return build(self.calibrated, self._compatible(config))

    def build(self, config: QuantConfig | None = None) -> onnx.ModelProto:
        """The INT8 model for ``config`` (default: the prepared config). A different config may
        only change what acts on weights and formats, or exclude more layers."""
        return self.make(config).model

    def summary(self, built: Built, output: str | Path = "") -> QuantizeResult:
        """What ``built`` quantized and kept float (and why), its sizes; ``output`` is recorded."""
        return summarize(self.calibrated, built, str(output))

    def save(self, output: str | Path, built: Built | None = None) -> QuantizeResult:
        """Write ``built`` (default: the full build of the prepared config) to ``output`` and
        summarise it; nothing is written if building fails."""
        built = built if built is not None else self.make()
        save_model(built.model, Path(output))
        return self.summary(built, output)

    def quantized_layers(self, config: QuantConfig | None = None) -> list[str]:
        """The ops a full build runs in int8, in graph order."""
        return quantized_layers(self.calibrated, self._compatible(config))

    def sample_feeds(self, limit: int) -> list[Feed]:
        """Feeds of the first ``limit`` calibration samples (read once per limit)."""
        if limit not in self._feeds:
            cal = self.calibrated
            files = cal.files[:limit]
            self._feeds[limit] = list(model_feeds(cal.proto, files, cal.entry, self.data.batch_size))
        return self._feeds[limit]

    def sensitivity(self, feeds: Sequence[Feed] | None = None, samples: int = 32) -> list[LayerSensitivity]:
        """Every layer the full model quantizes, alone, ranked worst (lowest output SNR) first; on
        ``feeds`` or else the first ``samples`` calibration samples."""
        feeds = self.sample_feeds(samples) if feeds is None else feeds
        total = len(self.quantized_layers())
        return sensitivity(self.calibrated, self.config, feeds, self._step("sensitivity", total))

    def within_budget(
        self,
        scorer: Scorer,
        max_drop: float,
        baseline: float = 1.0,
        metric: str = "metric",
        min_int8: int = 1,
        samples: int = 32,
        ranking: Sequence[str] | None = None,
    ) -> BudgetSearch:
        """The INT8 model with the fewest most-sensitive layers in float whose ``scorer`` value is
        within ``max_drop`` of ``baseline`` (QuantizationError when even all but ``min_int8``
        layers in float miss it). Sensitivity (on ``samples`` calibration samples) is computed
        only if the full INT8 model misses the budget, unless ``ranking`` is given."""
        if max_drop < 0:
            raise ConfigError(f"max_drop must be >= 0, got {max_drop}")
        ranked: list[LayerSensitivity] = []

        def rank() -> list[str]:
            ranked.extend(self.sensitivity(samples=samples))
            return [s.name for s in ranked]

        order: Sequence[str] | Callable[[], Sequence[str]] = rank if ranking is None else ranking
        result, built = fallback(
            self.calibrated, self.config, order, scorer, baseline, max_drop, metric, min_int8
        )
        return BudgetSearch(result, built, ranked)

    def _compatible(self, config: QuantConfig | None) -> QuantConfig:
        """``config`` if the prepared model can be built with it (ConfigError otherwise)."""
        if config is None or config == self.config:
            return self.config
        changed = [
            f.name
            for f in dataclasses.fields(QuantConfig)
            if f.name not in _BUILD_ONLY_FIELDS and getattr(config, f.name) != getattr(self.config, f.name)
        ]
        dropped = sorted(set(self.config.exclude) - set(config.exclude))
        if changed or dropped:
            what = ", ".join(changed + ([f"exclude (drops {dropped})"] if dropped else []))
            raise ConfigError(
                f"{self.source} was prepared for another config ({what} differ); "
                "a Quantizer builds only what its calibration covers: make one for this config"
            )
        return config

    def _step(self, label: str, total: int | None) -> Callable[[int], None] | None:
        return self._progress(label, total) if self._progress else None
