"""The tiny Qwen2-VL built locally: real tokenizer with Qwen2-VL's special tokens, the ChatML
template, dynamic-resolution image processing, and greedy generation in transformers."""

from __future__ import annotations

import numpy as np
import pytest

from modelkiln.zoo.qwen_vl import SPECIAL_TOKENS, build_tiny, tiny_tokenizer

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def test_tokenizer_round_trips_and_knows_the_special_tokens() -> None:
    tok = tiny_tokenizer()
    text = "Describe the picture: a café, 3 dogs & ünïcode!"
    assert tok.decode(tok(text).input_ids) == text  # byte-level BPE: any text survives
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and min(ids) >= 500
    assert tok("<|im_start|>user").input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_chat_template_and_image_tokens_and_greedy_generation() -> None:
    model, processor = build_tiny()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    image = (np.random.default_rng(0).random((100, 120, 3)) * 255).astype(np.uint8)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    t, h, w = inputs["image_grid_thw"][0].tolist()
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == pad).sum()) == t * h * w // 4  # one token per 2x2 merged patch
    with torch.no_grad():
        a = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        b = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert a.shape[1] == inputs["input_ids"].shape[1] + 6 and torch.equal(a, b)


def test_decoder_step_exports_with_kv_cache_and_matches_torch(tmp_path) -> None:
    from modelkiln.export.qwen_vl import export_decoder_step, step_parity
    from modelkiln.runtime.session import ort_session

    model, _ = build_tiny()
    spec = export_decoder_step(model, tmp_path / "step.onnx")
    session = ort_session(tmp_path / "step.onnx")
    assert [i.name for i in session.get_inputs()] == spec.input_names
    # prefill from an empty cache, a decode step, and a chunk on top of a cache: one graph
    assert step_parity(model, tmp_path / "step.onnx", ((9, 0), (1, 6), (5, 3))) < 1e-4


def test_greedy_loop_on_the_exported_step_matches_transformers_generate(tmp_path) -> None:
    from modelkiln.export.qwen_vl import export_decoder_step
    from modelkiln.genai.greedy import GreedyDecoder

    model, processor = build_tiny(seed=3)
    export_decoder_step(model, tmp_path / "step.onnx")
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    text = processor.apply_chat_template(
        [{"role": "user", "content": "Tell me about the harbour."}], add_generation_prompt=True
    )
    ids = processor.tokenizer(text).input_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    ours = GreedyDecoder(tmp_path / "step.onnx", table).generate(ids, 12)
    assert ours == ref[: len(ours)] and len(ours) == 12


def test_image_prompt_greedy_matches_transformers(tmp_path) -> None:
    """Vision encoder (one grid bucket) and decoder step in ONNX, M-RoPE positions in numpy: the
    same tokens as transformers' generate with an image."""
    from modelkiln.export.qwen_vl import export_decoder_step, export_vision
    from modelkiln.genai.greedy import GreedyDecoder
    from modelkiln.genai.mrope import mrope_positions
    from modelkiln.runtime.session import ort_session

    model, processor = build_tiny(seed=3)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = (np.random.default_rng(0).random((100, 120, 3)) * 255).astype(np.uint8)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    grid = tuple(inputs["image_grid_thw"][0].tolist())
    tokens = export_vision(model, grid, tmp_path / "vision.onnx")
    export_decoder_step(model, tmp_path / "step.onnx")
    pixels = inputs["pixel_values"].numpy()
    image_embeds = ort_session(tmp_path / "vision.onnx").run(None, {"pixel_values": pixels})[0]
    with torch.no_grad():
        ref_embeds = model.model.visual(
            inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]
        ).pooler_output
    assert image_embeds.shape == (tokens, 64) and np.abs(image_embeds - ref_embeds.numpy()).max() < 1e-4
    ids = inputs["input_ids"][0].numpy()
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    positions, delta = mrope_positions((ids == pad).astype(int).tolist(), [grid], 2)
    ref_pos, ref_delta = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    assert (positions == ref_pos[:, 0].numpy()).all() and delta == int(ref_delta)
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    embeds = table[ids].copy()
    embeds[ids == pad] = image_embeds
    ours = GreedyDecoder(tmp_path / "step.onnx", table).generate_from_embeds(embeds, positions, delta, 10)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, len(ids) :].tolist()
    assert ours == ref[: len(ours)] and len(ours) == 10


def test_kv_cache_buffers_come_from_the_pool_and_are_reused(tmp_path) -> None:
    from modelkiln.export.qwen_vl import export_decoder_step
    from modelkiln.genai.greedy import GreedyDecoder
    from modelkiln.runtime.memory_pool import MemoryPool

    model, processor = build_tiny(seed=3)
    export_decoder_step(model, tmp_path / "step.onnx")
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    ids = processor.tokenizer("Tell me about the harbour and the old town.").input_ids
    plain = GreedyDecoder(tmp_path / "step.onnx", table).generate(ids, 24)
    pool = MemoryPool()
    pooled = GreedyDecoder(tmp_path / "step.onnx", table, pool=pool).generate(ids, 24)
    stats = pool.stats()
    assert pooled == plain
    assert stats.outstanding == 0  # every cache buffer went back
    assert stats.hits > 3 * stats.misses  # 24 steps x 5 outputs served mostly from reused buffers


def test_sampling_is_seeded_and_streaming_matches(tmp_path) -> None:
    from modelkiln.export.qwen_vl import export_decoder_step
    from modelkiln.genai.greedy import GreedyDecoder, pick

    model, processor = build_tiny(seed=3)
    export_decoder_step(model, tmp_path / "step.onnx")
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    dec = GreedyDecoder(tmp_path / "step.onnx", table)
    ids = processor.tokenizer("Tell me about the harbour.").input_ids
    streamed: list[int] = []
    a = dec.generate(ids, 10, temperature=1.0, top_p=0.9, seed=7, on_token=streamed.append)
    b = dec.generate(ids, 10, temperature=1.0, top_p=0.9, seed=7)
    c = dec.generate(ids, 10, temperature=1.0, top_p=0.9, seed=8)
    assert a == b == streamed and a != c
    stop = {a[3]}
    assert dec.generate(ids, 10, stop=stop, temperature=1.0, top_p=0.9, seed=7) == a[: a.index(a[3]) + 1]
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    assert {pick(logits, 1.0, 0.5, rng) for _ in range(50)} == {1}  # top-p 0.5 keeps the best token only
    assert pick(logits, 0.0, 1.0, rng) == 1


@pytest.fixture(scope="module")
def chat():
    from modelkiln.genai.chat import ChatModel

    return ChatModel.open("qwen2-vl-tiny")


def test_chat_streams_the_same_text_it_returns(chat, tmp_path) -> None:
    import cv2

    image = tmp_path / "x.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8))
    pieces: list[str] = []
    text = chat.reply("Describe the picture.", image, max_new_tokens=10, on_text=pieces.append)
    assert text == "".join(pieces) and text == chat.reply("Describe the picture.", image, max_new_tokens=10)
    assert chat.decoder.pool.stats().outstanding == 0


def test_chat_refuses_bad_input_clearly(chat, tmp_path) -> None:
    from modelkiln.errors import BadInput

    with pytest.raises(BadInput, match="prompt is empty"):
        chat.reply("   ")
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    with pytest.raises(BadInput, match="cannot decode image"):
        chat.reply("What is this?", corrupt)
    gif = tmp_path / "anim.gif"
    gif.write_bytes(b"GIF89a")
    with pytest.raises(BadInput, match="unsupported image format '.gif'"):
        chat.reply("What is this?", gif)
    with pytest.raises(BadInput, match="exceeds the model's context of 2048"):
        chat.reply("Hello " * 10, max_new_tokens=5000)
