"""kiln finetune's loop on a tiny open_clip architecture (random weights, drawn images): it
trains and exports, repeats exactly with a seed, resumes exactly, writes no pickle, keeps
locked towers unchanged, and refuses bad data and bad resumes with clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("safetensors")

from modelkiln.data.captions import CaptionSet, load_captions
from modelkiln.errors import BadInput
from modelkiln.finetune import FinetuneOptions, finetune
from modelkiln.finetune import state as ckpt
from modelkiln.finetune.features import FeatureStore
from modelkiln.finetune.loop import Trainer, TrainingData
from modelkiln.finetune.options import OPEN_CLIP
from modelkiln.zoo import get

FAST = replace(OPEN_CLIP, epochs=2, batch_size=4, lr=1e-3, views=2, val_fraction=0.25)


def tensors(path: Path) -> dict[str, np.ndarray]:
    loaded, _ = ckpt.load_tensors(path)
    return {k: v.numpy() for k, v in loaded.items()}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_tiny_open_clip_trains_and_exports(tiny_clip: str, captions_csv: Path, tmp_path: Path) -> None:
    from modelkiln.export import export
    from modelkiln.predict import load_parts

    result = finetune(tiny_clip, captions_csv, tmp_path / "run", options=FAST)
    assert "holding out 2 of 8 images" in result.split and "refitting on all 8" in result.split
    history = json.loads(result.history.read_text())
    phases = [(e["phase"], e["epoch"]) for e in history["epochs"]]
    assert phases == [("train", 1), ("train", 2), ("refit", 1), ("refit", 2)]
    assert all(np.isfinite(e["loss"]) for e in history["epochs"])
    assert set(history["val_recall"]) >= {"text_to_image_r@1", "image_to_text_r@5", "mean_r@5"}
    assert result.plot is not None and result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final checkpoint is the whole open_clip state dict: export reads it as --weights
    out = tmp_path / "onnx"
    report = export(tiny_clip, out, weights=str(result.final))
    assert report.passed and sorted(report.files) == ["image", "text"]
    entry, backends = load_parts(out)
    trained = get(tiny_clip).trainable(str(result.final))
    feed = entry.text_feed(["a red circle", "a blue square"])  # type: ignore[attr-defined]
    with torch.no_grad():
        ref = trained.encode_text({"input_ids": torch.from_numpy(feed["input_ids"])}).numpy()
    got = backends["text"].infer(feed)["text_embeds"]
    assert np.abs(got - ref).max() < 1e-4
    assert abs(entry.logit_scale - float(trained.log_scale.detach().exp())) < 1e-3 * entry.logit_scale


def test_same_seed_same_weights(tiny_clip: str, captions_csv: Path, tmp_path: Path) -> None:
    one = finetune(tiny_clip, captions_csv, tmp_path / "a", options=replace(FAST, refit=False))
    two = finetune(tiny_clip, captions_csv, tmp_path / "b", options=replace(FAST, refit=False))
    other = finetune(tiny_clip, captions_csv, tmp_path / "c", options=replace(FAST, refit=False, seed=1))
    assert same(tensors(one.final), tensors(two.final))
    assert not same(tensors(one.final), tensors(other.final))


def test_resume_continues_exactly(tiny_clip: str, captions_csv: Path, tmp_path: Path) -> None:
    straight = finetune(tiny_clip, captions_csv, tmp_path / "straight", options=replace(FAST, epochs=3))
    finetune(tiny_clip, captions_csv, tmp_path / "split", options=replace(FAST, epochs=1))
    resumed = finetune(
        tiny_clip, captions_csv, tmp_path / "split", options=replace(FAST, epochs=3), resume=True
    )
    assert same(tensors(straight.final), tensors(resumed.final))
    assert [(r.phase, r.epoch) for r in resumed.records] == [
        (p, e) for p in ("train", "refit") for e in (1, 2, 3)
    ]
    a, b = (json.loads(r.history.read_text())["epochs"] for r in (straight, resumed))
    assert [e["loss"] for e in a] == [e["loss"] for e in b]
    with pytest.raises(BadInput, match="other settings.*lr"):
        finetune(
            tiny_clip, captions_csv, tmp_path / "split", options=replace(FAST, epochs=4, lr=0.1), resume=True
        )
    with pytest.raises(BadInput, match="already holds a fine-tuning run"):
        finetune(tiny_clip, captions_csv, tmp_path / "split", options=FAST)
    with pytest.raises(BadInput, match="nothing to resume"):
        finetune(tiny_clip, captions_csv, tmp_path / "empty", options=FAST, resume=True)


def test_checkpoints_hold_no_pickle(tiny_clip: str, captions_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    finetune(tiny_clip, captions_csv, out, options=replace(FAST, refit=False))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".safetensors", ".json", ".png"}
    for path in files:
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80", f"{path} looks like a pickle"
        if path.suffix == ".safetensors":
            tensors(path)  # opens with safetensors alone
    # the optimizer's state goes back into Adam as it was
    folder = out / "checkpoint" / "train"
    state = json.loads((folder / "state.json").read_text())
    assert state["epoch"] == 2 and state["options"]["lr"] == FAST.lr
    saved, meta = ckpt.load_tensors(folder / "optimizer.safetensors")
    model = get(tiny_clip).trainable("random")
    n_trained = len(json.loads(meta["param_groups"])[0]["params"])
    adam = torch.optim.Adam(list(model.parameters())[:n_trained], lr=1.0)
    ckpt.load_optimizer(adam, saved, meta)
    assert adam.param_groups[0]["lr"] == FAST.lr
    restored, _ = ckpt.optimizer_tensors(adam)
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)


def _train_in_memory(name: str, captions: CaptionSet, options: FinetuneOptions) -> tuple[dict, dict]:
    entry = get(name)
    trainer = Trainer(
        entry, None, options, "train", 0, TrainingData.of(captions), None, FeatureStore(entry, 2, 0)
    )
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}  # type: ignore[attr-defined]
    trainer.run(None)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}  # type: ignore[attr-defined]
    return before, after


def test_locked_tower_stays_unchanged(tiny_clip: str, captions_csv: Path) -> None:
    captions, _ = load_captions(captions_csv)
    before, after = _train_in_memory(tiny_clip, captions, replace(FAST, lock_image=True))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and not any(n.startswith("clip.visual.") for n in changed)
    assert any(n.startswith("clip.transformer.") for n in changed) and "clip.logit_scale" in changed


def test_partial_unfreezing_trains_only_the_last_groups(tiny_clip: str, captions_csv: Path) -> None:
    captions, _ = load_captions(captions_csv)
    options = replace(FAST, lock_image=True, lock_text=True, unlock_text_last=1)
    before, after = _train_in_memory(tiny_clip, captions, options)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # the text tower's last group is what follows its blocks: ln_final and text_projection
    assert changed - {"clip.logit_scale"} <= {
        "clip.ln_final.weight",
        "clip.ln_final.bias",
        "clip.text_projection",
    }
    assert "clip.text_projection" in changed


def test_same_picture_listed_twice_is_one_identity(tiny_clip: str, captions_csv: Path) -> None:
    captions, _ = load_captions(captions_csv)
    doubled = CaptionSet(
        (*captions.images, captions.images[0]), (*captions.captions, ("the same picture again",)), "test"
    )
    data = TrainingData.of(doubled)
    assert data.identity[-1] == data.identity[0] and len(set(data.identity)) == len(captions)
    _train_in_memory(tiny_clip, doubled, replace(FAST, batch_size=9, epochs=1))  # one batch with it twice


def test_bad_data_and_models_are_clear_errors(tiny_clip: str, captions_csv: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("picture,text\na.png,hello\n")
    with pytest.raises(BadInput, match="image,caption"):
        finetune(tiny_clip, bad, tmp_path / "o1", options=FAST)
    one = tmp_path / "one.csv"
    image = captions_csv.parent / "red_circle.png"
    one.write_text(f"image,caption\n{image},a red circle\n{image},round and red\n")
    with pytest.raises(BadInput, match="at least 2 training images"):
        finetune(tiny_clip, one, tmp_path / "o2", val=captions_csv, options=FAST)
    with pytest.raises(BadInput, match="not a dual encoder"):
        finetune("efficientnet_lite0", captions_csv, tmp_path / "o3")
    with pytest.raises(BadInput, match="nothing to train"):
        finetune(
            tiny_clip, captions_csv, tmp_path / "o4", options=replace(FAST, lock_image=True, lock_text=True)
        )
    with pytest.raises(BadInput, match="--batch-size"):
        finetune(tiny_clip, captions_csv, tmp_path / "o5", options=replace(FAST, batch_size=1))


def test_cli_runs_and_reports(tiny_clip: str, captions_csv: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from modelkiln.cli.main import app

    out = tmp_path / "cli"
    args = ["finetune", tiny_clip, "--data", str(captions_csv), "-o", str(out), "--epochs", "1"]
    run = CliRunner().invoke(
        app, [*args, "--batch-size", "4", "--views", "2", "--json", str(tmp_path / "s.json")]
    )
    assert run.exit_code == 0, run.output
    assert "holding out 2 of 8 images" in run.output and "final.safetensors" in run.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert Path(summary["final"]).is_file() and summary["val"]["mean_r@5"] >= 0
