"""Images of any size on the chat path, without torch: our numpy image processor against
transformers' (pixel values and patch grids, several aspect ratios, max_pixels bounding a large
image), the processor settings read from either file an exported folder may hold, M-RoPE
positions for any grid against transformers' ``get_rope_index``, chat with images of several
aspect ratios token for token against transformers (Qwen2-VL and Qwen2.5-VL tiny), and folders
exported with one vision graph per fixed bucket still loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from modelkiln.errors import BadInput

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

#: (height, width) of test images: square, 3:1, 1:3, odd sizes, an upscale, downscales.
SIZES = ((100, 120), (90, 90), (60, 180), (180, 60), (37, 201), (20, 20), (1001, 677), (2000, 3000))


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _messages(text: str, images: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("max_pixels", [112 * 112, 28 * 28 * 1280])
def test_pixels_and_grids_match_transformers(max_pixels: int) -> None:
    """Exactly the PIL backend's pixel values (atol 1e-4; measured 0), the same grids as both
    backends (the torchvision backend resamples differently: up to ~0.3 apart in normalised units
    on noisy downscaled images, one uint8 level on most pixels)."""
    import transformers

    from modelkiln.genai.images import ImageProcessor
    from modelkiln.zoo.qwen_vl import image_processor

    ours = ImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels)
    pil = image_processor(min_pixels=56 * 56, max_pixels=max_pixels)
    tv = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels)
    for i, (h, w) in enumerate(SIZES):
        image = _image(h, w, i)
        got = ours([image])
        ref = pil(images=[image], return_tensors="np")
        other = tv(images=[image], return_tensors="np")
        assert np.array_equal(got["image_grid_thw"], ref["image_grid_thw"])
        assert np.array_equal(got["image_grid_thw"], other["image_grid_thw"])
        assert np.abs(got["pixel_values"] - ref["pixel_values"]).max() <= 1e-4, (h, w)
        assert got["pixel_values"].dtype == np.float32


def test_smart_resize_is_transformers_and_max_pixels_bounds_the_cost() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    from modelkiln.genai.images import ImageProcessor, smart_resize

    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 5000, (300, 2)):
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(int(h), int(w)) == reference(int(h), int(w)), (h, w)
    processor = ImageProcessor(max_pixels=448 * 448)
    _, gh, gw = processor.grid(6000, 8000)  # a large untrusted image: at most max_pixels of patches
    assert gh * 14 * gw * 14 <= 448 * 448 and (gh % 2, gw % 2) == (0, 0)
    with pytest.raises(BadInput, match="aspect ratio over 200"):
        processor.grid(10, 2500)


def test_settings_come_from_either_processor_file(tmp_path: Path) -> None:
    from modelkiln.errors import ConfigError
    from modelkiln.genai.images import ImageProcessor

    hub = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "resample": 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub))
    found = ImageProcessor.from_folder(tmp_path)
    assert (found.min_pixels, found.max_pixels, found.factor) == (3136, 12845056, 28)
    other = tmp_path / "v5"
    other.mkdir()
    section = {"image_processor": {"size": {"shortest_edge": 100, "longest_edge": 20000}}}
    (other / "processor_config.json").write_text(json.dumps(section))
    assert (ImageProcessor.from_folder(other).min_pixels, ImageProcessor.from_folder(other).max_pixels) == (
        100,
        20000,
    )
    with pytest.raises(ConfigError, match="no image processor settings"):
        ImageProcessor.from_folder(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="min_pixels 10, max_pixels 5"):
        ImageProcessor.from_dict({"min_pixels": 10, "max_pixels": 5})


@pytest.fixture(scope="module")
def reference():
    from modelkiln.zoo.qwen_vl import build_tiny

    return build_tiny()


def _reference_inputs(processor, messages, images):
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=list(images) or None, return_tensors="pt")


def test_mrope_positions_match_transformers_for_any_grid(chat, reference) -> None:
    model, processor = reference
    for sizes in ([(60, 180)], [(180, 60)], [(37, 201), (90, 90)], [(100, 120)]):
        images = [_image(h, w, i) for i, (h, w) in enumerate(sizes)]
        messages = _messages("What is in the pictures?", len(images))
        prompt = chat.prompt(messages, images)
        inputs = _reference_inputs(processor, messages, images)
        ref, delta = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
        assert np.array_equal(prompt.positions, ref[:, 0].numpy()) and prompt.delta == int(delta[0])


@pytest.mark.parametrize("sizes", [[(60, 180)], [(180, 60)], [(37, 201)], [(1001, 677), (20, 20)]])
def test_chat_with_images_of_any_shape_is_token_for_token(chat, reference, sizes) -> None:
    model, processor = reference
    images = [_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    messages = _messages("Describe the picture.", len(images))
    inputs = _reference_inputs(processor, messages, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    gen = chat.start(chat.prompt(messages, images), 10)
    gen.stop = set()
    try:
        while not gen.done:
            gen.step()
    finally:
        gen.close()
    assert gen.tokens == out[0, inputs["input_ids"].shape[1] :].tolist()


def test_qwen2_5_vl_windows_for_a_wide_image(tmp_path: Path) -> None:
    """Qwen2.5-VL's windowed encoder on a 1:3 image (several windows, edge windows smaller)."""
    from modelkiln.export import export
    from modelkiln.genai.chat import ChatModel
    from modelkiln.zoo.qwen_vl import build_tiny

    export("qwen2.5-vl-tiny", tmp_path)
    chat = ChatModel(tmp_path)
    model, processor = build_tiny(family="qwen2.5-vl")
    images = [_image(60, 140)]
    messages = _messages("Describe the picture.", 1)
    inputs = _reference_inputs(processor, messages, images)
    assert inputs["image_grid_thw"][0].tolist() == [1, 4, 10]  # 2 x 5 tokens: windows 2x2, 2x2, 2x1
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    gen = chat.start(chat.prompt(messages, images), 8)
    gen.stop = set()
    gen.run()
    assert gen.tokens == out[0, inputs["input_ids"].shape[1] :].tolist()


def test_long_image_prompts_are_refused_before_their_pixels_are_processed(chat, monkeypatch) -> None:
    processor = chat.processor

    def boom(images):
        raise AssertionError("pixels processed before the length check")

    monkeypatch.setattr(processor, "image_processor", type(processor.image_processor)(max_pixels=112 * 112))
    monkeypatch.setattr(processor, "max_tokens", 20)
    monkeypatch.setattr(type(processor.image_processor), "__call__", lambda self, images: boom(images))
    text = processor.apply_chat_template(_messages("Describe it.", 1))
    with pytest.raises(BadInput, match="exceeds the context of 20 tokens"):
        processor(text, [_image(500, 500)])


def test_a_folder_with_fixed_buckets_still_loads(exported: Path, chat, tmp_path: Path) -> None:
    """An older folder (one vision graph per bucket, genai.json with "buckets"): images go to the
    nearest bucket and its graph. The bucket graph is made here from the any-size graph with the
    bucket's grid tables frozen in, so both paths must give the same embeddings."""
    import onnx

    from modelkiln.export.builder.vision import position_ids
    from modelkiln.genai.chat import ChatModel
    from modelkiln.genai.spec import GenaiSpec

    old = tmp_path / "old"
    shutil.copytree(exported, old)
    proto = onnx.load(old / "vision.onnx")
    grid = (1, 8, 8)  # the 112x112 bucket
    kept = [i for i in proto.graph.input if i.name != "position_ids"]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(position_ids(grid, 2), "position_ids"))
    onnx.save(proto, old / "vision_112x112.onnx")
    (old / "vision.onnx").unlink()
    spec = GenaiSpec.load(exported).to_dict()
    del spec["vision_config"]
    spec.update(buckets=[[112, 112]], vision={"112x112": "vision_112x112.onnx"})
    (old / "genai.json").write_text(json.dumps(spec))
    before = ChatModel(old)
    assert before.encoder is None and before.buckets == [(112, 112)]
    image = [_image(112, 112)]
    a = before.prompt(_messages("What is it?", 1), image)
    b = chat.prompt(_messages("What is it?", 1), image)
    assert np.array_equal(a.positions, b.positions) and np.abs(a.embeds - b.embeds).max() < 1e-6
