"""Retrieval recall@k: hand-computed small cases (several captions per image included), a perfect
embedding scores 1.0, a constant one scores chance (ties never help the model), and the scorer
runs image and text towers over a caption set (a stand-in dual encoder with known embeddings)."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

from modelkiln.accuracy.tasks import TASKS, EvalRequest
from modelkiln.accuracy.tasks.retrieval import KS, METRICS, embed_captions, recall_at_k, score_retrieval
from modelkiln.cli.compare import compare_cmd
from modelkiln.cli.evaluate import evaluate_cmd
from modelkiln.data.captions import load_captions
from modelkiln.errors import BadInput, ConfigError
from modelkiln.predict import Predictor
from modelkiln.runtime.backends.base import Backend, TensorMeta
from modelkiln.zoo import Task
from modelkiln.zoo.base import ImageTask, Part, Prepared, TensorSpec

KEYS = {f"{way}_r@{k}" for way in ("text_to_image", "image_to_text") for k in KS} | {"mean_r@5"}


def test_keys_are_the_contract_and_the_headline_comes_first() -> None:
    rng = np.random.default_rng(0)
    got = recall_at_k(rng.normal(size=(4, 3)), rng.normal(size=(6, 3)), np.array([0, 0, 1, 2, 3, 3]))
    assert set(got) == KEYS and next(iter(got)) == "mean_r@5"
    assert set(METRICS) == KEYS and METRICS[0] == "mean_r@5"
    assert got["mean_r@5"] == pytest.approx((got["text_to_image_r@5"] + got["image_to_text_r@5"]) / 2)


def test_perfect_embeddings_score_one_at_any_scale() -> None:
    images = np.eye(12) * 7.0
    owner = np.repeat(np.arange(12), 3)  # three captions per image
    texts = images[owner] * np.linspace(0.1, 5, owner.size)[:, None]
    assert recall_at_k(images, texts, owner) == pytest.approx(dict.fromkeys(KEYS, 1.0))


def test_constant_embeddings_score_chance_not_one() -> None:
    n, per = 20, 5
    owner = np.repeat(np.arange(n), per)
    got = recall_at_k(np.ones((n, 4)), np.ones((n * per, 4)), owner)
    for k in KS:
        assert got[f"text_to_image_r@{k}"] == pytest.approx(k / n)
        # any of an image's 5 captions among k of 100 texts drawn at random (hypergeometric)
        t = n * per
        assert got[f"image_to_text_r@{k}"] == pytest.approx(1 - comb(t - per, k) / comb(t, k))
    assert got["text_to_image_r@1"] == pytest.approx(0.05)


def test_a_tie_with_the_true_match_counts_half_at_k1() -> None:
    images = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 identical
    texts = np.array([[1.0, 0.0], [0.0, 1.0]])
    got = recall_at_k(images, texts, np.array([0, 2]), ks=(1, 2))
    assert got["text_to_image_r@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert got["text_to_image_r@2"] == pytest.approx(1.0)
    # image 1 has no caption: not scored image->text; image 0 finds its text first
    assert got["image_to_text_r@1"] == pytest.approx(1.0)
    assert "mean_r@5" not in got


def test_hand_computed_several_captions_per_image() -> None:
    # three images on the axes of a plane; captions point at their image or away from it
    images = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    texts = np.array(
        [
            [0.9, 0.1, 0.0],  # t0 of image 0: image 0 first -> hit@1
            [0.0, 1.0, 0.2],  # t1 of image 0: image 1 > image 2 > image 0 -> rank 3
            [0.1, 0.9, 0.0],  # t2 of image 1: hit@1
            [0.6, 0.0, 0.5],  # t3 of image 2: image 0 first, image 2 second -> rank 2
        ]
    )
    owner = np.array([0, 0, 1, 2])
    got = recall_at_k(images, texts, owner, ks=(1, 2, 3))
    assert got["text_to_image_r@1"] == pytest.approx(2 / 4)
    assert got["text_to_image_r@2"] == pytest.approx(3 / 4)
    assert got["text_to_image_r@3"] == pytest.approx(1.0)
    # image->text. normalised cosines: image 0 ranks t0 (.994), t3 (.768), t2 (.110), t1 (0):
    #   its best caption t0 is first -> hit@1
    # image 1 ranks t1 (.981), t2 (.994): t2 first -> hit@1
    # image 2 ranks t3 (.640), t1 (.196), others 0: t3 first -> hit@1
    assert got["image_to_text_r@1"] == pytest.approx(1.0)
    # move image 2's only caption away: image 2 now ranks t1 (.196) first, t3 (0) last of 4
    texts[3] = [0.6, 0.5, 0.0]
    got = recall_at_k(images, texts, owner, ks=(1, 3, 4))
    # t3 (of image 2) now ranks image 0, image 1 above image 2 -> rank 3
    assert got["text_to_image_r@1"] == pytest.approx(2 / 4)
    # image 2: t1 (.196) first, then t0, t2, t3 all at 0 cosine: a 3-way tie for ranks 2-4, so
    # its caption t3 is in the top 3 in 2 of the tie's 3 orders
    assert got["image_to_text_r@1"] == pytest.approx(2 / 3)
    assert got["image_to_text_r@3"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert got["image_to_text_r@4"] == pytest.approx(1.0)


def test_large_sets_are_chunked_to_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkiln.accuracy.tasks import retrieval

    rng = np.random.default_rng(1)
    images, owner = rng.normal(size=(37, 8)), rng.integers(0, 37, 90)
    texts = images[owner] + rng.normal(scale=1.5, size=(90, 8))
    whole = recall_at_k(images, texts, owner)
    monkeypatch.setattr(retrieval, "_CHUNK", 7)
    assert recall_at_k(images, texts, owner) == pytest.approx(whole)
    assert 0.0 < whole["text_to_image_r@1"] < 1.0


@pytest.mark.parametrize(
    ("images", "texts", "owner", "match"),
    [
        (np.ones((2, 3)), np.ones((2, 4)), np.array([0, 1]), "3 dims but text embeddings 4"),
        (np.ones((2, 3)), np.ones((2, 3)), np.array([0, 2]), "outside 0..1"),
        (np.ones((2, 3)), np.ones((2, 3)), np.array([0.0, 1.0]), "integer image indices"),
        (np.ones((2, 3)), np.ones((3, 3)), np.array([0, 1]), "3 integer image indices"),
        (np.zeros((0, 3)), np.ones((1, 3)), np.array([0]), "non-empty"),
        (np.full((2, 3), np.nan), np.ones((2, 3)), np.array([0, 1]), "NaN"),
    ],
)
def test_bad_inputs_are_named(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        recall_at_k(images, texts, owner)


# ---- the scorer, with a stand-in dual encoder ---------------------------------------------------

VOCAB = ("red", "green", "blue", "white")


class FakeDualEncoder(ImageTask):
    """Images embed as their mean BGR colour; a text as the one-hot of its colour word."""

    name = "fake-dual"
    task = Task.EMBEDDING

    @property
    def parts(self) -> tuple[Part, ...]:
        return (
            Part("image", (TensorSpec("image", "float32", ("batch", 3)),), ()),
            Part("text", (TensorSpec("input_ids", "int64", ("batch", 1)),), ()),
        )

    def build(self, weights: str | None) -> dict[str, object]:  # type: ignore[override]
        raise NotImplementedError

    def preprocess(self, images: list[np.ndarray]) -> Prepared:
        return Prepared({"image": np.stack([im.reshape(-1, 3).mean(0) for im in images]).astype(np.float32)})

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> list[object]:
        return []

    def text_feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        ids = [[next(i for i, w in enumerate(VOCAB) if w in t)] for t in texts]
        return {"input_ids": np.array(ids, np.int64)}


class Tower(Backend):
    """Image tower: BGR mean -> (r, g, b, white) scores; text tower: id -> one-hot."""

    def __init__(self, part: str) -> None:
        feed = (
            TensorMeta("image", "float32", ("batch", 3))
            if part == "image"
            else TensorMeta("input_ids", "int64", ("batch", 1))
        )
        out = "image_embeds" if part == "image" else "text_embeds"
        super().__init__("tower", [feed], [TensorMeta(out, "float32", ("batch", 4))])
        self.part, self.calls = part, 0

    @classmethod
    def load(cls, model: object, options: object = None) -> Tower:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.part == "text":
            return {"text_embeds": np.eye(4, dtype=np.float32)[feed["input_ids"][:, 0]]}
        b, g, r = feed["image"].T / 255.0
        white = np.minimum(np.minimum(r, g), b)
        return {"image_embeds": np.stack([r - white, g - white, b - white, white * 2], 1).astype(np.float32)}


COLOURS = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0), "white": (255, 255, 255)}


def _colour_set(folder: Path, wrong_blue: bool = False) -> Path:
    """Four plain-colour images, two captions each; ``wrong_blue`` mislabels the blue one."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, bgr in COLOURS.items():
        cv2.imwrite(str(folder / f"{name}.png"), np.full((8, 10, 3), bgr, np.uint8))
        said = "red" if wrong_blue and name == "blue" else name
        rows += [
            {"image": f"{name}.png", "caption": f"a {said} square"},
            {"image": f"{name}.png", "caption": f"all {said}"},
        ]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def _predictor() -> Predictor:
    return Predictor(FakeDualEncoder(), {"image": Tower("image"), "text": Tower("text")})


def test_scorer_embeds_through_both_towers_and_scores(tmp_path: Path) -> None:
    data = _colour_set(tmp_path)
    spec = TASKS[Task.RETRIEVAL]
    out = tmp_path / "pred.npz"
    scored = spec.scorer(_predictor(), EvalRequest(data, predictions=out))  # type: ignore[misc]
    assert scored.images == 4
    assert scored.metrics == pytest.approx(dict.fromkeys(KEYS, 1.0))
    assert list(scored.metrics) == list(spec.metrics)
    saved = np.load(out)
    assert saved["image_embeds"].shape == (4, 4) and saved["text_embeds"].shape == (8, 4)
    assert recall_at_k(saved["image_embeds"], saved["text_embeds"], saved["text_image"]) == scored.metrics


def test_scorer_counts_a_mislabelled_image_and_honours_limit(tmp_path: Path) -> None:
    data = _colour_set(tmp_path, wrong_blue=True)
    scored = score_retrieval(_predictor(), EvalRequest(data))
    # blue's captions say red: the red image beats blue for them -> t2i@1 misses 2 of 8 captions.
    # image->text@1: red's 2 captions tie with blue's 2 (4 equal texts) -> 1 - 2/4 = 1/2; the blue
    # image is orthogonal to every text (8-way tie, 2 its own) -> 1 - 6/8 = 1/4
    assert scored.metrics["text_to_image_r@1"] == pytest.approx(6 / 8)
    assert scored.metrics["image_to_text_r@1"] == pytest.approx((1 + 1 + 1 / 2 + 1 / 4) / 4)
    limited = score_retrieval(_predictor(), EvalRequest(data, limit=2))
    assert limited.images == 2


def test_embed_captions_batches_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkiln.accuracy.tasks import retrieval

    monkeypatch.setattr(retrieval, "TEXT_BATCH", 3)
    predictor = _predictor()
    captions, _ = load_captions(_colour_set(tmp_path))
    images, texts = embed_captions(predictor, captions)
    assert images.shape == (4, 4) and texts.shape == (8, 4)
    assert predictor.backends["text"].calls == 3  # type: ignore[attr-defined]  # 8 captions by 3


def test_scorer_refuses_a_model_that_is_not_a_dual_encoder(tmp_path: Path) -> None:
    data = _colour_set(tmp_path)
    one_tower = Predictor(FakeDualEncoder(), {"image": Tower("image")})
    with pytest.raises(BadInput, match="fake-dual is not a dual encoder.*parts found: image"):
        score_retrieval(one_tower, EvalRequest(data))


# ---- evaluate / kiln evaluate / kiln compare --task retrieval on stand-in exported towers --------

#: open_clip's ViT-B-32 token ids of the colour words (what the text tower looks for)
TOKENS = {"red": 736, "green": 1901, "blue": 1746}


def _towers(folder: Path, image_matrix: np.ndarray) -> Path:
    """A clip-vit-b-32 folder as an export writes it (image.onnx + text.onnx with the zoo's
    metadata), with stand-in graphs: the image tower is the mean normalised RGB times
    ``image_matrix``; the text tower marks which colour words the caption's tokens hold."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True)
    meta = {"modelkiln.zoo": "clip-vit-b-32", "modelkiln.task": "embedding", "logit_scale": "100.0"}
    image = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["mean", "W"], ["image_embeds"]),
        ],
        "image_tower",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(image_matrix.astype(np.float32), "W")],
    )
    words = np.array(list(TOKENS.values()), np.int64).reshape(1, 1, 3)
    text = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["input_ids", "axis"], ["ids"]),
            helper.make_node("Equal", ["ids", "words"], ["hit"]),
            helper.make_node("Cast", ["hit"], ["hitf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", ["hitf"], ["text_embeds"], axes=[1], keepdims=0),
        ],
        "text_tower",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 77])],
        [helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array([2], np.int64), "axis"), numpy_helper.from_array(words, "words")],
    )
    for name, graph in (("image", image), ("text", text)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        for key, value in {**meta, "modelkiln.part": name}.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, folder / f"{name}.onnx")
    return folder


def _rgb_set(folder: Path) -> tuple[Path, Path]:
    """Images red/green/blue.png in ``folder/images`` and a COCO captions JSON for them."""
    images = folder / "images"
    images.mkdir(parents=True)
    entries, annotations = [], []
    for i, (name, bgr) in enumerate((n, COLOURS[n]) for n in TOKENS):
        cv2.imwrite(str(images / f"{name}.png"), np.full((30, 40, 3), bgr, np.uint8))
        entries.append({"id": i, "file_name": f"{name}.png"})
        annotations += [
            {"id": 2 * i + j, "image_id": i, "caption": f"{w} {name} square"}
            for j, w in enumerate(("a", "one"))
        ]
    labels = folder / "captions_val.json"
    labels.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return images, labels


@pytest.fixture
def clip_towers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(FP32-like folder, a worse "INT8" folder blind to blue, images, captions)."""
    pytest.importorskip("open_clip")
    from modelkiln.zoo.clip import CLIPFamily

    if not hasattr(CLIPFamily, "text_feed"):
        pytest.skip("zoo/clip.py has no DualEncoder.text_feed yet (helper TRAIN)")
    good = _towers(tmp_path / "fp32", np.eye(3))
    worse = np.eye(3)
    worse[2] = 0.0  # blind to the blue channel
    bad = _towers(tmp_path / "int8", worse)
    return (good, bad, *_rgb_set(tmp_path / "data"))


def test_evaluate_task_retrieval_through_exported_towers(clip_towers: tuple[Path, Path, Path, Path]) -> None:
    from modelkiln.accuracy.evaluate import evaluate

    good, _, images, labels = clip_towers
    result = evaluate(good, None, images, labels, task="retrieval")
    assert result.task is Task.RETRIEVAL and result.images == 3
    assert result.metrics == pytest.approx(dict.fromkeys(KEYS, 1.0))
    with pytest.raises(BadInput, match="no task metric for clip-vit-b-32 \\(embedding\\)"):
        evaluate(good, None, images, labels)  # its own task has none: --task retrieval is needed
    with pytest.raises(BadInput, match="is a embedding model .*cannot be scored on classification"):
        evaluate(good, None, images, labels, task="classification")
    with pytest.raises(BadInput, match="retrieval: clip-vit-b-32 is not a dual encoder.*parts found: image"):
        evaluate(good / "image.onnx", None, images, labels, task="retrieval")


def test_evaluate_refuses_retrieval_on_a_classifier(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from modelkiln.accuracy.evaluate import evaluate

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["out"])],
        "cls",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 32, 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="modelkiln.zoo", value="efficientnet_lite0")
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(BadInput, match="efficientnet_lite0 is not a dual encoder"):
        evaluate(tmp_path / "m.onnx", None, tmp_path, task="retrieval")
    with pytest.raises(BadInput, match="unknown task 'segmentation'"):
        evaluate(tmp_path / "m.onnx", None, tmp_path, task="segmentation")


def _kiln(*args: str) -> Result:
    """The evaluate and compare commands in-process (the towers' tokenizer is already loaded)."""
    app = typer.Typer()
    app.command("evaluate")(evaluate_cmd)
    app.command("compare")(compare_cmd)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_cli_evaluate_and_compare_retrieval(
    clip_towers: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    good, bad, images, labels = clip_towers
    out = tmp_path / "r.json"
    run = _kiln(
        "evaluate",
        str(good),
        "--task",
        "retrieval",
        "--data",
        str(images),
        "--labels",
        str(labels),
        "--json",
        str(out),
    )
    assert run.exit_code == 0, run.output
    assert "text_to_image_r@1 1.0000" in run.output
    written = json.loads(out.read_text())
    assert written["task"] == "retrieval" and written["images"] == 3
    assert set(written["metrics"]) == KEYS
    cmp_out = tmp_path / "c.json"
    run = _kiln(
        "compare",
        str(good),
        str(bad),
        "--task",
        "retrieval",
        "--data",
        str(images),
        "--labels",
        str(labels),
        "--json",
        str(cmp_out),
    )
    assert run.exit_code == 0, run.output
    assert "mean_r@5 (headline)" in run.output
    cmp = json.loads(cmp_out.read_text())
    assert cmp["metric"] == "mean_r@5" and cmp["task"] == "retrieval"
    assert cmp["reference"]["metrics"]["text_to_image_r@1"] == 1.0
    # the "INT8" side is blind to blue: blue's two captions are orthogonal to all three images (a
    # 3-way tie: 1/3 each at k=1, 2/3 at k=2); every image still finds its own captions first
    assert cmp["candidate"]["metrics"]["text_to_image_r@1"] == pytest.approx((4 + 2 / 3) / 6)
    assert cmp["drop"]["text_to_image_r@1"] == pytest.approx(2 / 9)
    assert cmp["drop"]["image_to_text_r@1"] == pytest.approx(0.0) and cmp["drop"]["mean_r@5"] == 0.0
    assert set(cmp["drop"]) == KEYS


def test_compare_labels_need_a_task(tmp_path: Path) -> None:
    run = _kiln("compare", "a.onnx", "b.onnx", "--data", str(tmp_path), "--labels", "c.json")
    assert isinstance(run.exception, ConfigError) and "--labels is for task metrics" in str(run.exception)
