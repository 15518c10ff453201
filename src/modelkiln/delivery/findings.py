"""What a check found: one line a person reads and a dict CI reads.

Every finding names the check and, where it concerns one, the model and precision, with what was
expected and what came, so a failure on a target machine can be acted on without a debugger.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Status(str, enum.Enum):
    """PASS and SKIP never fail a package; WARN is shown but does not fail it; FAIL does."""

    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"


@dataclass(frozen=True)
class Finding:
    """One check's outcome. ``check`` is one of: manifest, integrity, signature, host, golden,
    golden-fp32, top1, determinism, threads, soak."""

    check: str
    status: Status
    message: str
    model: str | None = None
    precision: str | None = None
    expected: str | None = None
    got: str | None = None

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL

    def line(self) -> str:
        """``[fail] golden resnet/int8: message: expected ..., got ...``."""
        where = "/".join(p for p in (self.model, self.precision) if p)
        line = f"[{self.status.value}] {self.check}" + (f" {where}" if where else "") + f": {self.message}"
        if self.expected is not None or self.got is not None:
            line += f": expected {self.expected}, got {self.got}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status.value,
            "model": self.model,
            "precision": self.precision,
            "expected": self.expected,
            "got": self.got,
            "message": self.message,
        }
