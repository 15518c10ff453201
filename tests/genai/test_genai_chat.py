"""The generation engine and chat model on an exported Qwen2-VL-tiny folder: the static KV cache
from the pool, seeded sampling and streaming, weight-only INT8 decoders and vision graphs,
continuous batching, the spec the folder is read through, and clear errors. (Agreement with
transformers, token for token, is tested with the zoo model in tests/zoo/test_qwen_vl.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelkiln.errors import BadInput

pytest.importorskip("transformers")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def chat(exported: Path):
    from modelkiln.genai.chat import ChatModel

    return ChatModel.open(str(exported))


def _messages(text: str, images: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_the_folder_is_read_through_its_spec_and_run_on_the_runtime_api(exported: Path, chat) -> None:
    from modelkiln.genai.spec import GenaiSpec
    from modelkiln.runtime.backends.onnxruntime import OrtBackend

    spec = GenaiSpec.load(exported)
    assert chat.spec == spec and chat.name == spec.model == "qwen2-vl-tiny"
    assert chat.context == spec.context and chat.stop == set(spec.stop)
    assert chat.encoder is not None and spec.encoder == "vision.onnx" and not chat.buckets  # any image size
    engine = chat.engine
    assert isinstance(engine.backend, OrtBackend) and engine.session is engine.backend.session
    assert engine.backend.providers == ["CPUExecutionProvider"]  # KV cache bound by CPU pointer
    past = next(i for i in engine.backend.input_metadata if i.name == "past_key_0")
    assert (engine.kv_heads, engine.head_dim) == (past.shape[1], past.shape[3])
    assert engine.shared  # the builder's default layout: one cache buffer updated in place
    assert engine.vocab == engine.backend.output_metadata[0].shape[-1] > 500
    assert chat.embed(np.array([1, 2, 3])).shape[0] == 3  # the embedding graph through Backend.infer


def test_kv_cache_is_preallocated_and_reused(chat) -> None:
    """A sequence takes its cache once when it starts (the shared layout: a slot of the engine's
    buffer; the concat layout: two pooled buffers per cache tensor) and its logits buffer from the
    pool; its steps allocate nothing; closing it gives all back, and the next one reuses them."""
    engine, pool = chat.engine, chat.engine.pool
    prompt = chat.prompt(_messages("Tell me about the harbour and the old town."))
    before = pool.stats()
    gen = chat.start(prompt, 30)
    gen.stop = set()
    allocated = pool.stats()
    while not gen.done:
        gen.step()
    after_steps = pool.stats()
    assert len(gen.tokens) == 30
    if engine.shared:
        assert engine.kv is not None and engine.kv.in_use == 1 and gen.cache.length == prompt.tokens + 29
        buffers = 1  # the logits; the cache is a slot of the shared buffer
    else:
        buffers = 2 * len(engine.past_names) + 1  # two per cache tensor + the logits
    assert (allocated.hits + allocated.misses) - (before.hits + before.misses) == buffers
    assert (after_steps.hits, after_steps.misses) == (allocated.hits, allocated.misses)  # 0 allocations
    gen.close()
    assert not engine.shared or (engine.kv is not None and engine.kv.in_use == 0)
    second = chat.start(prompt, 30)
    second.close()
    again = pool.stats()
    assert again.misses == after_steps.misses and again.outstanding == 0  # same size: all reused


def test_sampling_is_seeded_and_streaming_yields_the_returned_text(chat) -> None:
    from modelkiln.genai.engine import Sampling, pick

    prompt = chat.prompt(_messages("Tell me about the harbour."))

    def run(seed: int) -> list[int]:
        gen = chat.start(prompt, 10, Sampling(1.0, 0.9, seed))
        gen.stop = set()
        while not gen.done:
            gen.step()
        gen.close()
        return gen.tokens

    assert run(7) == run(7) and run(7) != run(8)
    ids = chat.tokenizer("Tell me about the harbour.").input_ids  # the plain text API, streamed
    streamed: list[int] = []
    tokens = chat.engine.generate(ids, 10, temperature=1.0, top_p=0.9, seed=7, on_token=streamed.append)
    assert tokens == streamed and len(tokens) >= 1
    stop = {tokens[-1]}
    assert (
        chat.engine.generate(ids, 10, stop, temperature=1.0, top_p=0.9, seed=7)
        == tokens[: tokens.index(tokens[-1]) + 1]
    )
    pieces: list[str] = []
    text = chat.reply(
        "Tell me about the harbour.", max_new_tokens=12, temperature=0.8, seed=3, on_text=pieces.append
    )
    assert (
        "".join(pieces)
        == text
        == chat.reply("Tell me about the harbour.", max_new_tokens=12, temperature=0.8, seed=3)
    )
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    assert {pick(logits, 1.0, 0.5, rng) for _ in range(50)} == {1}  # top-p 0.5 keeps the best token only
    assert pick(logits, 0.0, 1.0, rng) == 1


def test_weight_only_int8_decoder_stays_close(exported: Path, chat, tmp_path: Path) -> None:
    """MatMulNBits (8-bit, per channel) decoder: logit cosine vs FP32 on forced steps, greedy agreement."""
    import shutil

    from modelkiln.genai.chat import ChatModel
    from modelkiln.quant.config import QuantConfig, WeightKernel
    from modelkiln.quant.quantize import quantize

    folder = tmp_path / "w8"
    shutil.copytree(exported, folder)
    quantize(
        folder / "decoder.onnx",
        folder / "decoder.int8.onnx",
        None,
        config=QuantConfig(weight_only=True, weight_kernel=WeightKernel.MATMUL_NBITS),
    )
    w8 = ChatModel(folder, decoder="decoder.int8.onnx")
    prompt = chat.prompt(_messages("Tell me about the harbour."))
    forced = np.random.default_rng(2).integers(0, 590, 16).tolist()
    a, b = chat.start(prompt, 17), w8.start(prompt, 17)
    cosines = []
    for token in [*forced, 0]:
        a.step(force=token)
        b.step(force=token)
        x, y = a.logits[0, -1], b.logits[0, -1]
        cosines.append(float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)))
    a.close(), b.close()
    print(f"W8 logit cosine mean {np.mean(cosines):.5f} min {np.min(cosines):.5f}")
    assert min(cosines) > 0.99 and min(cosines) < 1.0  # really quantized, still close


def test_chat_refuses_bad_input_clearly(chat, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="prompt is empty"):
        chat.reply("   ")
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    with pytest.raises(BadInput, match="cannot decode image .*bad.jpg"):
        chat.reply("What is this?", corrupt)
    gif = tmp_path / "anim.gif"
    gif.write_bytes(b"GIF89a")
    with pytest.raises(BadInput, match="unsupported image format '.gif'"):
        chat.reply("What is this?", gif)
    with pytest.raises(BadInput, match="exceeds the context of 2048 tokens of qwen2-vl-tiny"):
        chat.reply("Hello " * 10, max_new_tokens=5000)
    with pytest.raises(BadInput, match="1 image parts but 0 images"):
        chat.prompt(_messages("What is this?", 1), [])


def test_int8_vision_graphs_are_asked_for_by_name(exported: Path) -> None:
    from modelkiln.errors import ModelNotFound
    from modelkiln.genai.chat import ChatModel

    with pytest.raises(ModelNotFound, match=r"vision.int8.onnx not found .*kiln quantize"):
        ChatModel(exported, vision_int8=True)


def test_batched_decode_gives_each_sequence_its_own_answer(chat) -> None:
    """Continuous batching: sequences of different lengths (and sampling settings) decoded in one
    step each produce exactly what they produce alone; batch buffers go back to the pool."""
    from modelkiln.genai.batch import decode_batch
    from modelkiln.genai.engine import Sampling

    prompts = [
        (chat.prompt(_messages("Tell me about the harbour.")), Sampling()),
        (chat.prompt(_messages("Describe it.", 1), [_image(90, 120)]), Sampling()),
        (
            chat.prompt(_messages("What is the old town like on a long summer evening?")),
            Sampling(0.9, 0.9, 4),
        ),
    ]

    def alone(prompt, sampling) -> list[int]:
        gen = chat.start(prompt, 12, sampling)
        gen.stop = set()
        while not gen.done:
            gen.step()
        gen.close()
        return gen.tokens

    expected = [alone(p, s) for p, s in prompts]
    gens = [chat.start(p, 12, s) for p, s in prompts]
    for g in gens:
        g.stop = set()
        g.step()  # prefill alone: prompts differ in length
    assert len({g.cache.length for g in gens}) == 3
    while not all(g.done for g in gens):
        decode_batch(chat.engine, [g for g in gens if not g.done])
    assert [g.tokens for g in gens] == expected
    for g in gens:
        g.close()
    assert chat.engine.pool.stats().outstanding == 0


def test_images_declaring_too_many_pixels_are_refused_before_decoding(monkeypatch) -> None:
    import cv2

    from modelkiln.zoo import images

    _, png = cv2.imencode(".png", np.zeros((100, 120, 3), np.uint8))
    assert images.decode_image(png.tobytes(), "small.png", rgb=True).shape == (100, 120, 3)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100 * 119)
    with pytest.raises(BadInput, match=r"bomb.png is 120x100 pixels; the limit is 11900"):
        images.decode_image(png.tobytes(), "bomb.png", rgb=True)
