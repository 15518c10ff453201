"""Image-caption sets (any number of captions per image) for CLIP fine-tuning and retrieval.

Accepted forms, all read into one ``CaptionSet``:

- a folder in COCO layout: ``annotations/captions_*.json`` + the image folder its split names
  (``captions_train2017.json`` -> ``train2017/``);
- a COCO captions JSON file (images in ``../<split>/``, ``<split>/`` beside it, or beside it);
- a CSV with an ``image,caption`` header or a JSONL of ``{"image": ..., "caption": ...}`` rows,
  one row per caption, image paths relative to the file;
- ``data`` = an image folder and ``labels`` = any caption file above (image paths relative to
  ``data``): the ``kiln evaluate --data IMAGES --labels CAPTIONS.json`` form.

User files are checked, not trusted: a malformed or oversized file is a ``BadInput`` naming it;
what is dropped (missing or unreadable images, empty or repeated captions, images without a
caption) is counted in a ``CaptionReport`` and logged, never dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import BadInput
from modelkiln.zoo.images import FORMATS, MAX_IMAGE_PIXELS, read_header

__all__ = [
    "MAX_CAPTION_CHARS",
    "MAX_CAPTION_FILE_BYTES",
    "CaptionReport",
    "CaptionSet",
    "load_captions",
    "parse_csv",
    "parse_jsonl",
]

log = logging.getLogger(__name__)

#: Longest caption accepted (characters). CLIP-style tokenizers keep 77 tokens (a few hundred
#: characters); a longer "caption" is nearly always a broken file (an unclosed CSV quote that
#: swallowed the rows after it), so it is refused with its row rather than truncated.
MAX_CAPTION_CHARS = 2000
#: Largest caption file read (bytes), checked before parsing. COCO's largest official captions
#: file (captions_train2017.json) is about 92 MB.
MAX_CAPTION_FILE_BYTES = 256 * 1024 * 1024
#: Bytes of an image read for its header check; the whole file when the header is not in them.
_HEADER_BYTES = 256 * 1024
_CAPTION_SUFFIXES = (".json", ".csv", ".jsonl")


@dataclass(frozen=True)
class CaptionSet:
    """Images and their captions: ``captions[i]`` (at least one) belong to ``images[i]``."""

    images: tuple[Path, ...]
    captions: tuple[tuple[str, ...], ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise ValueError(f"{len(self.images)} images but {len(self.captions)} caption lists")
        if any(not c for c in self.captions):
            raise ValueError("every image needs at least one caption")

    def __len__(self) -> int:
        return len(self.images)

    def texts(self) -> tuple[list[str], np.ndarray]:
        """Every caption in image order, and the index of the image each belongs to (int64)."""
        flat = [c for caps in self.captions for c in caps]
        owner = np.repeat(np.arange(len(self.images), dtype=np.int64), [len(c) for c in self.captions])
        return flat, owner.astype(np.int64)

    def subset(self, indices: Sequence[int]) -> CaptionSet:
        """The images at ``indices`` (in that order) with all their captions."""
        return CaptionSet(
            tuple(self.images[i] for i in indices),
            tuple(self.captions[i] for i in indices),
            self.source,
        )

    def split(self, val_fraction: float, seed: int) -> tuple[CaptionSet, CaptionSet]:
        """(train, val) by IMAGE, never by caption: all captions of an image land on one side, so
        validation never sees an image trained on. Reproducible for a seed; each side keeps the
        original order. BadInput when a side would be empty."""
        if not 0.0 < val_fraction < 1.0:
            raise BadInput(f"validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        n_val = round(len(self) * val_fraction)
        if n_val < 1 or n_val >= len(self):
            raise BadInput(
                f"cannot split {len(self)} images of {self.source} with validation fraction "
                f"{val_fraction}: one side would be empty"
            )
        order = np.random.default_rng(seed).permutation(len(self))
        val = sorted(int(i) for i in order[:n_val])
        train = sorted(int(i) for i in order[n_val:])
        return self.subset(train), self.subset(val)


@dataclass(frozen=True)
class CaptionReport:
    """What reading a caption set dropped, by reason (images or captions, as named)."""

    missing_images: int = 0  # images named by the captions that are not there (or unknown ids)
    unreadable_images: int = 0  # not a supported image, corrupt header, or over the pixel limit
    empty_captions: int = 0  # blank captions
    images_without_captions: int = 0  # images listed with no usable caption
    duplicate_captions: int = 0  # a caption repeated for the same image (kept once)
    source: str = ""

    def warnings(self) -> list[str]:
        """One human line per non-zero count, naming the source."""
        what = {
            "missing_images": "image(s) not found, their captions dropped",
            "unreadable_images": "unreadable image(s) (unsupported, corrupt or too large), dropped",
            "empty_captions": "empty caption(s) dropped",
            "images_without_captions": "image(s) without any caption dropped",
            "duplicate_captions": "duplicate caption(s) of the same image dropped",
        }
        return [
            f"{self.source}: {getattr(self, f.name)} {what[f.name]}"
            for f in fields(self)
            if f.name in what and getattr(self, f.name)
        ]


# ---------------------------------------------------------------------------------------------
# Parsers: rows of (image as written, caption as written) from each file format.


def _read_text(path: Path) -> str:
    """The file's text after the size check (before any parsing)."""
    if not path.is_file():
        raise BadInput(f"caption file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CAPTION_FILE_BYTES:
        raise BadInput(f"caption file {path} is {size} bytes; the limit is {MAX_CAPTION_FILE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"caption file {path} is not UTF-8 text: {exc}") from None


def _caption(value: Any, source: str, where: str) -> str:
    if not isinstance(value, str):
        raise BadInput(f"{source}: {where}: caption must be a string, got {type(value).__name__}")
    text = value.strip()
    if len(text) > MAX_CAPTION_CHARS:
        raise BadInput(
            f"{source}: {where}: caption of {len(text)} characters; the limit is {MAX_CAPTION_CHARS}"
            " (an unclosed quote?)"
        )
    return text


def _image_name(value: Any, source: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{source}: {where}: image must be a non-empty path, got {value!r}")
    return value.strip()


def parse_csv(text: str, source: str) -> list[tuple[str, str]]:
    """(image, caption) rows of a CSV with an ``image,caption`` header (other columns ignored).
    Captions are stripped; an empty one stays (the loader counts it)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is an error
    try:
        header = next(reader, None)
        if header is None:
            raise BadInput(f"{source}: empty CSV; expected a header 'image,caption'")
        names = [h.strip().lower() for h in header]
        if "image" not in names or "caption" not in names:
            raise BadInput(f"{source}: expected CSV columns 'image,caption', got {header}")
        at_image, at_caption = names.index("image"), names.index("caption")
        rows = []
        for row in reader:
            where = f"line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                raise BadInput(f"{source}: {where}: {len(row)} fields, the header has {len(header)}")
            rows.append(
                (
                    _image_name(row[at_image], source, where),
                    _caption(row[at_caption], source, where),
                )
            )
    except csv.Error as exc:
        raise BadInput(f"{source}: malformed CSV at line {reader.line_num}: {exc}") from None
    return rows


def parse_jsonl(text: str, source: str) -> list[tuple[str, str]]:
    """(image, caption) rows of a JSONL file: one ``{"image": ..., "caption": ...}`` per line
    (blank lines skipped). A row may also give ``"captions": [...]``."""
    rows: list[tuple[str, str]] = []
    for number, raw in enumerate(text.split("\n"), 1):  # JSON strings may hold other line breaks
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise BadInput(f"{source}: {where}: not JSON: {exc}") from None
        if not isinstance(obj, dict) or "image" not in obj or not ({"caption", "captions"} & set(obj)):
            raise BadInput(f'{source}: {where}: expected {{"image": ..., "caption": ...}}, got {line[:80]!r}')
        image = _image_name(obj["image"], source, where)
        captions = obj["captions"] if "captions" in obj else [obj["caption"]]
        if not isinstance(captions, list):
            raise BadInput(f"{source}: {where}: 'captions' must be a list of strings")
        rows.extend((image, _caption(c, source, where)) for c in captions)
    return rows


def _parse_coco(text: str, source: str) -> tuple[list[tuple[str, str]], list[str], int]:
    """(rows, every listed image, captions of unknown image ids) of a COCO captions JSON."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"{source}: not JSON: {exc}") from None
    expected = (
        "a COCO captions file ('images' with id and file_name, 'annotations' with image_id and caption)"
    )
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BadInput(f"{source}: expected {expected}")
    annotations = data.get("annotations")
    if not isinstance(annotations, list):
        raise BadInput(f"{source}: expected {expected}; it has no 'annotations' list")
    names: dict[int, str] = {}
    try:
        for i, img in enumerate(data["images"]):
            names[int(img["id"])] = _image_name(img["file_name"], source, f"images[{i}]")
        rows = []
        unknown: set[int] = set()
        for i, ann in enumerate(annotations):
            image_id = int(ann["image_id"])
            caption = _caption(ann["caption"], source, f"annotations[{i}]")
            if image_id in names:
                rows.append((names[image_id], caption))
            else:
                unknown.add(image_id)
    except KeyError as exc:
        raise BadInput(f"{source}: expected {expected}; an entry has no {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInput(f"{source}: expected {expected}: {type(exc).__name__}: {exc}") from None
    return rows, list(names.values()), len(unknown)


# ---------------------------------------------------------------------------------------------
# Finding the files.


def _coco_json_in(folder: Path) -> Path | None:
    """The one ``annotations/captions_*.json`` of a COCO-layout folder (None if it has none)."""
    found = (
        sorted((folder / "annotations").glob("captions_*.json")) if (folder / "annotations").is_dir() else []
    )
    if len(found) > 1:
        raise BadInput(
            f"{folder} holds several caption files ({', '.join(p.name for p in found)}); "
            "give the one to use as --labels (or the file itself as --data)"
        )
    return found[0] if found else None


def _caption_file_in(folder: Path) -> Path:
    coco = _coco_json_in(folder)
    if coco is not None:
        return coco
    plain = [folder / f"captions{s}" for s in _CAPTION_SUFFIXES if (folder / f"captions{s}").is_file()]
    if len(plain) == 1:
        return plain[0]
    raise BadInput(
        f"{folder} is not a caption set: expected annotations/captions_*.json (COCO layout) or one "
        "captions.csv / captions.jsonl / captions.json; or give the images as --data and the "
        "caption file as --labels"
    )


def _coco_image_root(file: Path, listed: list[str], check_images: bool) -> Path:
    """Where a COCO captions JSON's images are: ``../<split>``, ``<split>`` beside it, or beside it
    (the first that holds any listed image; without ``check_images``, the first that exists)."""
    split = file.stem.removeprefix("captions_")
    candidates = [file.parent.parent / split, file.parent / split, file.parent]
    for folder in candidates:
        if folder.is_dir() and any((folder / name).is_file() for name in listed[:50]):
            return folder
    for folder in candidates:
        if folder.is_dir() and any((folder / name).is_file() for name in listed):
            return folder
    if not check_images:
        return next((c for c in candidates if c.is_dir()), candidates[0])
    raise BadInput(
        f"no images of {file} found in {', '.join(str(c) for c in candidates[:2])} or beside it; "
        "give the image folder as --data and the caption file as --labels"
    )


def _rows_of(file: Path) -> tuple[list[tuple[str, str]], list[str], int]:
    """(rows, listed images, captions of unknown images) of any caption file, by suffix."""
    suffix = file.suffix.lower()
    if suffix not in _CAPTION_SUFFIXES:
        raise BadInput(
            f"caption file {file}: expected a COCO captions .json, an image,caption .csv or a .jsonl"
        )
    text = _read_text(file)
    if suffix == ".json":
        return _parse_coco(text, str(file))
    rows = parse_csv(text, str(file)) if suffix == ".csv" else parse_jsonl(text, str(file))
    return rows, list(dict.fromkeys(image for image, _ in rows)), 0


# ---------------------------------------------------------------------------------------------
# Checks and assembly.


def _image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used ("missing" / "unreadable"), from its header alone; None if fine."""
    if not path.is_file():
        return "missing"
    if path.suffix.lower().lstrip(".") not in FORMATS:
        return "unreadable"
    try:
        with path.open("rb") as f:
            head = f.read(_HEADER_BYTES)
            try:
                header = read_header(head, str(path))
            except BadInput:
                if len(head) < _HEADER_BYTES:
                    raise
                header = read_header(head + f.read(), str(path))  # header past the first bytes
    except (BadInput, OSError):
        return "unreadable"
    return "unreadable" if header.pixels > MAX_IMAGE_PIXELS else None


def _assemble(
    rows: list[tuple[str, str]],
    listed: list[str],
    unknown_ids: int,
    root: Path,
    source: str,
    check_images: bool,
) -> tuple[CaptionSet, CaptionReport]:
    by_image: dict[str, list[str]] = {name: [] for name in listed}
    empty = duplicates = 0
    for image, caption in rows:
        captions = by_image.setdefault(image, [])
        if not caption:
            empty += 1
        elif caption in captions:
            duplicates += 1
        else:
            captions.append(caption)
    without = [name for name, caps in by_image.items() if not caps]
    missing = unreadable = 0
    images: list[Path] = []
    captions_kept: list[tuple[str, ...]] = []
    seen: dict[Path, int] = {}
    for name, caps in by_image.items():
        if not caps:
            continue
        path = root / name
        if check_images:
            problem = _image_problem(path)
            if problem == "missing":
                missing += 1
                continue
            if problem == "unreadable":
                unreadable += 1
                continue
        if path in seen:  # one file written two ways ("a.jpg", "./a.jpg"): one image
            at = seen[path]
            merged = captions_kept[at] + tuple(c for c in caps if c not in captions_kept[at])
            duplicates += len(captions_kept[at]) + len(caps) - len(merged)
            captions_kept[at] = merged
            continue
        seen[path] = len(images)
        images.append(path)
        captions_kept.append(tuple(caps))
    report = CaptionReport(missing + unknown_ids, unreadable, empty, len(without), duplicates, source)
    for line in report.warnings():
        log.warning(line)
    if not images:
        reasons = "; ".join(report.warnings()) or "it lists no captions"
        raise BadInput(f"no usable image-caption pairs in {source} (images looked up in {root}): {reasons}")
    return CaptionSet(tuple(images), tuple(captions_kept), source), report


def _resolve(data: Path, labels: Path | None) -> tuple[Path, Path | None]:
    """(caption file, image root or None for the file's own rule)."""
    if labels is not None:
        if not data.is_dir():
            raise BadInput(f"--data must be the image folder when --labels is given: {data} is not a folder")
        return (_caption_file_in(labels) if labels.is_dir() else labels), data
    if data.is_dir():
        return _caption_file_in(data), None
    if data.is_file():
        return data, None
    raise BadInput(f"caption data not found: {data}")


def load_captions(
    data: Path, labels: Path | None = None, *, check_images: bool = True
) -> tuple[CaptionSet, CaptionReport]:
    """The caption set at ``data`` (with ``labels``: images in ``data``, captions in ``labels``),
    and what was dropped reading it (also logged as warnings).

    With ``check_images`` every image must exist and its header must declare a supported image
    within the pixel limit (no decode); without it, paths are taken as written (parsing only).
    BadInput for a missing, malformed or oversized file, an over-long caption, or a set with no
    usable pair."""
    data, labels = Path(data), Path(labels) if labels is not None else None
    file, root = _resolve(data, labels)
    rows, listed, unknown_ids = _rows_of(file)
    if root is None:
        is_coco = file.suffix.lower() == ".json" and listed
        root = _coco_image_root(file, listed, check_images) if is_coco else file.parent
    return _assemble(rows, listed, unknown_ids, root, str(file), check_images)
