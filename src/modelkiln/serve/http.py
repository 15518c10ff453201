"""KServe v2 over HTTP (Starlette + uvicorn), as Triton's ``tritonclient.http`` speaks it, and
OpenAI-compatible chat completions for generative models (serve/openai.py).

Every error is JSON ``{"error": message}`` with a status that says whose fault it was: 400 bad
request, 404 unknown model, 413 body too large, 503 queue or memory pool full or model unavailable, 504 request
timed out, 500 server fault. An accepted request is always answered; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelkiln import __version__
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
from modelkiln.serve import openai
from modelkiln.serve.metrics import ServerMetrics
from modelkiln.serve.protocol import encode_response, parse_request
from modelkiln.serve.server import ModelServer

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 64 << 20
STATUS = [
    (PayloadTooLarge, 413),
    (BadInput, 400),
    (ConfigError, 400),
    (CpuMismatch, 400),  # a load refused by the model's config, not a server fault
    (ModelNotFound, 404),
    (QueueFull, 503),
    (ModelUnavailable, 503),
    (PoolClosed, 503),
    (PoolExhausted, 503),  # memory pool full (e.g. KV caches of running chats): busy, try again
    (DeadlineExceeded, 504),
]


def status_of(exc: BaseException) -> int:
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 500)


def error(exc: BaseException) -> JSONResponse:
    code = status_of(exc)
    message = str(exc) if isinstance(exc, KilnError) else f"internal error: {type(exc).__name__}: {exc}"
    if code == 500:
        log.error("request failed: %s", message, exc_info=not isinstance(exc, KilnError))
    return JSONResponse({"error": message}, status_code=code)


def create_app(server: ModelServer, max_body: int = DEFAULT_MAX_BODY) -> Starlette:
    metrics = ServerMetrics()

    async def body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {max_body}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise PayloadTooLarge(f"request body exceeds the {max_body}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def live(_: Request) -> Response:
        return Response(status_code=200)

    async def ready(_: Request) -> Response:
        return Response(status_code=200 if server.loaded() else 503)

    async def server_meta(_: Request) -> JSONResponse:
        return JSONResponse(
            {
                "name": "modelkiln",
                "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository"],
            }
        )

    async def model_meta(request: Request) -> Response:
        try:
            item = server.get(request.path_params["model"], request.path_params.get("version"))
            return JSONResponse(item.model.metadata())
        except Exception as exc:  # noqa: BLE001
            return error(exc)

    async def model_config(request: Request) -> Response:
        try:
            item = server.get(request.path_params["model"], request.path_params.get("version"))
            cfg = item.model.config
            return JSONResponse(
                {"name": cfg.name, "platform": "onnxruntime_onnx", "max_batch_size": cfg.max_batch_size}
            )
        except Exception as exc:  # noqa: BLE001
            return error(exc)

    async def model_ready(request: Request) -> Response:
        ok = server.ready(request.path_params["model"], request.path_params.get("version"))
        return Response(status_code=200 if ok else 400)

    async def infer(request: Request) -> Response:
        name = request.path_params["model"]
        version = request.path_params.get("version")
        start = time.perf_counter()
        label_version = version or ""
        metrics.inflight.labels(name).inc()
        try:
            raw = await body(request)
            header = request.headers.get("inference-header-content-length")
            if header is not None and not header.isdigit():
                raise BadInput(f"Inference-Header-Content-Length must be an integer, got {header!r}")
            msg = parse_request(raw, int(header) if header is not None else None, name)
            label_version = str(server.get(name, version).model.version)  # pin the version that runs
            future = server.infer(name, msg.inputs, label_version, msg.timeout_s)
            result = await asyncio.wrap_future(future)
            payload, head_len = encode_response(name, label_version, msg, result.outputs)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, none takes the server down
            metrics.failure.labels(name, label_version, type(exc).__name__).inc()
            return error(exc)
        finally:
            metrics.inflight.labels(name).dec()
        metrics.success.labels(name, label_version).inc()
        metrics.queue.labels(name, label_version).observe(result.queue_s)
        metrics.compute.labels(name, label_version).observe(result.compute_s)
        metrics.batch.labels(name, label_version).observe(result.batch_size)
        metrics.request.labels(name, label_version).observe(time.perf_counter() - start)
        if head_len is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(head_len)},
        )

    async def repo_index(_: Request) -> JSONResponse:
        return JSONResponse(server.index())

    def repository_action(action: Callable[[str], Any]) -> Callable:
        async def handle(request: Request) -> Response:
            try:
                await asyncio.to_thread(action, request.path_params["model"])
                return Response(status_code=200)
            except Exception as exc:  # noqa: BLE001
                return error(exc)

        return handle

    async def prometheus(_: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(_: Any):
        yield
        await asyncio.to_thread(server.shutdown)  # queued requests are answered before exit

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_meta),
        Route("/v2/models/{model}", model_meta),
        Route("/v2/models/{model}/versions/{version}", model_meta),
        Route("/v2/models/{model}/config", model_config),
        Route("/v2/models/{model}/versions/{version}/config", model_config),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", repo_index, methods=["POST", "GET"]),
        Route("/v2/repository/models/{model}/load", repository_action(server.load), methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_action(server.unload), methods=["POST"]),
        Route("/metrics", prometheus),
        *openai.routes(server, body, status_of, metrics),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.metrics = metrics
    app.state.server = server
    return app


def serve(
    repository: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    cores: int | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    allow_cpu_mismatch: bool = False,
) -> None:
    """Load every model in ``repository`` and serve until SIGTERM/SIGINT (in-flight requests are
    answered first); ``allow_cpu_mismatch`` serves INT8 models this CPU cannot run exactly."""
    import uvicorn

    server = ModelServer(repository, cores, allow_cpu_mismatch)
    server.load_all()
    if not server.loaded():
        log.warning(
            "no model loaded from %s; the server starts anyway (load models with the repository API)",
            repository,
        )
    config = uvicorn.Config(
        create_app(server, max_body),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=30,
    )
    log.info("serving %d model(s) on http://%s:%d (KServe v2)", len(server.loaded()), host, port)
    uvicorn.Server(config).run()
