"""Caption sets: every accepted form (COCO folder, COCO JSON, CSV, JSONL, images + labels) reads
to the same set; what is dropped is counted (missing/unreadable images, empty and repeated
captions, images without captions); malformed, oversized or empty input is one clear BadInput;
splits go by image. The CSV/JSONL parsers face user files: hypothesis feeds them anything."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelkiln.data import captions as captions_module
from modelkiln.data.captions import (
    MAX_CAPTION_CHARS,
    CaptionReport,
    CaptionSet,
    load_captions,
    parse_csv,
    parse_jsonl,
)
from modelkiln.errors import BadInput

CAPS = {
    "a.jpg": ["a red square", "something red"],
    "b.png": ["a green square"],
    "c.jpg": ["a blue square", "blue", "a blue thing"],
}


def _write_images(folder: Path, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names or list(CAPS)):
        cv2.imwrite(str(folder / name), np.full((12, 16, 3), 40 * i, np.uint8))
    return folder


def _coco(caps: dict[str, list[str]], extra_images: tuple[str, ...] = ()) -> dict[str, object]:
    names = [*caps, *extra_images]
    images = [{"id": 100 + i, "file_name": n, "width": 16, "height": 12} for i, n in enumerate(names)]
    ids = {n: 100 + i for i, n in enumerate(names)}
    annotations = [
        {"id": j, "image_id": ids[n], "caption": c}
        for j, (n, c) in enumerate((n, c) for n, cs in caps.items() for c in cs)
    ]
    return {"info": {}, "images": images, "annotations": annotations}


def _csv(rows: list[tuple[str, str]]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["image", "caption"])
    w.writerows(rows)
    return out.getvalue()


ROWS = [(n, c) for n, cs in CAPS.items() for c in cs]


def _as_dict(cs: CaptionSet) -> dict[str, tuple[str, ...]]:
    return {p.name: c for p, c in zip(cs.images, cs.captions, strict=True)}


def test_coco_layout_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "train2017")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(_coco(CAPS)))
    cs, report = load_captions(tmp_path)
    assert _as_dict(cs) == {n: tuple(c) for n, c in CAPS.items()}
    assert cs.images[0] == tmp_path / "train2017" / "a.jpg"
    assert report == CaptionReport(source=cs.source) and report.warnings() == []
    assert len(cs) == 3


@pytest.mark.parametrize("form", ["coco-file", "csv", "jsonl", "labels-json", "labels-csv", "folder-csv"])
def test_every_form_reads_the_same_set(tmp_path: Path, form: str) -> None:
    images = _write_images(tmp_path / "imgs")
    if form == "coco-file":  # images in <split>/ beside the JSON
        _write_images(tmp_path / "val2014")
        (tmp_path / "captions_val2014.json").write_text(json.dumps(_coco(CAPS)))
        cs, _ = load_captions(tmp_path / "captions_val2014.json")
    elif form in ("csv", "folder-csv"):
        (images / "captions.csv").write_text(_csv(ROWS))
        cs, _ = load_captions(images / "captions.csv" if form == "csv" else images)
    elif form == "jsonl":
        (images / "c.jsonl").write_text("\n".join(json.dumps({"image": n, "caption": c}) for n, c in ROWS))
        cs, _ = load_captions(images / "c.jsonl")
    elif form == "labels-json":  # --data IMAGES --labels CAPTIONS.json
        (tmp_path / "caps.json").write_text(json.dumps(_coco(CAPS)))
        cs, _ = load_captions(images, tmp_path / "caps.json")
    else:
        (tmp_path / "caps.csv").write_text(_csv(ROWS))
        cs, _ = load_captions(images, tmp_path / "caps.csv")
    assert _as_dict(cs) == {n: tuple(c) for n, c in CAPS.items()}
    assert all(p.is_file() for p in cs.images)


def test_texts_flattens_with_owners() -> None:
    cs = CaptionSet((Path("a"), Path("b")), (("x", "y"), ("z",)), "test")
    texts, owner = cs.texts()
    assert texts == ["x", "y", "z"] and owner.tolist() == [0, 0, 1] and owner.dtype == np.int64


def test_drops_are_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _write_images(tmp_path, ["a.jpg", "b.png", "c.jpg"])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg at all")
    (folder / "notes.txt").write_text("hello")
    rows = [
        *ROWS,
        ("a.jpg", "a red square"),  # duplicate of the same image
        ("a.jpg", "   "),  # empty
        ("b.png", ""),  # empty
        ("gone.jpg", "never there"),  # missing image
        ("broken.jpg", "cannot decode"),  # unreadable
        ("notes.txt", "not an image"),  # unreadable (not an image format)
        ("lonely.jpg", ""),  # image whose only caption is empty
        ("c.jpg", "a blue square"),  # another duplicate
    ]
    (folder / "captions.csv").write_text(_csv(rows))
    with caplog.at_level(logging.WARNING, logger="modelkiln.data.captions"):
        cs, report = load_captions(folder / "captions.csv")
    assert _as_dict(cs) == {n: tuple(c) for n, c in CAPS.items()}
    assert report == CaptionReport(
        missing_images=1,
        unreadable_images=2,
        empty_captions=3,
        images_without_captions=1,
        duplicate_captions=2,
        source=str(folder / "captions.csv"),
    )
    lines = report.warnings()
    assert len(lines) == 5 and all(line.startswith(str(folder / "captions.csv")) for line in lines)
    assert "1 image(s) not found" in lines[0]
    assert [r.getMessage() for r in caplog.records] == lines


def test_coco_images_without_captions_and_unknown_ids(tmp_path: Path) -> None:
    folder = _write_images(tmp_path, ["a.jpg", "b.png", "c.jpg", "d.jpg"])
    data = _coco(CAPS, extra_images=("d.jpg",))
    data["annotations"].append({"id": 99, "image_id": 555, "caption": "of no listed image"})  # type: ignore[attr-defined]
    (tmp_path / "caps.json").write_text(json.dumps(data))
    cs, report = load_captions(folder, tmp_path / "caps.json")
    assert len(cs) == 3
    assert report.images_without_captions == 1 and report.missing_images == 1


def test_same_file_written_two_ways_is_one_image(tmp_path: Path) -> None:
    folder = _write_images(tmp_path)
    (folder / "c.csv").write_text(_csv([("a.jpg", "one"), ("./a.jpg", "two"), ("./a.jpg", "one")]))
    cs, report = load_captions(folder / "c.csv")
    assert cs.captions == (("one", "two"),) and report.duplicate_captions == 1


def test_check_images_off_parses_only(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "nowhere.jpg", "captions": ["x", "y"]}))
    cs, _ = load_captions(tmp_path / "c.jsonl", check_images=False)
    assert cs.images == (tmp_path / "nowhere.jpg",) and cs.captions == (("x", "y"),)
    with pytest.raises(BadInput, match=r"no usable image-caption pairs .*1 image\(s\) not found"):
        load_captions(tmp_path / "c.jsonl")


def test_a_header_past_the_first_bytes_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write_images(tmp_path)
    monkeypatch.setattr(captions_module, "_HEADER_BYTES", 8)  # a JPEG's frame header sits later
    (folder / "c.csv").write_text(_csv(ROWS))
    cs, report = load_captions(folder / "c.csv")
    assert len(cs) == 3 and report.unreadable_images == 0


def test_images_over_the_pixel_limit_are_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write_images(tmp_path)
    monkeypatch.setattr(captions_module, "MAX_IMAGE_PIXELS", 100)  # 16x12 = 192 pixels each
    (folder / "c.csv").write_text(_csv(ROWS))
    with pytest.raises(BadInput, match=r"3 unreadable image"):
        load_captions(folder / "c.csv")


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("c.csv", "", "empty CSV; expected a header 'image,caption'"),
        ("c.csv", "file,text\na.jpg,x\n", r"expected CSV columns 'image,caption', got \['file', 'text'\]"),
        ("c.csv", "image,caption\na.jpg,x,extra\n", "line 2: 3 fields, the header has 2"),
        ("c.csv", 'image,caption\na.jpg,"never closed\n', "malformed CSV"),
        ("c.csv", "image,caption\n,x\n", "line 2: image must be a non-empty path"),
        ("c.jsonl", '{"image": "a.jpg"}\n', r"line 1: expected \{\"image\""),
        ("c.jsonl", '{"image": "a.jpg", "caption": 3}\n', "line 1: caption must be a string, got int"),
        ("c.jsonl", '\n{"image": "a.jpg", "caption": "x"\n', "line 2: not JSON"),
        ("c.jsonl", '{"image": "a.jpg", "captions": "x"}', "'captions' must be a list"),
        ("c.json", "[1, 2]", "expected a COCO captions file"),
        ("c.json", '{"images": [], "annotations": {}}', "no 'annotations' list"),
        ("c.json", '{"images": [{"id": 1}], "annotations": []}', "an entry has no 'file_name'"),
        (
            "c.json",
            '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}',
            "an entry has no 'caption'",
        ),
        ("c.json", "{" * 100_000, "not JSON"),
        ("c.txt", "a.jpg x", "expected a COCO captions .json, an image,caption .csv or a .jsonl"),
        ("c.csv", "image,caption\n", "no usable image-caption pairs .*it lists no captions"),
    ],
)
def test_malformed_files_are_one_clear_error(tmp_path: Path, name: str, text: str, match: str) -> None:
    _write_images(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(BadInput, match=match) as info:
        load_captions(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)


def test_an_over_long_caption_is_refused_with_its_row(tmp_path: Path) -> None:
    _write_images(tmp_path)
    (tmp_path / "c.csv").write_text(_csv([("a.jpg", "ok"), ("b.png", "x" * (MAX_CAPTION_CHARS + 1))]))
    with pytest.raises(BadInput, match=rf"line 3: caption of {MAX_CAPTION_CHARS + 1} characters"):
        load_captions(tmp_path / "c.csv")


def test_an_oversized_file_is_refused_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(captions_module, "MAX_CAPTION_FILE_BYTES", 10)
    (tmp_path / "c.json").write_text('{"images": [], "annotations": [] }')
    with pytest.raises(BadInput, match=r"c.json is 34 bytes; the limit is 10 bytes"):
        load_captions(tmp_path / "c.json")


def test_missing_paths_and_ambiguous_folders(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="caption data not found"):
        load_captions(tmp_path / "nope")
    with pytest.raises(BadInput, match="caption file not found"):
        load_captions(tmp_path, tmp_path / "nope.json")
    with pytest.raises(BadInput, match="--data must be the image folder"):
        load_captions(tmp_path / "x.csv", tmp_path / "c.csv")
    with pytest.raises(BadInput, match="is not a caption set"):
        load_captions(tmp_path)
    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"captions_{split}.json").write_text("{}")
    with pytest.raises(BadInput, match="several caption files .*captions_train2017.json"):
        load_captions(tmp_path)


def test_coco_json_without_its_images(tmp_path: Path) -> None:
    (tmp_path / "captions_val2017.json").write_text(json.dumps(_coco(CAPS)))
    with pytest.raises(BadInput, match="no images of .*captions_val2017.json found"):
        load_captions(tmp_path / "captions_val2017.json")


def test_split_is_by_image_reproducible_and_never_empty() -> None:
    cs = CaptionSet(
        tuple(Path(f"{i}.jpg") for i in range(10)), tuple((f"c{i}", f"d{i}") for i in range(10)), "t"
    )
    train, val = cs.split(0.3, seed=4)
    assert (len(train), len(val)) == (7, 3)
    assert not set(train.images) & set(val.images) and set(train.images) | set(val.images) == set(cs.images)
    for part in (train, val):  # captions travel with their image
        assert all(c == (f"c{p.stem}", f"d{p.stem}") for p, c in zip(part.images, part.captions, strict=True))
        assert list(part.images) == sorted(part.images, key=lambda p: int(p.stem))
    assert cs.split(0.3, seed=4) == (train, val)
    assert cs.split(0.3, seed=5) != (train, val)
    for bad in (0.0, 1.0, 0.01):
        with pytest.raises(BadInput):
            cs.split(bad, seed=0)
    assert cs.subset([3, 1]).images == (Path("3.jpg"), Path("1.jpg"))


def test_caption_sets_refuse_images_without_captions() -> None:
    with pytest.raises(ValueError, match="at least one caption"):
        CaptionSet((Path("a"),), ((),), "t")


@pytest.mark.assets
def test_real_coco_captions(assets: Path) -> None:
    cs, report = load_captions(assets / "coco-captions")
    texts, owner = cs.texts()
    assert len(cs) == 80 and len(texts) == 400 and np.bincount(owner).tolist() == [5] * 80
    assert report.warnings() == []
    same, _ = load_captions(
        assets / "coco-captions" / "train2017",
        assets / "coco-captions" / "annotations" / "captions_train2017.json",
    )
    assert same == cs


# ---- property tests: the parsers face user files -----------------------------------------------

cells = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_csv_parser_returns_rows_or_bad_input(text: str) -> None:
    try:
        rows = parse_csv(text, "f.csv")
    except BadInput as exc:
        assert "f.csv" in str(exc)
    else:
        assert all(isinstance(i, str) and i and isinstance(c, str) for i, c in rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(cells.filter(lambda s: s.strip() != ""), cells), max_size=8))
def test_csv_round_trips_what_a_csv_writer_wrote(rows: list[tuple[str, str]]) -> None:
    got = parse_csv(_csv(rows), "f.csv")
    assert got == [(i.strip(), c.strip()) for i, c in rows]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_jsonl_parser_returns_rows_or_bad_input(text: str) -> None:
    try:
        rows = parse_jsonl(text, "f.jsonl")
    except BadInput as exc:
        assert "f.jsonl" in str(exc)
    else:
        assert all(isinstance(i, str) and i and isinstance(c, str) for i, c in rows)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | cells,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(cells, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.dictionaries(st.sampled_from(["image", "caption", "captions", "x"]), json_values), max_size=5)
)
def test_jsonl_parser_on_any_json_objects(objects: list[dict[str, object]]) -> None:
    text = "\n".join(json.dumps(o) for o in objects)
    try:
        rows = parse_jsonl(text, "f.jsonl")
    except BadInput as exc:
        assert "f.jsonl" in str(exc)
    else:
        assert all(isinstance(i, str) and i and isinstance(c, str) for i, c in rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(cells.filter(lambda s: s.strip() != ""), cells), max_size=8))
def test_jsonl_round_trips_any_text(rows: list[tuple[str, str]]) -> None:
    text = "\n".join(json.dumps({"image": i, "caption": c}, ensure_ascii=False) for i, c in rows)
    assert parse_jsonl(text, "f.jsonl") == [(i.strip(), c.strip()) for i, c in rows]
