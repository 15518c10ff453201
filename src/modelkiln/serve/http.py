"""KServe v2 over HTTP (Starlette + uvicorn), as Triton's ``tritonclient.http`` speaks it, and
OpenAI-compatible chat completions for generative models (serve/openai.py).

Every error is JSON ``{"error": message}`` with a status that says whose fault it was (see
serve/context.py). An accepted request is always answered; the server keeps serving. Requests
pass serve/security.py (Host, origin, API key) before any route, and the limits of
serve/guard.py before any work; heavy parsing and encoding run on worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelkiln import __version__
from modelkiln.serve import openai
from modelkiln.serve.connection import guarded_h11
from modelkiln.serve.context import Context, status_of
from modelkiln.serve.grpc import GrpcFrontEnd, GrpcOptions
from modelkiln.serve.guard import ServeLimits
from modelkiln.serve.metrics import ServerMetrics
from modelkiln.serve.model import DEFAULT_POLICY, LoadPolicy
from modelkiln.serve.protocol import encode_response, header_length, parse_request
from modelkiln.serve.security import Security, SecurityMiddleware, cors, parse_ip
from modelkiln.serve.server import ModelServer

__all__ = ["create_app", "serve", "status_of"]
log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = ServeLimits().max_body_bytes
GIL_SWITCH_S = 0.001


def create_app(
    server: ModelServer,
    max_body: int | None = None,
    limits: ServeLimits | None = None,
    security: Security | None = None,
    bound: str = "127.0.0.1",
    grpc: GrpcOptions | None = None,
) -> SecurityMiddleware:
    """The ASGI app: routes behind the security middleware (``bound``: the address served, which
    a request's Host must name unless ``security.allowed_hosts`` says otherwise); with ``grpc``,
    the KServe v2 gRPC front end (serve/grpc.py) starts and stops with it."""
    limits = limits or ServeLimits()
    if max_body is not None:
        limits = dataclasses.replace(limits, max_body_bytes=max_body)
    ctx = Context(server, limits, ServerMetrics())
    if server.memory is not None:  # resident bytes, loads and evictions per model under a budget
        ctx.metrics.watch_memory(server, server.memory.budget)
    security = security or Security()

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        front = None
        if grpc is not None:  # its own thread and loop; same model table, metrics and keys
            front = await asyncio.to_thread(GrpcFrontEnd(ctx, security, grpc).start)
            app.state.grpc = front
        yield
        if front is not None:
            await asyncio.to_thread(front.stop)  # in-flight RPCs finish while the models are loaded
        await asyncio.to_thread(server.shutdown)  # queued requests are answered before exit

    app = Starlette(routes=kserve_routes(ctx) + openai.routes(ctx), lifespan=lifespan)
    app.state.metrics = ctx.metrics
    app.state.server = server
    app.state.context = ctx
    app.state.grpc = None
    return SecurityMiddleware(cors(app, security), security, bound)


def kserve_routes(ctx: Context) -> list[Route]:
    server = ctx.server

    def error(exc: BaseException, name: str = "", route: str = "kserve") -> JSONResponse:
        code, message = ctx.fail(exc, name, route)
        return JSONResponse({"error": message}, status_code=code, headers=_closing(code))

    async def live(_: Request) -> Response:
        return Response(status_code=200)

    async def ready(_: Request) -> Response:
        return Response(status_code=200 if server.loaded() else 503)

    async def server_meta(_: Request) -> JSONResponse:
        extensions = ["binary_tensor_data", "model_repository"]
        return JSONResponse({"name": "modelkiln", "version": __version__, "extensions": extensions})

    async def model_meta(request: Request) -> Response:
        try:
            item = server.get(request.path_params["model"], request.path_params.get("version"))
            return JSONResponse(item.model.metadata())
        except Exception as exc:  # noqa: BLE001
            return error(exc, request.path_params["model"])

    async def model_config(request: Request) -> Response:
        try:
            item = server.get(request.path_params["model"], request.path_params.get("version"))
            cfg = item.model.config
            return JSONResponse(
                {"name": cfg.name, "platform": "onnxruntime_onnx", "max_batch_size": cfg.max_batch_size}
            )
        except Exception as exc:  # noqa: BLE001
            return error(exc, request.path_params["model"])

    async def model_ready(request: Request) -> Response:
        ok = server.ready(request.path_params["model"], request.path_params.get("version"))
        return Response(status_code=200 if ok else 400)

    async def infer(request: Request) -> Response:
        name = request.path_params["model"]
        label = ctx.label(name)
        start = time.perf_counter()
        ctx.metrics.inflight.labels(label).inc()
        try:
            version, result, payload, head_len = await _infer(ctx, request, name)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, none takes the server down
            return error(exc, name, "infer")
        finally:
            ctx.metrics.inflight.labels(label).dec()
        _observe(ctx.metrics, name, version, result, time.perf_counter() - start)
        if head_len is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(head_len)},
        )

    async def repo_index(_: Request) -> JSONResponse:
        rows = server.index()
        for row in rows:
            if "reason" in row:
                row["reason"] = ctx.redact(row["reason"])
        return JSONResponse(rows)

    def repository_action(action: Callable[[str], Any]) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            try:
                await asyncio.to_thread(action, request.path_params["model"])
                return Response(status_code=200)
            except Exception as exc:  # noqa: BLE001
                return error(exc, request.path_params["model"], "repository")

        return handle

    async def prometheus(_: Request) -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    return [
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
    ]


async def _infer(ctx: Context, request: Request, name: str) -> tuple[str, Any, bytes, int | None]:
    """Read, parse (off the loop when large), queue, await, encode (off the loop when large)."""
    head = header_length(request.headers.get("inference-header-content-length"))
    raw = await ctx.body(request)
    msg = await ctx.offload(parse_request, raw, head, name, ctx.limits, size=len(raw))
    item = ctx.server.get(name, request.path_params.get("version"))
    version = str(item.model.version)  # pin the version that runs
    infer = ctx.server.infer(name, msg.inputs, version, msg.timeout_s, msg.priority_level(name))
    result = await asyncio.wrap_future(infer)
    size = sum(getattr(v, "nbytes", 0) for v in result.outputs.values())
    payload, head_len = await ctx.offload(
        encode_response, name, version, msg, result.outputs, ctx.limits.max_output_bytes, size=size
    )
    return version, result, payload, head_len


def _observe(metrics: ServerMetrics, name: str, version: str, result: Any, total_s: float) -> None:
    """A served request (its model is loaded: the name is a bounded label)."""
    metrics.success.labels(name, version).inc()
    metrics.queue.labels(name, version).observe(result.queue_s)
    metrics.compute.labels(name, version).observe(result.compute_s)
    metrics.batch.labels(name, version).observe(result.batch_size)
    metrics.request.labels(name, version).observe(total_s)


def _closing(code: int) -> dict[str, str]:
    """Close the connection after refusing a body we did not read (its rest is still coming)."""
    return {"Connection": "close"} if code in (408, 413) else {}


def serve(
    repository: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    cores: int | None = None,
    max_body: int | None = None,
    limits: ServeLimits | None = None,
    security: Security | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    policy: LoadPolicy = DEFAULT_POLICY,
    grpc_port: int | None = None,
    memory_budget: int | None = None,
) -> None:
    """Load every model in ``repository`` and serve until SIGTERM/SIGINT (in-flight requests are
    answered first); ``policy`` says what a model file must satisfy (CPU fit unless
    allow_cpu_mismatch, manifest hash, the key for encrypted models); ``grpc_port``: KServe v2
    gRPC on that port too; ``memory_budget`` (bytes): models load on first use and the least
    recently used idle ones are unloaded to stay within it (serve/budget.py)."""
    limits = limits or ServeLimits()
    security = security or Security()
    # The event loop waits this long at most for the GIL behind a worker thread running Python
    # (default 5 ms); shorter keeps health probes and small requests prompt under load.
    sys.setswitchinterval(GIL_SWITCH_S)
    server = ModelServer(repository, cores, policy, memory_budget=memory_budget)
    server.load_all()
    if not server.loaded():
        log.warning(
            "no model loaded from %s; the server starts anyway (load models with the repository API)",
            repository,
        )
    _warn_if_exposed(host, security)
    config = uvicorn.Config(
        create_app(
            server,
            max_body,
            limits,
            security,
            host,
            None if grpc_port is None else GrpcOptions(grpc_port, host, ssl_certfile, ssl_keyfile),
        ),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=30,
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]  # float seconds work (call_later)
        http=guarded_h11(limits.header_timeout_s),
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    scheme = "https" if ssl_certfile else "http"
    log.info("serving %d model(s) on %s://%s:%d (KServe v2)", len(server.loaded()), scheme, host, port)
    uvicorn.Server(config).run()


def _warn_if_exposed(host: str, security: Security) -> None:
    ip = parse_ip(host)
    if security.api_key is None and not (ip is not None and ip.is_loopback) and host != "localhost":
        log.warning(
            "serving on %s without an API key: anyone who can reach it can run and unload models "
            "(kiln serve --api-key-file FILE or KILN_API_KEY)",
            host,
        )
