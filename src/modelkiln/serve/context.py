"""What every HTTP route of a server shares: reading a body within its limits, worker threads for
heavy work (JSON parsing, image decoding, encoding large responses) so the event loop stays free
for everyone else, metric labels that only ever name loaded models, and turning a failure into a
status and a message that is safe to send (no file path, no exception class, bounded length).

Statuses say whose fault it was: 400 bad request, 404 unknown model, 408 body too slow, 413 too
large, 499 client gone (nobody to answer), 503 busy or unavailable, 504 timed out, 500 our bug
(logged with its traceback and a reference the client can quote).
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import ClientDisconnect, Request

from modelkiln.errors import (
    BadInput,
    ConfigError,
    CpuMismatch,
    DeadlineExceeded,
    KilnError,
    ModelNotFound,
    ModelUnavailable,
    PayloadTooLarge,
    PoolClosed,
    PoolExhausted,
    QueueFull,
)
from modelkiln.serve.guard import BodyTimeout, ClientGone, ServeLimits
from modelkiln.serve.metrics import ServerMetrics
from modelkiln.serve.server import ModelServer

log = logging.getLogger("modelkiln.serve.http")
T = TypeVar("T")

STATUS = [
    (PayloadTooLarge, 413),
    (BodyTimeout, 408),
    (BadInput, 400),
    (ConfigError, 400),
    (CpuMismatch, 400),  # a load refused by the model's config, not a server fault
    (ModelNotFound, 404),
    (QueueFull, 503),
    (ModelUnavailable, 503),
    (PoolClosed, 503),
    (PoolExhausted, 503),  # memory pool full (e.g. KV caches of running chats): busy, try again
    (DeadlineExceeded, 504),
    (ClientGone, 499),  # nginx's "client closed request": nobody reads the answer
]
MAX_MESSAGE = 2000  # characters of an error message sent back
INLINE_BYTES = 64 << 10  # bodies this small are parsed on the loop (a thread hop costs more)


def status_of(exc: BaseException) -> int:
    if _runtime_refused_input(exc):
        return 400
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 500)


def _runtime_refused_input(exc: BaseException) -> bool:
    """ONNX Runtime's INVALID_ARGUMENT (values the model's own checks refuse, e.g. dimensions a
    Reshape inside cannot take): the request's fault, reported as a 400 with the runtime's text."""
    kind = type(exc)
    return kind.__name__ == "InvalidArgument" and kind.__module__.startswith("onnxruntime")


@dataclass
class Context:
    server: ModelServer
    limits: ServeLimits
    metrics: ServerMetrics
    #: Heavy per-request work in threads, two at a time: each may hold a body-sized copy, and
    #: more threads contending for the GIL only delay the event loop (more waits per handoff).
    limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(2))

    async def body(self, request: Request) -> bytes:
        """The request body within max_body_bytes and body_timeout_s (a slow upload is cut off)."""
        declared = request.headers.get("content-length")
        limit = self.limits.max_body_bytes
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"request body of {declared} bytes exceeds the {limit}-byte limit (max_body_bytes)"
            )
        try:
            with anyio.fail_after(self.limits.body_timeout_s):
                return await self._read(request, limit)
        except TimeoutError:
            raise BodyTimeout(
                f"request body not received within {self.limits.body_timeout_s:g} s (body_timeout_s)"
            ) from None
        except ClientDisconnect:
            raise ClientGone("client disconnected while sending its request") from None

    @staticmethod
    async def _read(request: Request, limit: int) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit (max_body_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def offload(self, fn: Callable[..., T], *args: Any, size: int | None = None) -> T:
        """``fn(*args)`` on a worker thread, unless ``size`` says the work is small."""
        if size is not None and size <= INLINE_BYTES:
            return fn(*args)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.limiter)

    def label(self, name: str) -> str:
        """A metric label: the model's name if it is loaded, else one shared 'unknown' bucket (junk
        names must never become label values: each is a time series kept forever)."""
        return name if self.server.has(name) else "unknown"

    def fail(self, exc: BaseException, name: str, route: str) -> tuple[int, str]:
        """Count and log a failed request; its status and the message safe to send."""
        code = status_of(exc)
        if code == 499:
            self.metrics.disconnects.labels(route).inc()
            log.info("%s: %s", route, exc)
            return code, str(exc)
        self.metrics.failure.labels(self.label(name), "", type(exc).__name__).inc()
        if code != 500:
            log.debug("%s refused (%d): %s", route, code, exc)
            return code, self.redact(str(exc))
        ref = uuid.uuid4().hex[:12]
        log.error("%s failed (ref %s): %s", route, ref, exc, exc_info=exc)
        if isinstance(exc, KilnError):
            return code, f"{self.redact(str(exc))} (ref {ref})"
        return code, f"internal error (ref {ref}; the server log has the details)"

    def redact(self, message: str) -> str:
        """No repository path and no unbounded echo in what a client is told; text that any JSON
        encoder takes (a lone surrogate in an echoed name would fail the error response itself)."""
        root = str(self.server.repository.root)
        for prefix in {root, os.path.realpath(root)}:
            message = message.replace(prefix + os.sep, "").replace(prefix, "<repository>")
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "…"
        return message.encode("utf-8", "backslashreplace").decode("utf-8")
