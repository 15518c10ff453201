"""kiln deploy for a chat model: folder exported, INT8 decoder built and compared with FP32 on the
same tokens, both timed, a repository kiln serve answers chats from, and a report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")


def test_deploying_a_chat_model(tmp_path: Path) -> None:
    from modelkiln.deploy import DeployOptions, DeploySummary, deploy
    from modelkiln.serve.generation import ChatJob
    from modelkiln.serve.server import ModelServer

    summary = deploy(DeployOptions("qwen2-vl-tiny", tmp_path / "out", precisions=("fp32", "int8")))
    assert list(summary.stages) == ["export", "int8", "compare", "bench", "repository", "report"]
    quality = summary.precisions["int8"].quality
    assert 0.999 < quality.logit_cosine_mean < 1.0 and quality.steps == 96
    assert 0.999 < summary.precisions["int8"].vision_cosine_min < 1.0
    for p in ("fp32", "int8"):
        assert summary.precisions[p].bench.decode_tok_s_median > 0
    assert summary.precisions["int8"].size_mb < summary.precisions["fp32"].size_mb / 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"{quality.logit_cosine_mean:.5f}" in report
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["task"] == "generation"
    assert list(saved["precisions"]["fp32"]) == ["parity_max_abs", "bench", "size_mb"]
    assert list(saved["precisions"]["int8"]) == ["quality", "vision_cosine_min", "bench", "size_mb"]
    assert saved["precisions"]["int8"]["quality"]["logit_cosine_mean"] == quality.logit_cosine_mean
    assert DeploySummary.from_dict(saved).to_dict() == saved  # read back as the same figures
    server = ModelServer(str(tmp_path / "out" / "repository"), cores=2)
    server.load_all()
    try:
        assert server.generative() == ["qwen2_vl_tiny"]
        genai = server.get("qwen2_vl_tiny").model.config.genai
        assert genai.decoder == "decoder.int8.onnx" and genai.vision_int8
        job = ChatJob([{"role": "user", "content": "Hello there."}], [], 6)
        assert server.chat("qwen2_vl_tiny", job).result(timeout=60).completion_tokens >= 1
        image = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
        content = [{"type": "image"}, {"type": "text", "text": "Describe it."}]
        job = ChatJob([{"role": "user", "content": content}], [image], 6)  # through the INT8 vision graph
        assert server.chat("qwen2_vl_tiny", job).result(timeout=60).prompt_tokens > 16
    finally:
        server.shutdown()
