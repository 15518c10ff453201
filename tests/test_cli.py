"""The kiln command as a user runs it: exit codes, one-line errors, readable output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch


def kiln(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelkiln", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        input=stdin,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_help_lists_commands() -> None:
    res = kiln("--help")
    assert res.returncode == 0
    assert "export" in res.stdout and "predict" in res.stdout


def test_unknown_model_is_one_clear_line(tmp_path: Path) -> None:
    res = kiln("export", "resnet5O", "-o", str(tmp_path / "x.onnx"))
    assert res.returncode == 1
    assert "unknown model 'resnet5O'" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_weights_file(tmp_path: Path) -> None:
    res = kiln("export", "yolov5n", "--weights", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "y.onnx"))
    assert res.returncode == 1
    assert "weights file not found" in res.stderr and "missing.pt" in res.stderr
    assert not (tmp_path / "y.onnx").exists()


def test_foreign_pickle(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"model": subprocess.CompletedProcess(["x"], 0)}, path)
    res = kiln("export", "yolov5n", "--weights", str(path), "-o", str(tmp_path / "y.onnx"))
    assert res.returncode == 1
    assert "refused global 'subprocess.CompletedProcess'" in res.stderr
    assert "Traceback" not in res.stderr


def test_verbose_shows_traceback(tmp_path: Path) -> None:
    res = kiln("--verbose", "export", "nosuchmodel", "-o", str(tmp_path / "x.onnx"))
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_export_then_predict_classifier(tmp_path: Path) -> None:
    out = tmp_path / "lite.onnx"
    res = kiln("export", "efficientnet_lite0", "--weights", "random", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert out.is_file() and "cosine" in res.stdout
    image = tmp_path / "img.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    res = kiln("predict", str(out), str(image))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("%") == 5  # top-5 with probabilities


def test_predict_unreadable_image(tmp_path: Path) -> None:
    out = tmp_path / "y.onnx"
    assert (
        kiln("export", "yolov5n", "--weights", "random", "--image-size", "64", "-o", str(out)).returncode == 0
    )
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    res = kiln("predict", str(out), str(bad))
    assert res.returncode == 1 and "cannot decode image" in res.stderr


def test_predict_draws_detections(tmp_path: Path) -> None:
    out = tmp_path / "y.onnx"
    assert (
        kiln("export", "yolov5n", "--weights", "random", "--image-size", "64", "-o", str(out)).returncode == 0
    )
    import cv2
    import numpy as np

    image = tmp_path / "street.jpg"
    cv2.imwrite(str(image), np.full((120, 90, 3), 200, np.uint8))
    res = kiln("predict", str(out), str(image))
    assert res.returncode == 0, res.stderr
    drawn = tmp_path / "street.pred.png"
    assert drawn.is_file() and cv2.imread(str(drawn)).shape == (120, 90, 3)


def test_predict_without_images_uses_builtin_sample(tmp_path: Path) -> None:
    out = tmp_path / "lite.onnx"
    assert (
        kiln(
            "export", "efficientnet_lite0", "--weights", "random", "--image-size", "64", "-o", str(out)
        ).returncode
        == 0
    )
    res = kiln("predict", str(out))
    assert res.returncode == 0, res.stderr
    assert "built-in sample grace_hopper.jpg" in res.stderr
    assert "grace_hopper.jpg" in res.stdout and res.stdout.count("%") == 5


def test_quantize_weight_only_needs_no_calibration(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "wo.onnx"
    res = kiln("quantize", str(tiny), "-o", str(out), "--weight-only")
    assert res.returncode == 0, res.stderr
    assert out.is_file() and "weight-only" in res.stdout


def test_quantize_budget_needs_eval_data(tiny: Path, tmp_path: Path) -> None:
    res = kiln(
        "quantize", str(tiny), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path), "--max-drop", "0.01"
    )
    assert res.returncode == 1
    assert "--max-drop needs --eval DIR" in res.stderr and "Traceback" not in res.stderr


def test_feeds_from_text(tmp_path: Path) -> None:
    text = tmp_path / "s.txt"
    text.write_text("first sentence\n\nsecond one here\n")
    res = kiln("feeds", "all-minilm-l6-v2", str(text), "-o", str(tmp_path / "feeds"))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "feeds").iterdir()) == ["00000.npz", "00001.npz"]


def test_chat_tiny_with_an_image_end_to_end(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    image = tmp_path / "x.jpg"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((80, 100, 3)) * 255).astype(np.uint8))
    res = kiln(
        "chat", "qwen2-vl-tiny", "Describe the picture.", "--image", str(image), "--max-new-tokens", "8"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()  # random weights: some text, streamed
    talk = kiln("chat", "qwen2-vl-tiny", "--max-new-tokens", "4", stdin="Hello there.\nAnd the harbour?\n\n")
    assert talk.returncode == 0, talk.stderr
    stats = re.findall(r"after a (\d+)-token prompt", talk.stderr)
    assert len(stats) == 2 and int(stats[1]) > int(stats[0]) + 4  # the second turn carries the first
    bad = kiln("chat", "qwen2-vl-tiny", "  ")
    assert bad.returncode == 1 and "prompt is empty" in bad.stderr and "Traceback" not in bad.stderr
