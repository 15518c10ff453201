"""Typed errors: every failure a user can cause is a KilnError with one clear line of text.

The CLI prints ``str(error)`` and exits non-zero; anything that is not a KilnError is a bug and
shows its traceback.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error modelkiln raises on purpose."""


class ModelNotFound(KilnError):
    """A zoo name, model file or weights file that does not exist."""


class WeightsError(KilnError):
    """A weights file that exists but cannot be used (corrupt, foreign pickle, wrong layout)."""


class ExportError(KilnError):
    """torch -> ONNX export failed (a model that disagrees with torch is ParityFailed)."""


class BadInput(KilnError):
    """An input (image, tensor, feed) that does not match what the model expects."""


class BackendError(KilnError):
    """A runtime backend could not load or run a model."""


class MissingDependency(KilnError):
    """An optional dependency (an install extra) is needed for this step."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs '{package}', which is not installed: pip install 'modelkiln[{extra}]'"
        )
        self.package = package
        self.extra = extra


class QueueFull(KilnError):
    """A bounded queue is at capacity (backpressure: the caller should retry or shed load)."""


class DeadlineExceeded(KilnError):
    """A task's deadline passed before it could start; it was not run."""


class PoolClosed(KilnError):
    """Work was submitted to a thread pool that is shutting down or shut down."""


class PoolExhausted(KilnError):
    """A memory pool cannot hand out a buffer without exceeding its byte limit."""


class BadRelease(KilnError):
    """An array was released twice, or released to a pool that did not hand it out."""


class PassError(KilnError):
    """A graph pass produced an invalid model (a bug in the pass, reported with its name)."""


class ParityFailed(KilnError):
    """A model's outputs differ from its reference beyond tolerance: an export from torch, an
    optimised model from the original. Nothing is written when it is raised."""


class ConfigError(KilnError, ValueError):
    """An invalid option or configuration value (also a ValueError for library callers)."""


class CalibrationError(KilnError):
    """Calibration data that is missing, empty or unusable."""


class QuantizationError(KilnError):
    """A model that cannot be quantized as asked (e.g. it has no float weights)."""


class ModelUnavailable(KilnError):
    """A known model that is not loaded (or is unloading) right now."""


class PayloadTooLarge(BadInput):
    """A request body over the server's configured limit."""


class CpuMismatch(BackendError):
    """A model built for CPU instructions this machine lacks (e.g. a VNNI INT8 model on AVX2)."""
