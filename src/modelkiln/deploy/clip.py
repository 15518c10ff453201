"""``kiln deploy`` for dual encoders (CLIP and ``clip-lite0-minilm``): both towers exported,
optimised and quantized, INT8 judged by image-text retrieval (recall@k on a captions set) as the
task metric with ``--max-drop`` on ``mean_r@5``, both towers timed, and a kiln serve repository
whose ``clip_zero_shot`` pipeline runs the chosen towers.

The towers are quantized one by one, and the pair deployed as "int8" is the fastest combination
within the budget: both towers INT8, else the image tower alone (it runs on every request; the
zero-shot pipeline embeds its labels once), else the text tower alone.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelkiln.accuracy.compare import compare_models
from modelkiln.accuracy.evaluate import evaluate
from modelkiln.bench.runner import BenchCase, LoopSpec, benchmark_interleaved
from modelkiln.data.captions import load_captions
from modelkiln.data.feeds import Feed, model_feeds
from modelkiln.deploy.measure import BENCH_BATCHES, batch_figures
from modelkiln.deploy.options import DeployOptions
from modelkiln.deploy.report import write_reports
from modelkiln.deploy.samples import builtin_calibration
from modelkiln.deploy.stages import Stages, Status
from modelkiln.deploy.summary import Agreement, BatchFigures, DeploySummary, OutputAgreement
from modelkiln.errors import BadInput, QuantizationError
from modelkiln.export import export
from modelkiln.graph import optimize
from modelkiln.onnx_io import model_bytes
from modelkiln.quant.config import CalibrationData, Int8Cpu, QuantConfig, Target
from modelkiln.quant.quantizer import Quantizer
from modelkiln.runtime.backends.onnxruntime import OrtBackend
from modelkiln.serve.config import DynamicBatching, ModelConfig, PipelineConfig, dump_config
from modelkiln.zoo.clip import DualEncoder
from modelkiln.zoo.coco import COCO80_NAMES

log = logging.getLogger(__name__)

TOWERS = ("image", "text")
#: The budget's metric: mean of text->image and image->text recall@5.
METRIC = "mean_r@5"
#: Text-tower calibration without captions: prompts over the COCO class names.
TEMPLATES = ("a photo of a {}.", "a {} in the street.", "a close-up picture of a {}.")
#: The most captions the text tower is calibrated on.
TEXT_CALIB_LIMIT = 256


@dataclass(frozen=True)
class Towers:
    """One precision of the pair: a folder with ``image.onnx`` and ``text.onnx``."""

    folder: Path

    def __getitem__(self, tower: str) -> Path:
        return self.folder / f"{tower}.onnx"


def deploy_clip(opts: DeployOptions, entry: DualEncoder, status: Status | None = None) -> DeploySummary:
    """Export, optimise, INT8 both towers within a recall budget, compare, evaluate retrieval,
    bench, write the repository and the report."""
    out = opts.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    summary = DeploySummary(opts.model, entry.name, str(entry.task), command=opts.command)
    stage = Stages(summary, out, status)
    if "fp16" in opts.precisions:
        summary.notes.append("fp16 is not built for dual encoders here (CPU): fp32 and int8 only")
    pairs: dict[str, Towers] = {}
    with stage("export"):
        exported = _export(opts, entry, work / "exported")
        summary.files["exported"] = str(exported.folder)
    with stage("optimize"):
        pairs["fp32"] = Towers(work / "fp32")
        pairs["fp32"].folder.mkdir(exist_ok=True)
        for tower in TOWERS:
            result = optimize(exported[tower], pairs["fp32"][tower])
            summary.optimize[tower] = {"before": vars(result.before), "after": vars(result.after)}
        summary.files["fp32"] = str(pairs["fp32"].folder)
    with stage("calibration data"):
        images, texts = _calibration(opts, entry, work)
    if "int8" in opts.precisions:
        with stage("int8"):
            pairs["int8"] = Towers(work / "int8")
            summary.int8 = _int8(opts, entry, pairs["fp32"], pairs["int8"], images, texts, work)
            summary.files["int8"] = str(pairs["int8"].folder)
    feeds = {
        "image": _image_feeds(pairs["fp32"]["image"], images, entry),
        "text": _text_feeds(texts, entry),
    }
    with stage("compare"):
        for name, pair in pairs.items():
            summary.figures(name).agreement = _agreement(pairs["fp32"], pair, feeds)
    if opts.eval_data is not None:
        with stage("evaluate"):
            for name, pair in pairs.items():
                summary.figures(name).task = _retrieval(pair, opts)
    with stage("bench"):
        for name, figures in _bench(pairs, feeds, opts.bench_seconds).items():
            found = summary.figures(name)
            found.bench = figures["image"]
            found.size_mb = sum(model_bytes(pair) for pair in (pairs[name][t] for t in TOWERS)) / 1e6
            summary.int8.setdefault("text_tower_bench", {})[name] = {
                f"batch{b}": f.to_dict() for b, f in figures["text"].items()
            }
    summary.notes.append(
        "bench: the image tower (what the zero-shot pipeline runs per request); the text tower's "
        "timings are under int8.text_tower_bench; size: both towers"
    )
    with stage("repository"):
        summary.files.update(_repository(out, pairs, entry))
    with stage("report"):
        summary.files.update(write_reports(summary, out))
    return summary


def _export(opts: DeployOptions, entry: DualEncoder, folder: Path) -> Towers:
    """Both towers from the zoo (with --weights), or copied from a folder of exported towers."""
    src = Path(opts.model)
    if src.is_dir():
        missing = [t for t in TOWERS if not (src / f"{t}.onnx").is_file()]
        if missing:
            raise BadInput(f"{src}: a dual-encoder folder needs image.onnx and text.onnx; missing {missing}")
        shutil.copytree(src, folder, dirs_exist_ok=True)
    else:
        export(entry, folder, weights=opts.weights)
    return Towers(folder)


def _calibration(opts: DeployOptions, entry: DualEncoder, work: Path) -> tuple[list[Path], list[str]]:
    """Images for the image tower and sentences for the text tower: a captions set given as
    --calib gives both; an image folder gives images (sentences then come from templates over the
    COCO class names); nothing gives the built-in sample crops and the templates."""
    if opts.calib is None:
        folder = builtin_calibration(work / "calib", entry)
        return sorted(folder.iterdir()), _template_texts()
    try:
        captions, _ = load_captions(opts.calib)  # it logs what it dropped
    except BadInput:
        return [p for p in sorted(opts.calib.iterdir()) if p.is_file()], _template_texts()
    texts, _ = captions.texts()
    return list(captions.images)[: opts.calib_size], texts[:TEXT_CALIB_LIMIT]


def _template_texts() -> list[str]:
    return [t.format(name) for name in COCO80_NAMES for t in TEMPLATES][:TEXT_CALIB_LIMIT]


def _image_feeds(model: Path, images: list[Path], entry: DualEncoder) -> list[Feed]:
    return list(model_feeds(model, images, entry, batch_size=8, limit=32))


def _text_feeds(texts: list[str], entry: DualEncoder, batch: int = 8) -> list[Feed]:
    return [entry.text_feed(texts[i : i + batch]) for i in range(0, len(texts), batch)]


def _int8(
    opts: DeployOptions,
    entry: DualEncoder,
    fp32: Towers,
    int8: Towers,
    images: list[Path],
    texts: list[str],
    work: Path,
) -> dict[str, object]:
    """Both towers quantized (text calibration written as .npz feeds); with a budget, the fastest
    pair within it is what ``int8`` holds."""
    config = QuantConfig(target=Target(opts.target), cpu=Int8Cpu(opts.cpu))
    text_calib = work / "calib_text"
    text_calib.mkdir(exist_ok=True)
    for i, feed in enumerate(_text_feeds(texts, entry)):
        np.savez(text_calib / f"texts_{i:03d}.npz", **feed)  # type: ignore[arg-type]
    image_calib = work / "calib_images"
    image_calib.mkdir(exist_ok=True)
    for p in images[: opts.calib_size]:
        shutil.copyfile(p, image_calib / p.name)
    quantized = Towers(work / "int8_towers")
    quantized.folder.mkdir(exist_ok=True)
    report: dict[str, object] = {}
    for tower, data in (
        ("image", CalibrationData(image_calib, entry.name, opts.calib_size)),
        ("text", CalibrationData(text_calib, None, opts.calib_size)),
    ):
        report[tower] = Quantizer(fp32[tower], config, data).save(quantized[tower]).to_dict()
    chosen = (
        _within_budget(opts, fp32, quantized, work)
        if opts.max_drop is not None
        else dict.fromkeys(TOWERS, "int8")
    )
    int8.folder.mkdir(exist_ok=True)
    for tower in TOWERS:
        shutil.copyfile((quantized if chosen[tower] == "int8" else fp32)[tower], int8[tower])
    report["towers"] = chosen
    return report


def _within_budget(opts: DeployOptions, fp32: Towers, quantized: Towers, work: Path) -> dict[str, str]:
    """The first pair in speed order whose ``mean_r@5`` drop is within ``--max-drop``."""
    assert opts.max_drop is not None
    reference = _retrieval(fp32, opts)[METRIC]
    tried = []
    for image, text in (("int8", "int8"), ("int8", "fp32"), ("fp32", "int8")):
        pair = Towers(work / f"candidate_{image}_{text}")
        pair.folder.mkdir(exist_ok=True)
        for tower, precision in (("image", image), ("text", text)):
            shutil.copyfile((quantized if precision == "int8" else fp32)[tower], pair[tower])
        drop = reference - _retrieval(pair, opts)[METRIC]
        tried.append(f"image {image} + text {text}: drop {drop:.4f}")
        log.info("dual encoder INT8 candidate %s", tried[-1])
        if drop <= opts.max_drop:
            return {"image": image, "text": text}
    raise QuantizationError(
        f"no INT8 tower pair keeps {METRIC} within --max-drop {opts.max_drop} of fp32 "
        f"({reference:.4f}): " + "; ".join(tried)
    )


def _retrieval(pair: Towers, opts: DeployOptions) -> dict[str, float]:
    if opts.eval_data is None:
        raise BadInput("retrieval needs --eval (images) and --labels (their captions)")
    result = evaluate(pair.folder, None, opts.eval_data, opts.labels, limit=opts.eval_limit, task="retrieval")
    return dict(result.metrics)


def _agreement(fp32: Towers, pair: Towers, feeds: dict[str, list[Feed]]) -> Agreement:
    """Cosine/SNR of each tower's embeddings vs FP32 on the calibration images and sentences."""
    outputs: list[OutputAgreement] = []
    samples = 0
    for tower in TOWERS:
        result = compare_models(fp32[tower], pair[tower], feeds[tower])
        samples += result.samples
        outputs += [OutputAgreement(o.name, o.cosine, o.snr_db, o.max_abs) for o in result.outputs]
    return Agreement(samples, tuple(outputs))


def _bench(
    pairs: dict[str, Towers], feeds: dict[str, list[Feed]], seconds: float, rounds: int = 3
) -> dict[str, dict[str, dict[int, BatchFigures]]]:
    """Both towers of every precision at batch 1 and 8, timed in turns."""
    cases = {}
    for name, pair in pairs.items():
        for tower in TOWERS:
            backend = OrtBackend.load(pair[tower])
            for batch in BENCH_BATCHES:
                feed = {k: np.resize(v, (batch, *v.shape[1:])) for k, v in feeds[tower][0].items()}
                cases[(name, tower, batch)] = BenchCase(backend, feed, batch)
    loop = LoopSpec(warmup=2, iterations=None, duration=seconds / rounds)
    found: dict[str, dict[str, dict[int, BatchFigures]]] = {n: {t: {} for t in TOWERS} for n in pairs}
    for (name, tower, batch), r in benchmark_interleaved(cases, loop, rounds).items():
        found[name][tower][batch] = batch_figures(r)
    return found


def _repository(out: Path, pairs: dict[str, Towers], entry: DualEncoder) -> dict[str, str]:
    """Each tower of each precision as a served model, and ``<name>_zero_shot``: the clip_zero_shot
    pipeline over the deployed (int8 where built) towers, labelled with the COCO class names
    (edit ``options.labels`` in its config.yaml)."""
    base = entry.name.replace("-", "_")
    repo = out / "repository"
    files: dict[str, str] = {}
    for precision, pair in pairs.items():
        for tower in TOWERS:
            name = f"{base}_{tower}_{precision}"
            config = ModelConfig(
                name,
                max_batch_size=8,
                dynamic_batching=DynamicBatching((8,), 2000),
                instance_count=1,
                threads_per_instance=1,
            )
            folder = repo / name
            (folder / "1").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pair[tower], folder / "1" / "model.onnx")
            (folder / "config.yaml").write_text(dump_config(config))
            files[f"repository_{tower}_{precision}"] = str(folder)
    served = "int8" if "int8" in pairs else "fp32"
    name = f"{base}_zero_shot"
    pipeline = ModelConfig(
        name,
        pipeline=PipelineConfig(
            "clip_zero_shot",
            {t: f"{base}_{t}_{served}" for t in TOWERS},
            {"labels": list(COCO80_NAMES), "template": "a photo of a {}."},
        ),
    )
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.yaml").write_text(dump_config(pipeline))
    files["repository_zero_shot"] = str(repo / name)
    return files
