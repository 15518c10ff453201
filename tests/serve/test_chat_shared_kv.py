"""Chats served with a shared-buffer decoder (GroupQueryAttention, one cache buffer the sequences
hold slots of): answers equal the engine run alone on the exported (concat) decoder, the slots
follow max_sequences and all go back; and a decode round that fails because of one chat fails
that chat only (retried alone), the others answering exactly as they would have."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from modelkiln.genai import batch as genai_batch
from modelkiln.serve.config import GenAIConfig, ModelConfig, dump_config
from modelkiln.serve.generation import ChatJob
from modelkiln.serve.server import ModelServer

pytest.importorskip("transformers")
pytest.importorskip("torch")

PROMPTS = ["Hello there.", "Tell me about the harbour.", "What is the old town like?"]
NEW = 12


@pytest.fixture(scope="module")
def repo(qwen_tiny_export: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modelkiln.export.builder.qwen2 import build_decoder
    from modelkiln.export.builder.tensors import StateDict
    from modelkiln.zoo.qwen_vl import build_tiny

    root = tmp_path_factory.mktemp("shared-repo")
    folder = root / "qwen" / "1"
    shutil.copytree(qwen_tiny_export[0], folder)
    model, _ = build_tiny()
    text = model.model.language_model.config
    build_decoder(text, StateDict(model.state_dict()), folder, "decoder.shared.onnx", kv_layout="shared")
    config = ModelConfig(
        "qwen",
        backend="genai",
        genai=GenAIConfig(max_sequences=3, max_new_tokens=16, decoder="decoder.shared.onnx"),
    )
    (root / "qwen" / "config.yaml").write_text(dump_config(config))
    return root


@pytest.fixture(scope="module")
def alone(qwen_tiny_export: tuple[Path, Any]) -> list[str]:
    """Each prompt's answer from the exported (concat) decoder, run alone."""
    from modelkiln.genai.chat import ChatModel

    chat = ChatModel(qwen_tiny_export[0])
    out = []
    for p in PROMPTS:
        gen = chat.start(chat.prompt([{"role": "user", "content": p}]), NEW)
        gen.run()
        out.append(
            chat.tokenizer.decode([t for t in gen.tokens if t not in chat.stop], skip_special_tokens=True)
        )
    return out


def _job(i: int, new: int = NEW) -> ChatJob:
    return ChatJob([{"role": "user", "content": PROMPTS[i]}], [], new)


def test_chats_on_a_shared_decoder_answer_as_alone_and_give_their_slots_back(repo: Path, alone) -> None:
    server = ModelServer(str(repo), cores=2)
    server.load_all()
    try:
        engine = server.get("qwen").model.chat.engine  # type: ignore[attr-defined]
        assert engine.shared and engine.slots == 3
        futures = [server.chat("qwen", _job(i)) for i in range(3)]
        texts = [f.result(60).text for f in futures]
        assert texts == alone
        assert engine.kv is not None and engine.kv.in_use == 0
        assert engine.kv.capacity >= server.get("qwen").model.chat.context  # type: ignore[attr-defined]
    finally:
        server.shutdown()


def test_a_round_failing_for_one_chat_fails_that_chat_only(
    repo: Path, alone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chat asking for 7 tokens breaks every step it is in once it has 2 tokens (batched or
    alone); the round is retried sequence by sequence, only it fails, with its own error."""
    real = genai_batch.decode_batch
    failed_sizes: list[int] = []

    def poisoned(engine, gens):
        if any(g.max_new_tokens == 7 and len(g.tokens) >= 2 for g in gens):
            failed_sizes.append(len(gens))
            raise RuntimeError("poisoned sequence")
        return real(engine, gens)

    monkeypatch.setattr(genai_batch, "decode_batch", poisoned)
    server = ModelServer(str(repo), cores=2)
    server.load_all()
    try:
        futures = [
            server.chat("qwen", _job(0)),
            server.chat("qwen", _job(1, 7)),
            server.chat("qwen", _job(2)),
        ]
        with pytest.raises(RuntimeError, match="poisoned sequence"):
            futures[1].result(60)
        assert [futures[0].result(60).text, futures[2].result(60).text] == [alone[0], alone[2]]
        assert max(failed_sizes) > 1 and 1 in failed_sizes  # a batched round failed, then it alone
        queue = server.get("qwen").queue  # type: ignore[attr-defined]
        assert queue.depth() == 0
        engine = server.get("qwen").model.chat.engine  # type: ignore[attr-defined]
        assert engine.kv is not None and engine.kv.in_use == 0
    finally:
        server.shutdown()
