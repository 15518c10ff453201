"""Qwen2-VL on our stack, checked against transformers on the tiny random model: the zoo export
(embedding, decoder step, vision encoder for any image size, processor files), teacher-forced
logits at every step and greedy generation token for token (text and images of any size). The generation engine's own behaviour (KV
cache, sampling, streaming, batching, INT8 decoders, errors) is tested in tests/genai."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelkiln.zoo.qwen_vl import SPECIAL_TOKENS, build_tiny, tiny_tokenizer

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

#: Teacher-forced logits, ONNX Runtime FP32 vs transformers FP32 (the issue's bound is 1e-3).
LOGIT_TOL = 1e-4


def test_tokenizer_round_trips_and_knows_the_special_tokens() -> None:
    tok = tiny_tokenizer()
    text = "Describe the picture: a café, 3 dogs & ünïcode!"
    assert tok.decode(tok(text).input_ids) == text  # byte-level BPE: any text survives
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and min(ids) >= 500
    assert tok("<|im_start|>user").input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_chat_template_and_image_tokens() -> None:
    _, processor = build_tiny()
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


@pytest.fixture(scope="module")
def exported(qwen_tiny_export) -> Path:
    """``kiln export qwen2-vl-tiny``: every part parity-checked against torch."""
    out, result = qwen_tiny_export
    assert result.passed and max(p.max_abs for p in result.parity) < 1e-5
    return out


@pytest.fixture(scope="module")
def reference():
    """The same tiny model in transformers (build_tiny is seeded: identical weights)."""
    return build_tiny()


@pytest.fixture(scope="module")
def chat(exported: Path):
    from modelkiln.genai.chat import ChatModel

    return ChatModel.open(str(exported))


def _messages(text: str, images: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_export_writes_every_part_and_the_processor(exported: Path) -> None:
    import json

    from modelkiln.genai.spec import GenaiSpec
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    names = {p.name for p in exported.iterdir()}
    assert {"embed.onnx", "decoder.onnx", "genai.json", "tokenizer.json", "chat_template.jinja"} <= names
    spec = json.loads((exported / "genai.json").read_text())
    assert spec["vision"] == "vision.onnx" and "vision.onnx" in names and "buckets" not in spec
    assert GenaiSpec.load(exported).to_dict() == spec  # what the zoo writes, the engine reads
    decoder = cpu_backend(exported / "decoder.onnx")
    names = [i.name for i in decoder.input_metadata]  # the shared cache layout (builder default)
    assert names[:4] == ["inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length"]
    assert decoder.output_metadata[0].shape[1] == 1  # last-position logits only


def _teacher_forced(chat, reference, messages, images, steps: int) -> float:
    """Max |logits ours - transformers| over the prefill and ``steps`` forced decode steps."""
    model, processor = reference
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=list(images) or None, return_tensors="pt")
    forced = np.random.default_rng(1).integers(0, 590, steps).tolist()  # arbitrary tokens, not greedy
    full = torch.cat([inputs["input_ids"], torch.tensor([forced])], dim=1)
    extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    mm = (
        {
            "mm_token_type_ids": torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros(1, steps, dtype=torch.int64)], 1
            )
        }
        if "mm_token_type_ids" in inputs
        else {}
    )
    with torch.no_grad():
        ref = model(input_ids=full, attention_mask=torch.ones_like(full), **extra, **mm).logits[0].numpy()
    prompt_len = inputs["input_ids"].shape[1]
    gen = chat.start(chat.prompt(messages, images), steps + 1)
    worst = 0.0
    try:
        for i, token in enumerate([*forced, None]):
            gen.step(force=token if token is not None else 0)
            worst = max(worst, float(np.abs(gen.logits[0, -1] - ref[prompt_len - 1 + i]).max()))
    finally:
        gen.close()
    return worst


def test_teacher_forced_logits_match_transformers_at_every_step(chat, reference) -> None:
    text_err = _teacher_forced(chat, reference, _messages("Tell me about the harbour."), [], 12)
    image_err = _teacher_forced(chat, reference, _messages("What is in it?", 1), [_image(100, 120)], 12)
    print(f"teacher-forced max abs logit error: text {text_err:.2e}, image {image_err:.2e}")
    assert text_err < LOGIT_TOL and image_err < LOGIT_TOL


def _greedy_reference(reference, chat, messages, images, n: int) -> list[int]:
    model, processor = reference
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=list(images) or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _greedy_ours(chat, messages, images, n: int) -> list[int]:
    gen = chat.start(chat.prompt(messages, images), n)
    gen.stop = set()  # as min_new_tokens above: compare n tokens even past an end token
    try:
        while not gen.done:
            gen.step()
    finally:
        gen.close()
    return gen.tokens


@pytest.mark.parametrize(
    ("images", "text"),
    [
        ([], "Tell me about the harbour."),
        ([(100, 120)], "Describe the picture."),
        ([(60, 150)], "Is this picture wide?"),  # 4 x 10 patches
        ([(90, 90), (150, 70)], "Compare the two pictures."),  # two images, two sizes
    ],
)
def test_greedy_matches_transformers_generate_token_for_token(chat, reference, images, text) -> None:
    arrays = [_image(h, w, i) for i, (h, w) in enumerate(images)]
    messages = _messages(text, len(arrays))
    assert _greedy_ours(chat, messages, arrays, 12) == _greedy_reference(
        reference, chat, messages, arrays, 12
    )


def test_qwen2_5_vl_tiny_exports_and_generates_like_transformers(tmp_path: Path) -> None:
    """Qwen2.5-VL (windowed vision encoder, same decoder): export parity, teacher-forced logits and
    greedy tokens with and without an image."""
    from modelkiln.export import export
    from modelkiln.genai.chat import ChatModel

    result = export("qwen2.5-vl-tiny", tmp_path / "q25")
    assert result.passed and max(p.max_abs for p in result.parity) < 1e-5
    chat = ChatModel(tmp_path / "q25")
    reference = build_tiny(family="qwen2.5-vl")
    image = [_image(100, 120)]
    err = _teacher_forced(chat, reference, _messages("What is in it?", 1), image, 8)
    assert err < LOGIT_TOL
    for images in ([], image):
        messages = _messages("Describe the picture.", len(images))
        assert _greedy_ours(chat, messages, images, 10) == _greedy_reference(
            reference, chat, messages, images, 10
        )
