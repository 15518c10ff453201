"""What ``kiln deploy`` is asked to do: the model, where to write, the data and the precisions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelkiln.errors import BadInput

PRECISIONS = ("fp32", "fp16", "int8")
INT8_CPUS = ("portable", "u8", "vnni", "native")


@dataclass(frozen=True)
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
    sign_key: Path | None = None  # Ed25519 private key (PEM): the manifest is signed
    encrypt_key: Path | None = None  # AES-256 key file: the shipped models are encrypted

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

    @property
    def labels_or_beside(self) -> Path | None:
        """--labels, or ``labels.csv`` in the --eval folder when there is one."""
        if self.labels is not None:
            return self.labels
        if self.eval_data is not None and (self.eval_data / "labels.csv").is_file():
            return self.eval_data / "labels.csv"
        return None
