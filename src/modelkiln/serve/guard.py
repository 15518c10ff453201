"""What the server checks before it does any work for a request: the limits (body, JSON shape,
images, prompt, response size, time to send a body), and a JSON reader that refuses a body whose
nesting or numbers would make Python's parser recurse or spin before it tries.

Every refusal is a BadInput (400) or PayloadTooLarge (413) whose message names the field and the
limit, so a client can tell what to change; ``kiln serve`` flags set the limits.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from modelkiln.errors import BadInput, ConfigError, KilnError

#: A JSON string literal (escapes included), blanked before counting brackets and digits.
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: linear, no backtracking
_DIGIT_MASK = bytes(ord("0") if chr(i).isdigit() and i < 128 else ord(" ") for i in range(256))
_REPR = reprlib.Repr()  # bounded repr of echoed values (Python 3.11 takes no keyword arguments)
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlist, _REPR.maxdict = 80, 80, 40, 8, 8


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on the work one request can ask for (defaults keep any single request well under
    1 GB of memory); every refusal names the limit it hit."""

    max_body_bytes: int = 64 << 20
    max_json_depth: int = 64
    #: Longest digit run of a JSON number: int() is quadratic in it and refuses 4 300 digits;
    #: no tensor value or option needs more than a few dozen.
    max_number_digits: int = 100
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 80_000_000
    max_images: int = 16
    max_prompt_bytes: int = 1 << 20
    max_output_bytes: int = 64 << 20
    #: Seconds a client may take to send a whole request body (slow uploads are cut off: 408).
    body_timeout_s: float = 60.0
    #: Seconds a connection may take to send a request's headers (slowloris).
    header_timeout_s: float = 10.0
    #: Seconds an idle keep-alive connection stays open.
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"serve limit {f.name} must be a positive number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"serve limit {f.name} must be finite, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ConfigError(f"serve limit {f.name} must be an integer, got {value!r}")


class ClientGone(KilnError):
    """The client closed the connection before its request was read or answered (not a fault)."""


class BodyTimeout(BadInput):
    """The client took longer than body_timeout_s to send its request body."""


def load_json(raw: bytes, limits: ServeLimits, what: str) -> Any:
    """Parse a JSON body after checking its nesting depth and number lengths; BadInput naming
    ``what`` and the limit otherwise (never RecursionError or ValueError from the parser)."""
    check_json_shape(raw, limits, what)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{what} is not valid JSON: {exc}") from None
    except (RecursionError, ValueError) as exc:  # belt and braces: the scan should have caught it
        raise BadInput(f"{what} is not acceptable JSON: {exc}") from None


def check_json_shape(raw: bytes, limits: ServeLimits, what: str) -> None:
    """Refuse nesting deeper than max_json_depth and numbers longer than max_number_digits.

    Cheap for ordinary bodies: the string-stripping scan runs only when the body has more
    brackets than the depth limit or a digit run longer than the number limit."""
    deep = raw.count(b"[") + raw.count(b"{") > limits.max_json_depth
    if not deep and not _long_digit_run(raw, limits.max_number_digits):
        return
    bare = _STRINGS.sub(b'""', raw)  # brackets and digits inside strings do not count
    if _long_digit_run(bare, limits.max_number_digits):
        raise BadInput(
            f"{what}: a JSON number has more than {limits.max_number_digits} digits (max_number_digits)"
        )
    if deep and json_depth(bare) > limits.max_json_depth:
        raise BadInput(f"{what}: JSON nested deeper than {limits.max_json_depth} levels (max_json_depth)")


def _long_digit_run(raw: bytes, limit: int, window: int = 1 << 20) -> bool:
    """Whether ``raw`` has more than ``limit`` digits in a row (translate + find at C speed, a
    window at a time with an overlap, so no single call holds the GIL for long)."""
    run = b"0" * (limit + 1)
    return any(
        raw[i : i + window + limit].translate(_DIGIT_MASK).find(run) >= 0 for i in range(0, len(raw), window)
    )


def json_depth(bare: bytes) -> int:
    """Deepest nesting of a JSON text whose strings are already blanked (vectorised)."""
    data = np.frombuffer(bare, np.uint8)
    opens = (data == ord("[")) | (data == ord("{"))
    closes = (data == ord("]")) | (data == ord("}"))
    steps = opens[opens | closes].astype(np.int32) * 2 - 1
    return int(np.cumsum(steps).max(initial=0))


def finite_number(value: Any, field: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A real number in [low, high]; BadInput naming ``field`` otherwise (NaN and inf included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{field} must be a number, got {shown(value)}")
    number = float(value) if not isinstance(value, int) or abs(value) < 1 << 1000 else math.inf
    if not math.isfinite(number) or not low <= number <= high:
        raise BadInput(f"{field} must be a finite number in [{low:g}, {high:g}], got {shown(value)}")
    return number


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages echo what came, boundedly."""
    text = _REPR.repr(value)
    return text if len(text) <= limit + 2 else text[:limit] + "…"
