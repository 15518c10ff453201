"""A real server on a free loopback port, over a repository of small models."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelkiln.serve.config import DynamicBatching, ModelConfig, dump_config


def affine_model(path: Path, scale: float = 2.0, delay_loops: int = 0) -> Path:
    """y = x * scale + 1, x float32 [batch, 4]; ``delay_loops`` adds MatMuls to make it slower."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "one"], ["y0"])]
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    last = "y0"
    if delay_loops:
        inits.append(
            helper.make_tensor("eye", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
        )
        for i in range(delay_loops):
            nodes.append(helper.make_node("MatMul", [last, "eye"], [f"d{i}"]))
            last = f"d{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes,
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def add_model(repo: Path, name: str, model: Path, config: ModelConfig, version: int = 1) -> None:
    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.read_bytes())
    (repo / name / "config.yaml").write_text(dump_config(config))


def kiln(*args: str) -> subprocess.CompletedProcess:
    """Run the ``kiln`` command line in a child process (output captured, exit status not checked)."""
    return subprocess.run(
        [sys.executable, "-m", "modelkiln", *args], capture_output=True, text=True, check=False
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server on a free loopback port in a thread, configured as ``kiln serve`` configures one."""

    def __init__(self, repo: Path, max_body: int = 1 << 20, limits: Any = None, security: Any = None) -> None:
        import uvicorn

        from modelkiln.serve.connection import guarded_h11
        from modelkiln.serve.guard import ServeLimits
        from modelkiln.serve.http import create_app
        from modelkiln.serve.server import ModelServer

        limits = limits or ServeLimits(max_body_bytes=max_body)
        self.server = ModelServer(str(repo), cores=2)
        self.server.load_all()
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.app = create_app(self.server, None, limits, security, "127.0.0.1")
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="error",
            timeout_keep_alive=limits.keep_alive_s,
            http=guarded_h11(limits.header_timeout_s),
        )
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.uvicorn.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    tmp = tmp_path_factory.mktemp("models")
    add_model(
        root,
        "affine",
        affine_model(tmp / "a.onnx"),
        ModelConfig("affine", max_batch_size=8, dynamic_batching=DynamicBatching((8,), 2000)),
    )
    add_model(
        root,
        "affine",
        affine_model(tmp / "b.onnx", scale=3.0),
        ModelConfig("affine", max_batch_size=8, dynamic_batching=DynamicBatching((8,), 2000)),
        version=2,
    )
    add_model(
        root, "slow", affine_model(tmp / "s.onnx", delay_loops=400), ModelConfig("slow", max_batch_size=4)
    )
    return root


@pytest.fixture(scope="module")
def running(repo: Path) -> Iterator[Running]:
    r = Running(repo)
    yield r
    r.stop()
