"""OpenAI-compatible chat completions in kiln serve, on the exported tiny Qwen2-VL: answers equal
the engine run directly, streaming equals non-streaming, two chats at once both finish correctly
beside KServe traffic, and each bad request gets its status and a message while the server goes on."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import Running, add_model, affine_model
from modelkiln.serve.config import GenAIConfig, ModelConfig, dump_config, load_config

pytest.importorskip("transformers")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path]]:
    from modelkiln.export import export

    root = tmp_path_factory.mktemp("chat-repo")
    exported = tmp_path_factory.mktemp("exported")
    export("qwen2-vl-tiny", exported)
    add = [sys.executable, "-m", "modelkiln", "repo", "add", str(root), str(exported), "--name", "qwen"]
    res = subprocess.run(
        [*add, "--max-sequences", "2", "--max-new-tokens", "64"], check=False, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    folder = root / "qwen" / "1"
    assert load_config(root / "qwen" / "config.yaml", "qwen").genai == GenAIConfig(2, 64, None, True)
    add_model(
        root,
        "affine",
        affine_model(tmp_path_factory.mktemp("m") / "a.onnx"),
        ModelConfig("affine", max_batch_size=8),
    )
    running = Running(root, max_body=1 << 20)
    yield running, folder
    running.stop()


@pytest.fixture(scope="module")
def local(chat_server):
    from modelkiln.genai.chat import ChatModel

    return ChatModel(chat_server[1])


def post(running: Running, path: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://{running.url}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def stream(running: Running, body: dict) -> list[dict | str]:
    req = urllib.request.Request(
        f"http://{running.url}/v1/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    events: list[dict | str] = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def png_url(seed: int = 0, h: int = 90, w: int = 120) -> tuple[str, np.ndarray]:
    import cv2

    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    ok, data = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode(), rgb


def ask(text: str, image: str | None = None, **kw) -> dict:
    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"model": "qwen", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def local_answer(local, text: str, rgb: np.ndarray | None, n: int) -> str:
    content = [{"type": "image"}] if rgb is not None else []
    gen = local.start(
        local.prompt(
            [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
            [rgb] if rgb is not None else [],
        ),
        n,
    )
    while not gen.done:
        gen.step()
    gen.close()
    return local.tokenizer.decode([t for t in gen.tokens if t not in local.stop], skip_special_tokens=True)


def test_text_and_image_chats_answer_what_the_engine_answers(chat_server, local) -> None:
    running, _ = chat_server
    status, body = post(running, "/v1/chat/completions", ask("Tell me about the harbour.", max_tokens=10))
    assert status == 200, body
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == local_answer(local, "Tell me about the harbour.", None, 10)
    assert body["usage"]["completion_tokens"] <= 10 and body["usage"]["prompt_tokens"] > 10
    url, rgb = png_url()
    status, body = post(running, "/v1/chat/completions", ask("Describe the picture.", url, max_tokens=10))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == local_answer(local, "Describe the picture.", rgb, 10)


def test_streaming_yields_the_same_text_as_one_answer(chat_server) -> None:
    running, _ = chat_server
    url, _ = png_url(1)
    request = ask("Describe the picture.", url, max_tokens=12, temperature=0.7, seed=5)
    _, whole = post(running, "/v1/chat/completions", request)
    events = stream(running, request)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_two_chats_at_once_finish_correctly_beside_kserve_traffic(chat_server, local) -> None:
    running, _ = chat_server
    prompts = ["Tell me about the harbour.", "What is the old town like?"]
    expected = [local_answer(local, p, None, 24) for p in prompts]
    with ThreadPoolExecutor(3) as ex:
        chats = [ex.submit(post, running, "/v1/chat/completions", ask(p, max_tokens=24)) for p in prompts]
        kserve = ex.submit(
            post,
            running,
            "/v2/models/affine/infer",
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
        )
        answers = [c.result() for c in chats]
    assert [a[1]["choices"][0]["message"]["content"] for a in answers] == expected
    assert kserve.result()[0] == 200 and kserve.result()[1]["outputs"][0]["data"] == [3, 5, 7, 9]
    with urllib.request.urlopen(f"http://{running.url}/metrics") as resp:
        text = resp.read().decode()
    assert 'kiln_generated_tokens_total{model="qwen"}' in text


def test_bad_chats_get_clear_errors_and_the_server_goes_on(chat_server) -> None:
    running, _ = chat_server
    gif = "data:image/gif;base64," + base64.b64encode(b"GIF89a").decode()
    corrupt = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    cases = [
        ({**ask("hi"), "model": "nope"}, 404, "unknown model 'nope'"),
        ({"model": "qwen", "messages": []}, 400, "'messages' must be a non-empty list"),
        (ask("   "), 400, "prompt is empty"),
        (ask("What is it?", "https://example.com/x.png"), 400, "must be a data: URL"),
        (ask("What is it?", gif), 400, "unsupported image type 'image/gif'"),
        (ask("What is it?", corrupt), 400, "cannot decode image messages[0].content[0]"),
        (ask("hi", max_tokens=65), 400, "exceeds this server's limit of 64"),
        (ask("Hello " * 2100, max_tokens=8), 400, "exceeds the context of 2048"),
        (ask("hi", max_tokens=0), 400, "max_tokens must be a positive integer"),
        ({**ask("hi"), "tools": [{"type": "function"}]}, 400, "'tools' is not supported"),
        ({**ask("hi"), "model": "affine"}, 400, "not a generative model"),
    ]
    for request, code, message in cases:
        status, body = post(running, "/v1/chat/completions", request)
        assert status == code and message in body["error"]["message"], (request.get("model"), body)
    status, body = post(running, "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    kserve = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    status, body = post(running, "/v2/models/qwen/infer", kserve)
    assert status == 400 and "/v1/chat/completions" in body["error"]
    status, body = post(running, "/v1/chat/completions", ask("Tell me about the harbour.", max_tokens=4))
    assert status == 200 and body["choices"][0]["message"]["content"]
    with urllib.request.urlopen(f"http://{running.url}/v1/models") as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["qwen"]


def test_without_continuous_batching_chats_still_interleave_correctly(
    chat_server, local, tmp_path: Path
) -> None:
    """Each sequence's steps as tasks of their own (no batched decode): same answers."""
    import shutil

    from modelkiln.serve.generation import ChatJob
    from modelkiln.serve.server import ModelServer

    _, folder = chat_server
    shutil.copytree(folder, tmp_path / "repo" / "qwen" / "1")
    config = ModelConfig(
        "qwen", backend="genai", genai=GenAIConfig(2, 64, None, continuous_batching=False), warmup=False
    )
    (tmp_path / "repo" / "qwen" / "config.yaml").write_text(dump_config(config))
    server = ModelServer(str(tmp_path / "repo"), cores=2)
    server.load_all()
    try:
        prompts = ["Tell me about the harbour.", "What is the old town like?", "And the ships?"]
        jobs = [ChatJob([{"role": "user", "content": p}], [], 16) for p in prompts]
        futures = [server.chat("qwen", j) for j in jobs]  # 3 chats, 2 slots: one waits its turn
        answers = [f.result(timeout=60).text for f in futures]
    finally:
        server.shutdown()
    assert answers == [local_answer(local, p, None, 16) for p in prompts]


def test_a_cancelled_chat_stops_decoding_and_a_client_leaving_leaks_nothing(chat_server) -> None:
    """A chat cancelled mid-answer (what a client leaving a stream triggers) stops at the next
    round; after a real client leaves a stream, its KV cache goes back and the slot frees."""
    from modelkiln.serve.generation import ChatJob

    running, _ = chat_server
    job = ChatJob([{"role": "user", "content": "Tell me about the harbour."}], [], 64)
    job.emit = lambda piece: job.cancelled.set()  # leave after the first piece of text
    result = running.server.chat("qwen", job).result(timeout=30)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 64
    import http.client
    import time

    host, port = running.url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({**ask("Tell me about the harbour.", max_tokens=64), "stream": True})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.close()  # gone after the first event
    queue = running.server.get("qwen").queue
    deadline = time.time() + 20
    while queue.depth() and time.time() < deadline:
        time.sleep(0.05)
    assert queue.depth() == 0 and running.server.scheduler.memory.stats().outstanding == 0
    status, body = post(running, "/v1/chat/completions", ask("Tell me about the harbour.", max_tokens=4))
    assert status == 200


def test_the_official_openai_client_talks_to_the_server(chat_server, local) -> None:
    """OpenAI's own Python client, as a user would point it at the server."""
    openai = pytest.importorskip("openai")
    running, _ = chat_server
    client = openai.OpenAI(base_url=f"http://{running.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["qwen"]
    url, rgb = png_url(3)
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Describe the picture."},
    ]
    answer = client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": content}], max_tokens=10, temperature=0
    )
    text = answer.choices[0].message.content
    assert (
        text == local_answer(local, "Describe the picture.", rgb, 10) and answer.usage.completion_tokens <= 10
    )
    stream = client.chat.completions.create(
        model="qwen",
        messages=[{"role": "user", "content": content}],
        max_tokens=10,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    with pytest.raises(openai.BadRequestError, match="must be a data: URL"):
        client.chat.completions.create(
            model="qwen",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
            ],
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_a_failing_decode_round_answers_its_chats_and_the_model_goes_on(chat_server, monkeypatch) -> None:
    from modelkiln.genai import batch
    from modelkiln.serve.generation import ChatJob

    running, _ = chat_server

    def boom(engine, gens):
        raise RuntimeError("decoder blew up")

    monkeypatch.setattr(batch, "decode_batch", boom)
    jobs = [ChatJob([{"role": "user", "content": p}], [], 8) for p in ("Hello there.", "And you?")]
    futures = [running.server.chat("qwen", j) for j in jobs]
    for f in futures:
        with pytest.raises(RuntimeError, match="decoder blew up"):
            f.result(timeout=30)
    monkeypatch.undo()
    assert (
        running.server.chat("qwen", ChatJob([{"role": "user", "content": "Hi"}], [], 4))
        .result(timeout=30)
        .text
    )
    queue = running.server.get("qwen").queue
    assert queue.depth() == 0 and running.server.scheduler.memory.stats().outstanding == 0


def test_a_client_leaving_a_plain_request_cancels_its_chat(chat_server, monkeypatch) -> None:
    import http.client
    import socket
    import time

    from modelkiln.genai import batch

    running, _ = chat_server
    rounds = [0]
    original = batch.decode_batch

    def slow(engine, gens):  # 64 tokens would take > 3 s
        rounds[0] += 1
        time.sleep(0.05)
        return original(engine, gens)

    monkeypatch.setattr(batch, "decode_batch", slow)
    host, port = running.url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=0.5)
    conn.request("POST", "/v1/chat/completions", json.dumps(ask("Tell me about the harbour.", max_tokens=64)))
    with pytest.raises((socket.timeout, TimeoutError)):
        conn.getresponse()
    conn.close()
    queue = running.server.get("qwen").queue
    deadline = time.time() + 10
    while queue.depth() and time.time() < deadline:
        time.sleep(0.05)
    assert queue.depth() == 0 and rounds[0] < 40  # stopped well before its 63 decode rounds


def test_a_prompt_longer_than_the_context_is_refused_before_it_is_embedded(chat_server, monkeypatch) -> None:
    """Tokens are counted right after tokenising: the embeddings (memory sized by the token count)
    are never made for a prompt the model could not take."""
    running, _ = chat_server
    chat = running.server.get("qwen").model.chat
    embedded: list[int] = []
    original = chat.embed
    monkeypatch.setattr(chat, "embed", lambda ids: embedded.append(len(ids)) or original(ids))
    status, body = post(running, "/v1/chat/completions", ask("Hello " * 3000, max_tokens=8))
    assert status == 400 and "tokens exceeds the context of 2048" in body["error"]["message"]
    assert embedded == []
    status, body = post(running, "/v1/chat/completions", ask("Tell me about the harbour.", max_tokens=4))
    assert status == 200 and embedded


def test_the_openai_client_with_an_api_key(chat_server) -> None:
    """A server with a key: the official client sends it as a bearer token and chats; without
    it (or with a wrong one) it gets AuthenticationError."""
    openai = pytest.importorskip("openai")
    from modelkiln.serve.security import Security

    key = "chat-key-0123456789"
    root = chat_server[1].parent.parent
    locked = Running(root, security=Security(api_key=key))
    try:
        url = f"http://{locked.url}/v1"
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        answer = client.chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "Hello there."}], max_tokens=4, temperature=0
        )
        assert answer.choices[0].message.content and answer.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="not-the-key-123", max_retries=0).chat.completions.create(
                model="qwen", messages=[{"role": "user", "content": "Hello there."}], max_tokens=4
            )
    finally:
        locked.stop()


def test_random_sampling_options_and_messages_never_fail_the_server(chat_server) -> None:
    """Property test on the real chat model: odd temperatures, top_p, seeds, roles and texts
    (NaN, subnormals, lone surrogates, huge ints) are answered 200 or 4xx, never 500."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    running, _ = chat_server
    numbers = st.none() | st.floats() | st.integers(-(2**70), 2**70) | st.sampled_from([5e-324, 1e-320, 0, 2])
    body = st.fixed_dictionaries(
        {
            "model": st.just("qwen"),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["user", "system", "assistant"]),
                        "content": st.text(max_size=40),
                    }
                ),
                min_size=1,
                max_size=3,
            ),
            "max_tokens": st.integers(-1, 4),
            "temperature": numbers,
            "top_p": numbers,
            "seed": numbers,
        }
    )

    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=body)
    def check(request: dict) -> None:
        data = json.dumps(request).encode("utf-8", "surrogatepass")
        status, reply = post(running, "/v1/chat/completions", data)
        assert status == 200 or 400 <= status < 500, (status, reply, request)

    assert hypothesis
    check()
    status, _ = post(running, "/v1/chat/completions", ask("Tell me about the harbour.", max_tokens=4))
    assert status == 200
