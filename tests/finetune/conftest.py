"""Fixtures of the fine-tuning tests: a small caption set of drawn images (CSV, any number of
captions per image) and a tiny open_clip architecture (random weights: fast, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

COLOURS = {"red": (0, 0, 255), "green": (0, 200, 0), "blue": (255, 0, 0), "yellow": (0, 220, 220)}
SHAPES = ("circle", "square")
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def draw(colour: tuple[int, int, int], shape: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((48, 64, 3), 235, np.uint8) + rng.integers(0, 15, (48, 64, 3)).astype(np.uint8)
    if shape == "circle":
        cv2.circle(image, (32, 24), 14, colour, -1)
    else:
        cv2.rectangle(image, (18, 10), (46, 38), colour, -1)
    return image


@pytest.fixture(scope="session")
def captions_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images (4 colours x 2 shapes), 2 or 3 captions each, as an image,caption CSV."""
    folder = tmp_path_factory.mktemp("captions")
    rows = ["image,caption"]
    for i, (name, colour) in enumerate(COLOURS.items()):
        for j, shape in enumerate(SHAPES):
            file = f"{name}_{shape}.png"
            cv2.imwrite(str(folder / file), draw(colour, shape, 10 * i + j))
            texts = [f"a {name} {shape}", f"one {shape} painted {name}", f"a picture of a {name} {shape}"]
            rows += [f"{file},{t}" for t in texts[: 2 + (i + j) % 2]]
    path = folder / "captions.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-layer open_clip architecture registered as ``KilnTiny``: zoo name ``clip-kilntiny``."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / "KilnTiny.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return "clip-kilntiny"
