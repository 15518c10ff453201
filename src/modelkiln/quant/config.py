"""Quantization configuration: frozen dataclasses with enums and typed granularity."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from modelkiln.errors import ConfigError
from modelkiln.quantmath import is_nbits_block


class Method(enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class Target(enum.Enum):
    CPU = "cpu"  # ONNX Runtime integer kernels: uint8 asymmetric activations
    TRT = "trt"  # TensorRT explicit quantization: int8 symmetric activations


class Int8Cpu(enum.Enum):
    """Which CPUs an ONNX Runtime INT8 model is built for (how it stores its weights).

    x86 CPUs without an int32 dot product (AVX2, AVX-512BW without VNNI) multiply uint8 x int8 with
    VPMADDUBSW, which adds neighbouring products into a saturating int16: full-range int8 weights
    overflow it. PORTABLE keeps int8 weights but pulls in the few neighbouring pairs that could
    overflow (quant/pairsafe.py): exact on every x86-64 and ARM64 CPU, with the fast u8 x s8
    kernels everywhere. U8 stores uint8 weights (zero point 128, all 255 levels), which ONNX Runtime
    runs with u8 x u8 kernels that widen before multiplying: exact everywhere, full resolution,
    slower. VNNI keeps plain int8 weights: exact and fastest with AVX512-VNNI, AVX-VNNI, AMX-INT8
    or on ARM64, saturating elsewhere. NATIVE is resolved when the model is built: VNNI where this
    CPU has an int32 dot product, else PORTABLE."""

    PORTABLE = "portable"
    U8 = "u8"
    VNNI = "vnni"
    NATIVE = "native"


class WeightKernel(enum.Enum):
    """How a weight-only model computes: DEQUANTIZE (DequantizeLinear + the float op: any runtime,
    TensorRT included) or MATMUL_NBITS (ONNX Runtime's MatMulNBits, 8-bit, integer compute:
    the fast CPU kernel for memory-bound decoder MatMuls)."""

    DEQUANTIZE = "dequantize"
    MATMUL_NBITS = "matmulnbits"


@dataclass(frozen=True)
class PerTensor:
    pass


@dataclass(frozen=True)
class PerChannel:
    axis: int = 0


@dataclass(frozen=True)
class QuantConfig:
    method: Method = Method.PERCENTILE
    percentile: float = 99.999
    weights: PerTensor | PerChannel = field(default_factory=PerChannel)
    target: Target = Target.CPU
    #: INT8 format for ONNX Runtime CPU kernels (ignored for the trt target).
    cpu: Int8Cpu = Int8Cpu.PORTABLE
    exclude: tuple[str, ...] = ()
    #: A Concat whose input ranges differ by more than this stays float (one 8-bit scale cannot
    #: serve, e.g., pixel boxes and 0-1 scores together).
    max_range_ratio: float = 16.0
    #: Also run Sigmoid and activation*activation Mul (SiLU) in int8 (QLinearSigmoid/QLinearMul)
    #: instead of float between dequantize and quantize.
    int8_silu: bool = False
    #: Element-wise activations between two quantized tensors (SiLU, Sigmoid, Hardswish, GELU...)
    #: run as one exact 256-entry lookup, modelkiln's ``LookupTable`` kernel, when kiln's runtime
    #: loads the model on ONNX Runtime CPU (runtime/kernels/lookup.py; the model's metadata asks
    #: for it). The file stays standard QDQ for every runtime either way. False: standard kernels
    #: only, in kiln too (``kiln quantize --standard-ops``).
    custom_kernels: bool = True
    #: Transformer defaults (residual Adds and attention MatMuls stay float, as do LayerNorm,
    #: Softmax and GELU, which no rule quantizes): None detects transformer blocks in the graph.
    transformer: bool | None = None
    #: In a transformer, also quantize the attention MatMuls (Q @ K^T, P @ V).
    int8_attention: bool = False
    #: In a transformer, quantize every FFN down-projection (linear reading a GELU output). By
    #: default one stays float when its input's largest channel (max |x|) exceeds ``ffn_spread``
    #: times the median channel: a per-tensor 8-bit scale then spends 3+ bits on a few channels.
    int8_ffn_down: bool = False
    ffn_spread: float = 8.0
    #: SmoothQuant migration strength alpha in [0, 1]; None disables it.
    smoothquant: float | None = None
    #: Only weights become int8 (per channel, DequantizeLinear before the float op): no calibration.
    weight_only: bool = False
    #: Weight-only kernel; MATMUL_NBITS applies to MatMuls with a 2-D constant weight (others
    #: fall back to DEQUANTIZE).
    weight_kernel: WeightKernel = WeightKernel.DEQUANTIZE
    #: MATMUL_NBITS block along K: 0 is one block per output channel (per-channel); else a power
    #: of two >= 16 (finer scales, a little more memory).
    block_size: int = 0
    #: MatMul activations quantized per batch at run time (DynamicQuantizeLinear), weights int8:
    #: no calibration; ONNX Runtime CPU only (TensorRT has no dynamic quantization).
    dynamic: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.method, Method):
            raise ConfigError(f"method must be a Method, got {self.method!r}")
        if not isinstance(self.target, Target):
            raise ConfigError(f"target must be a Target, got {self.target!r}")
        if not isinstance(self.cpu, Int8Cpu):
            raise ConfigError(f"cpu must be an Int8Cpu, got {self.cpu!r}")
        if not isinstance(self.weights, (PerTensor, PerChannel)):
            raise ConfigError(f"weights must be PerTensor() or PerChannel(axis), got {self.weights!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.smoothquant is not None and not 0.0 <= self.smoothquant <= 1.0:
            raise ConfigError(f"smoothquant alpha must be in [0, 1], got {self.smoothquant}")
        if self.weight_only and self.smoothquant is not None:
            raise ConfigError("smoothquant needs quantized activations; it does nothing with weight_only")
        if self.dynamic and (self.weight_only or self.smoothquant is not None or self.target is Target.TRT):
            raise ConfigError("dynamic quantization excludes weight_only, smoothquant and the trt target")
        if not isinstance(self.weight_kernel, WeightKernel):
            raise ConfigError(f"weight_kernel must be a WeightKernel, got {self.weight_kernel!r}")
        if self.weight_kernel is WeightKernel.MATMUL_NBITS and not self.weight_only:
            raise ConfigError("the matmulnbits kernel is for weight-only quantization (weight_only=True)")
        if self.block_size and not is_nbits_block(self.block_size):
            raise ConfigError(
                f"block_size must be 0 (the largest power of two dividing K) or a power of two >= 16, "
                f"got {self.block_size}"
            )
        if self.ffn_spread < 1:
            raise ConfigError(f"ffn_spread must be >= 1, got {self.ffn_spread}")
        if self.max_range_ratio < 1:
            raise ConfigError(f"max_range_ratio must be >= 1, got {self.max_range_ratio}")

    @property
    def symmetric_activations(self) -> bool:
        return self.target is Target.TRT


@dataclass(frozen=True)
class CalibrationData:
    """The samples a model is calibrated on: a folder of images (which get the preprocessing of
    the ``zoo`` family) or of .npy/.npz tensors; at most ``limit`` of them (0: all), run
    ``batch_size`` at a time. Weight-only and dynamic quantization need no folder."""

    folder: str | Path | None = None
    zoo: str | None = None
    limit: int = 100
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ConfigError(f"calibration sample limit must be >= 0, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch size must be >= 1, got {self.batch_size}")
