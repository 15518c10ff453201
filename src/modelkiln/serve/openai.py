"""OpenAI-compatible chat completions for the generative models of a server.

    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p",
                                 "seed", "stream"}
    GET  /v1/models

Messages take text and ``image_url`` parts with ``data:`` URLs (the server never downloads).
``stream: true`` answers with server-sent events (``chat.completion.chunk`` objects, then
``data: [DONE]``). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
with the same statuses as the KServe API. Sampling defaults follow OpenAI (temperature 1); without
max_tokens an answer may run to the model's max_new_tokens or the end of its context.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from modelkiln.errors import BadInput, KilnError
from modelkiln.genai.engine import Sampling
from modelkiln.genai.images import FORMATS, decode_rgb
from modelkiln.serve.generation import ChatJob, ChatResult
from modelkiln.serve.server import ModelServer

ROLES = ("system", "user", "assistant")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed chat checks that its client is there
UNSUPPORTED = ("tools", "functions", "tool_choice", "logprobs", "response_format")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    job: ChatJob
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with token counts


def parse_chat(data: Any) -> ChatRequest:
    """A request body as a ChatRequest; BadInput naming the field otherwise."""
    if not isinstance(data, dict):
        raise BadInput("chat completions: the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadInput("chat completions: 'model' (a string) is required")
    for key in UNSUPPORTED:
        if data.get(key) not in (None, False):
            raise BadInput(f"chat completions: '{key}' is not supported by {model}")
    if data.get("n", 1) != 1:
        raise BadInput(f"chat completions: only n=1 is supported, got {data.get('n')!r}")
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadInput("chat completions: 'messages' must be a non-empty list")
    images: list[np.ndarray] = []
    messages = [_message(m, i, images) for i, m in enumerate(raw)]
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise BadInput(f"chat completions: max_tokens must be a positive integer, got {max_tokens!r}")
    sampling = Sampling(
        _number(data, "temperature", 1.0), _number(data, "top_p", 1.0), _seed(data.get("seed"))
    )
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadInput(f"chat completions: 'stream' must be true or false, got {stream!r}")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadInput("chat completions: 'stream_options' must be an object")
    usage = bool(options.get("include_usage", False))
    return ChatRequest(model, ChatJob(messages, images, max_tokens, sampling), stream, usage)


def _number(data: dict, key: str, default: float) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadInput(f"chat completions: '{key}' must be a number, got {value!r}")
    return float(value)


def _seed(value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadInput(f"chat completions: 'seed' must be an integer, got {value!r}")
    return value


def _message(m: Any, i: int, images: list[np.ndarray]) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise BadInput(f"chat completions: {where} needs a role in {ROLES}")
    content = m.get("content")
    if isinstance(content, str):
        return {"role": m["role"], "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise BadInput(f"chat completions: {where}.content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            images.append(_image(part.get("image_url"), f"{where}.content[{j}]"))
            parts.append({"type": "image"})
        else:
            raise BadInput(f"chat completions: {where}.content[{j}] must be a text or image_url part")
    return {"role": m["role"], "content": parts}


def _image(ref: Any, where: str) -> np.ndarray:
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadInput(
            f"chat completions: {where}: image_url must be a data: URL (this server does not download)"
        )
    head, _, payload = url.partition(",")
    media = head[5:].split(";")[0].lower()
    if not media.startswith("image/") or media[6:] not in set(FORMATS.values()) | set(FORMATS):
        raise BadInput(
            f"chat completions: {where}: unsupported image type {media!r}; use {sorted(set(FORMATS.values()))}"
        )
    if ";base64" not in head:
        raise BadInput(f"chat completions: {where}: the data URL must be base64-encoded")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"chat completions: {where}: invalid base64 in the data URL") from None
    return decode_rgb(data, where)


def completion(model: str, cid: str, result: ChatResult) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result),
    }


def usage(result: ChatResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def chunk(
    model: str, cid: str, delta: dict[str, str] | None, finish: str | None = None, tokens: dict | None = None
) -> bytes:
    """One server-sent event; ``delta`` None is the usage-only chunk (no choices)."""
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if tokens is not None:
        body["usage"] = tokens
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def error_text(exc: BaseException) -> str:
    """What a client is told: our errors' own messages; for anything else only its type."""
    return str(exc) if isinstance(exc, KilnError) else f"internal error: {type(exc).__name__}"


def openai_error(exc: BaseException, status: int) -> JSONResponse:
    message = error_text(exc)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


def routes(
    server: ModelServer,
    body: Callable[[Request], Awaitable[bytes]],
    status_of: Callable[[BaseException], int],
    metrics: Any,
) -> list[Route]:
    async def chat_completions(request: Request) -> Response:
        name = "?"
        try:
            raw = await body(request)
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BadInput(f"chat completions: body is not valid JSON: {exc}") from None
            req = parse_chat(data)
            name = req.model
            cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            if req.stream:
                return _stream(server, req, cid, metrics)
            future = server.chat(name, req.job)
            result = await _unless_disconnected(request, req.job, asyncio.wrap_future(future))
        except Exception as exc:  # noqa: BLE001 - every failure is answered
            metrics.failure.labels(name, "", type(exc).__name__).inc()
            return openai_error(exc, status_of(exc))
        metrics.observe_chat(name, result)
        return JSONResponse(completion(name, cid, result))

    async def models(_: Request) -> JSONResponse:
        rows = [{"id": n, "object": "model", "owned_by": "modelkiln"} for n in server.generative()]
        return JSONResponse({"object": "list", "data": rows})

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models),
    ]


async def _unless_disconnected(request: Request, job: ChatJob, answer: Awaitable[ChatResult]) -> ChatResult:
    """The chat's result; if the client goes away first, the chat is cancelled (it stops at its
    next decode round) and its result, a short "cancelled" one, goes nowhere."""
    answer = asyncio.ensure_future(answer)
    while True:
        done, _ = await asyncio.wait({answer}, timeout=DISCONNECT_POLL_S)
        if done:
            return answer.result()
        if await request.is_disconnected():
            job.cancelled.set()
            return await answer


def _stream(server: ModelServer, req: ChatRequest, cid: str, metrics: Any) -> Response:
    """Queue the chat now (so a refusal is a plain error status), then stream its pieces."""
    name, job = req.model, req.job
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    job.emit = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    future = server.chat(name, job)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))

    async def events() -> AsyncIterator[bytes]:
        try:
            yield chunk(name, cid, {"role": "assistant", "content": ""})
            while (piece := await pieces.get()) is not None:
                yield chunk(name, cid, {"content": piece})
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band
                metrics.failure.labels(name, "", type(exc).__name__).inc()
                error = {"error": {"message": error_text(exc), "type": "server_error"}}
                yield b"data: " + json.dumps(error).encode() + b"\n\n"
            else:
                metrics.observe_chat(name, result)
                yield chunk(name, cid, {}, result.finish_reason)
                if req.include_usage:
                    yield chunk(name, cid, None, tokens=usage(result))
            yield b"data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # client gone or stream over: stop decoding for nobody

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
