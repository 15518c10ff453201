"""Weights loading refuses foreign pickles, names missing and corrupt files, and loads real ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from modelkiln.errors import ModelNotFound, WeightsError
from modelkiln.zoo import get
from modelkiln.zoo.checkpoint import load_checkpoint, load_state_dict


class _Payload:
    """A pickle that would run a shell command when unpickled the ordinary way."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/kiln-pwned",))


def test_foreign_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload()}, path)
    Path("/tmp/kiln-pwned").unlink(missing_ok=True)
    with pytest.raises(WeightsError, match=r"refused global '(posix|os)\.system'"):
        load_checkpoint(path, "yolov5n")
    assert not Path("/tmp/kiln-pwned").exists()


def test_foreign_pickle_through_zoo_names_the_model_and_file(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(WeightsError) as info:
        get("yolov5n").build(str(path))
    assert "yolov5n" in str(info.value) and str(path) in str(info.value)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="weights file not found"):
        get("efficientnet_lite0").build(str(tmp_path / "nope.pth"))


def test_corrupt_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"\x00not a checkpoint" * 50)
    with pytest.raises(WeightsError, match="yolov5s"):
        get("yolov5s").build(str(path))
    with pytest.raises(WeightsError, match="state_dict"):
        load_state_dict(path, "resnet50")


def test_state_dict_of_other_architecture_is_rejected_with_names(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsError, match="do not fit the architecture"):
        get("resnet50").build(str(path))


def test_yolov5_state_dict_round_trip(tmp_path: Path) -> None:
    """A plain state_dict saved from our network loads back into the same outputs."""
    entry = get("yolov5n", image_size=64)
    model = entry.build("random")["model"]
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    again = get("yolov5n", image_size=64).build(str(path))["model"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_unknown_model_lists_zoo() -> None:
    with pytest.raises(ModelNotFound, match="resnet50.*yolov5n"):
        get("resnet5O")
