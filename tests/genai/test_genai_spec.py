"""genai.json: one dataclass reads and writes it; a broken file is refused naming the key and the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from modelkiln.errors import ConfigError, ModelNotFound
from modelkiln.genai.spec import SPEC_FILE, GenaiSpec

#: genai.json as ``kiln export qwen2-vl-tiny`` writes it.
WRITTEN = {
    "model": "qwen2-vl-tiny",
    "context": 2048,
    "merge": 2,
    "buckets": [[112, 112], [84, 140], [140, 84]],
    "image_token": 590,
    "stop": [588, 589],
    "embed": "embed.onnx",
    "decoder": "decoder.onnx",
    "vision": {
        "112x112": "vision_112x112.onnx",
        "84x140": "vision_84x140.onnx",
        "140x84": "vision_140x84.onnx",
    },
}


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    (tmp_path / SPEC_FILE).write_text(json.dumps(WRITTEN))
    spec = GenaiSpec.load(tmp_path)
    assert spec.buckets == ((112, 112), (84, 140), (140, 84)) and spec.stop == (588, 589)
    assert spec.vision[(84, 140)] == "vision_84x140.onnx" and spec.context == 2048
    assert spec.graphs() == ["embed.onnx", "decoder.onnx", *WRITTEN["vision"].values()]
    out = tmp_path / "again"
    out.mkdir()
    assert spec.save(out) == out / SPEC_FILE
    assert json.loads((out / SPEC_FILE).read_text()) == WRITTEN
    assert GenaiSpec.load(out / SPEC_FILE) == spec


@pytest.mark.parametrize("key", sorted(WRITTEN))
def test_a_missing_key_is_named_with_the_file(tmp_path: Path, key: str) -> None:
    broken = {k: v for k, v in WRITTEN.items() if k != key}
    (tmp_path / SPEC_FILE).write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / SPEC_FILE}: missing key '{key}'")):
        GenaiSpec.load(tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("context", "2048", "'context' must be an integer, got '2048'"),
        ("stop", 588, "'stop' must be a list"),
        ("buckets", [[112]], "'buckets': a bucket is \\[height, width\\]"),
        ("vision", {"112by112": "v.onnx"}, "'vision': keys are HEIGHTxWIDTH, got '112by112'"),
        ("decoder", "", "'decoder' must be a non-empty string"),
        ("vision", {"112x112": "v.onnx"}, "'vision' has no graph for the bucket\\(s\\) \\[\\(84, 140\\)"),
    ],
)
def test_an_invalid_value_is_named_with_the_file(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    (tmp_path / SPEC_FILE).write_text(json.dumps({**WRITTEN, key: value}))
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / SPEC_FILE)) + ": " + message):
        GenaiSpec.load(tmp_path)


def test_a_folder_without_the_file_or_with_bad_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="genai.json not found"):
        GenaiSpec.load(tmp_path)
    (tmp_path / SPEC_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / SPEC_FILE}: not valid JSON")):
        GenaiSpec.load(tmp_path)
