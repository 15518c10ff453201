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
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from modelkiln.errors import BadInput, PayloadTooLarge
from modelkiln.genai.engine import Sampling
from modelkiln.serve.context import Context
from modelkiln.serve.generation import ChatJob, ChatResult
from modelkiln.serve.guard import ClientGone, ServeLimits, finite_number, load_json, shown
from modelkiln.serve.protocol import request_priority
from modelkiln.zoo.image_header import read_header
from modelkiln.zoo.images import FORMATS, decode_image

ROLES = ("system", "user", "assistant")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed chat checks that its client is there
UNSUPPORTED = ("tools", "functions", "tool_choice", "logprobs", "response_format")
MIN_TEMPERATURE = 1e-4  # below this (but above 0) the scaled logits overflow float64
MAX_SEED = 1 << 63
B64_CHUNK = 1 << 20  # base64 characters decoded at a time (a multiple of 4: padding stays at the end)
DEFAULT_LIMITS = ServeLimits()


@dataclass(frozen=True)
class ChatRequest:
    model: str
    job: ChatJob
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with token counts
    #: The chat's priority level (0 most urgent; None: the model's), from an optional ``priority``
    #: field numbered as Triton's parameter (serve/protocol.request_priority).
    priority: int | None = None


def parse_chat(data: Any, limits: ServeLimits = DEFAULT_LIMITS) -> ChatRequest:
    """A request body as a ChatRequest; BadInput naming the field (and the limit) otherwise.
    Images are checked from their headers, each and all together, before any is decoded."""
    if not isinstance(data, dict):
        raise BadInput("chat completions: the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadInput("chat completions: 'model' (a string) is required")
    for key in UNSUPPORTED:
        if data.get(key) not in (None, False):
            raise BadInput(f"chat completions: '{key}' is not supported by {shown(model)}")
    if data.get("n", 1) != 1:
        raise BadInput(f"chat completions: only n=1 is supported, got {shown(data.get('n'))}")
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadInput("chat completions: 'messages' must be a non-empty list")
    encoded: list[tuple[bytes, str]] = []
    messages = [_message(m, i, encoded) for i, m in enumerate(raw)]
    _check_prompt_bytes(messages, limits)
    images = _decode_images(encoded, limits)
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise BadInput(f"chat completions: max_tokens must be a positive integer, got {shown(max_tokens)}")
    sampling = Sampling(
        _temperature(data.get("temperature")), _top_p(data.get("top_p")), _seed(data.get("seed"))
    )
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadInput(f"chat completions: 'stream' must be true or false, got {shown(stream)}")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadInput("chat completions: 'stream_options' must be an object")
    usage = bool(options.get("include_usage", False))
    priority = request_priority(data.get("priority"), model)
    return ChatRequest(
        model, ChatJob(messages, images, max_tokens, sampling, priority=priority), stream, usage, priority
    )


def _temperature(value: Any) -> float:
    """OpenAI's range [0, 2]; 0 is greedy. A positive value below MIN_TEMPERATURE would overflow
    the logits it divides (1e-320 gives inf, then NaN probabilities), so it is refused."""
    if value is None:
        return 1.0
    t = finite_number(value, "chat completions: 'temperature'", 0.0, 2.0)
    if 0 < t < MIN_TEMPERATURE:
        raise BadInput(
            f"chat completions: 'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {t!r}"
        )
    return t


def _top_p(value: Any) -> float:
    if value is None:
        return 1.0
    p = finite_number(value, "chat completions: 'top_p'", 0.0, 1.0)
    if p == 0:
        raise BadInput("chat completions: 'top_p' must be in (0, 1], got 0")
    return p


def _seed(value: Any) -> int | None:
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_SEED
    ):
        raise BadInput(f"chat completions: 'seed' must be an integer in [0, 2**63), got {shown(value)}")
    return value


def _message(m: Any, i: int, images: list[tuple[bytes, str]]) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise BadInput(f"chat completions: {where} needs a role in {ROLES}")
    content = m.get("content")
    if isinstance(content, str):
        return {"role": m["role"], "content": [{"type": "text", "text": _text(content, f"{where}.content")}]}
    if not isinstance(content, list):
        raise BadInput(f"chat completions: {where}.content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": _text(part["text"], f"{where}.content[{j}].text")})
        elif kind == "image_url":
            images.append((_image(part.get("image_url"), f"{where}.content[{j}]"), f"{where}.content[{j}]"))
            parts.append({"type": "image"})
        else:
            raise BadInput(f"chat completions: {where}.content[{j}] must be a text or image_url part")
    return {"role": m["role"], "content": parts}


def _text(text: str, where: str) -> str:
    """Text the tokenizer can take: JSON allows lone UTF-16 surrogates (\\ud800), UTF-8 does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInput(
            f"chat completions: {where} is not valid Unicode text (a lone surrogate at {exc.start})"
        ) from None
    return text


def _check_prompt_bytes(messages: list[dict[str, Any]], limits: ServeLimits) -> None:
    """The text's size before any of it is templated or tokenised (tokens are checked later, before
    the prompt is embedded: each token is at least a byte, so this bounds the tokeniser's work)."""
    size = sum(len(p["text"].encode("utf-8")) for m in messages for p in m["content"] if "text" in p)
    if size > limits.max_prompt_bytes:
        raise PayloadTooLarge(
            f"chat completions: the messages' text is {size} bytes; the limit is "
            f"{limits.max_prompt_bytes} bytes (max_prompt_bytes)"
        )


def _image(ref: Any, where: str) -> bytes:
    """The encoded bytes of a data: URL (not decoded yet: sizes are checked first)."""
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadInput(
            f"chat completions: {where}: image_url must be a data: URL (this server does not download)"
        )
    head, _, payload = url.partition(",")
    media = head[5:].split(";")[0].lower()
    if not media.startswith("image/") or media[6:] not in set(FORMATS.values()) | set(FORMATS):
        raise BadInput(
            f"chat completions: {where}: unsupported image type {shown(media)}; use {sorted(set(FORMATS.values()))}"
        )
    if ";base64" not in head:
        raise BadInput(f"chat completions: {where}: the data URL must be base64-encoded")
    try:  # a piece at a time: one call over 16 MB would hold the GIL for tens of ms
        return b"".join(
            base64.b64decode(payload[i : i + B64_CHUNK], validate=True)
            for i in range(0, len(payload), B64_CHUNK)
        )
    except (binascii.Error, ValueError):
        raise BadInput(f"chat completions: {where}: invalid base64 in the data URL") from None


def _decode_images(encoded: list[tuple[bytes, str]], limits: ServeLimits) -> list[np.ndarray]:
    """Decode a request's images once their headers fit max_images, max_image_pixels (each) and
    max_request_pixels (all together): nothing is allocated for a request that would not fit."""
    if len(encoded) > limits.max_images:
        raise PayloadTooLarge(
            f"chat completions: {len(encoded)} images; the limit is {limits.max_images} per request (max_images)"
        )
    total = 0
    for data, where in encoded:
        header = read_header(data, where)  # the header only: no pixel is decoded yet
        width, height = header.width, header.height
        if width * height > limits.max_image_pixels:
            raise PayloadTooLarge(
                f"chat completions: image {where} is {width}x{height} pixels; the limit is "
                f"{limits.max_image_pixels} pixels (max_image_pixels)"
            )
        total += width * height
    if total > limits.max_request_pixels:
        raise PayloadTooLarge(
            f"chat completions: the images have {total} pixels together; the limit is "
            f"{limits.max_request_pixels} pixels per request (max_request_pixels)"
        )
    return [decode_image(data, where, limits.max_image_pixels, rgb=True) for data, where in encoded]


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
    model: str,
    cid: str,
    delta: dict[str, str] | None,
    finish: str | None = None,
    tokens: dict[str, int] | None = None,
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


def openai_error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status, headers={"Connection": "close"} if status in (408, 413) else None)


def read_chat(raw: bytes, limits: ServeLimits) -> ChatRequest:
    """Parse and check a body, decoding its images: the heavy part, run on a worker thread."""
    return parse_chat(load_json(raw, limits, "chat completions: body"), limits)


def routes(ctx: Context) -> list[Route]:
    server = ctx.server

    async def chat_completions(request: Request) -> Response:
        name = ""
        try:
            raw = await ctx.body(request)
            req = await ctx.offload(read_chat, raw, ctx.limits, size=len(raw))
            name = req.model
            cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            if req.stream:
                return _stream(ctx, req, cid)
            future = server.chat(name, req.job)
            result = await _unless_disconnected(request, req.job, asyncio.wrap_future(future))
            if req.job.cancelled.is_set():  # the client left while it waited: nobody to answer
                raise ClientGone("client disconnected while its chat ran")
        except Exception as exc:  # noqa: BLE001 - every failure is answered
            return openai_error(*ctx.fail(exc, name, "chat"))
        ctx.metrics.observe_chat(name, result)
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


def _stream(ctx: Context, req: ChatRequest, cid: str) -> Response:
    """Queue the chat now (so a refusal is a plain error status), then stream its pieces."""
    server, metrics = ctx.server, ctx.metrics
    name, job = req.model, req.job
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def emit(piece: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    job.emit = emit
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
                status, message = ctx.fail(exc, name, "chat")
                error = {"error": {"message": message, "type": "server_error", "code": status}}
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
