"""Fixtures the generation tests share (built once per session, not once per module)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_layouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2-VL's embedding and its decoder in both KV-cache layouts (concat.onnx,
    shared.onnx), built from the same weights."""
    pytest.importorskip("torch")
    from modelkiln.export.builder.qwen2 import build_decoder, build_embedding
    from modelkiln.export.builder.tensors import StateDict
    from modelkiln.zoo.qwen_vl import build_tiny

    model, _ = build_tiny()
    text, tensors = model.model.language_model.config, StateDict(model.state_dict())
    folder = tmp_path_factory.mktemp("tiny-layouts")
    build_decoder(text, tensors, folder, "concat.onnx")
    build_decoder(text, tensors, folder, "shared.onnx", kv_layout="shared")
    build_embedding(text, tensors, folder)
    return folder


@pytest.fixture(scope="module")
def exported(qwen_tiny_export) -> Path:
    """``kiln export qwen2-vl-tiny`` (every part parity-checked against torch)."""
    out, result = qwen_tiny_export
    assert result.passed
    return out


@pytest.fixture(scope="module")
def chat(exported: Path):
    from modelkiln.genai.chat import ChatModel

    return ChatModel(exported)
