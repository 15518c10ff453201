"""``kiln deploy`` for chat models (qwen2-vl, qwen2.5-vl, their -tiny): export the folder (every
graph parity-checked), weight-only INT8 of the decoder and the vision encoder (MatMulNBits, per
channel; one vision graph for any image size, or one per bucket in older folders), quality of
INT8 vs FP32 (decoder fed the same tokens; vision embeddings on several patch grids), time to
first token and decode rate of both, a kiln serve repository (served at /v1/chat/completions) and
a report."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from modelkiln.deploy.options import DeployOptions
from modelkiln.deploy.stages import Stages, Status
from modelkiln.deploy.summary import ChatQuality, ChatSpeed, DeploySummary
from modelkiln.export import export
from modelkiln.export.builder.vision import vision_feed
from modelkiln.genai.chat import ChatModel
from modelkiln.genai.engine import Engine
from modelkiln.genai.measure import speed, teacher_forced
from modelkiln.genai.spec import GenaiSpec
from modelkiln.onnx_io import model_bytes
from modelkiln.quant.config import QuantConfig, WeightKernel
from modelkiln.quant.quantize import quantize
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.serve.config import GenAIConfig, ModelConfig, ModelKind, dump_config
from modelkiln.zoo import ZooModel

#: Prompts the INT8 decoder is compared and timed on (text-only chats).
PROMPTS = (
    "Describe a harbour town at dawn in a few sentences.",
    "What should I pack for a week by the sea?",
    "Explain how a lighthouse works.",
)
NEW_TOKENS = 32
ROUNDS = 3
#: A prompt as the decoder takes it: embeddings [seq, hidden], M-RoPE positions [3, seq], delta.
PromptInput = tuple[np.ndarray, np.ndarray, int]


def deploy_genai(opts: DeployOptions, entry: ZooModel, status: Status | None = None) -> DeploySummary:
    """Export, weight-only INT8, quality and speed of both, a serve repository and a report."""
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    summary = DeploySummary(opts.model, entry.name, entry.task, command=opts.command)
    stage = Stages(summary, out, status)
    folder = out / "model"
    if "fp16" in opts.precisions:
        summary.notes.append("fp16 is not offered for chat models here (CPU): fp32 and weight-only int8 only")
    with stage("export"):
        if folder.exists():
            shutil.rmtree(folder)
        result = export(entry, folder, weights=opts.weights)
        summary.files["exported"] = str(folder)
        summary.chat_figures("fp32").parity_max_abs = max(p.max_abs for p in result.parity)
    decoders = {"fp32": "decoder.onnx"}
    if "int8" in opts.precisions:
        with stage("int8"):
            decoders["int8"] = _weight_only_int8(folder)
            summary.files["int8"] = str(folder / decoders["int8"])
            summary.int8 = {"kernel": "MatMulNBits (8-bit, per output channel, accuracy level 4)"}
    with stage("compare"):
        engines, prompts = _engines(folder, decoders)
        if "int8" in engines:
            int8 = summary.chat_figures("int8")
            int8.quality = ChatQuality.from_dict(
                teacher_forced(engines["fp32"], engines["int8"], prompts, NEW_TOKENS)
            )
            int8.vision_cosine_min = _vision_cosine(folder)
    with stage("bench"):
        for name, figures in speed(engines, *prompts[0], NEW_TOKENS, ROUNDS).items():
            found = summary.chat_figures(name)
            found.bench = ChatSpeed.from_dict(figures)
            found.size_mb = round(model_bytes(folder / decoders[name]) / 1e6, 1)
    with stage("repository"):
        summary.files["repository"] = str(_repository(out, folder, entry, decoders))
    with stage("report"):
        summary.files["report"] = str(_report(out, summary))
    return summary


def _threads() -> int:
    """Chat models are measured and served on every core of the machine."""
    return os.cpu_count() or 1


def _weight_only_int8(folder: Path) -> str:
    """Weight-only INT8 (MatMulNBits, per channel) of the decoder and of the vision graph(s), beside
    them as ``*.int8.onnx``; returns the INT8 decoder's file name. Deploy's only quantization of
    chat models."""
    config = QuantConfig(weight_only=True, weight_kernel=WeightKernel.MATMUL_NBITS)
    decoder = folder / GenaiSpec.load(folder).decoder
    for graph in (decoder, *_vision_graphs(folder)):
        quantize(graph, _int8_file(graph), None, config=config)
    return _int8_file(decoder).name


def _int8_file(graph: Path) -> Path:
    return graph.with_suffix(".int8.onnx")


def _engines(folder: Path, decoders: dict[str, str]) -> tuple[dict[str, Engine], list[PromptInput]]:
    """The FP32 engine (inside a ChatModel, for the prompt processing), the INT8 one beside it on
    the same embedding, and the built-in prompts as (embeds, positions, delta)."""
    chat = ChatModel(folder, threads=_threads())
    engines = {"fp32": chat.engine}
    if "int8" in decoders:
        engines["int8"] = Engine(folder / decoders["int8"], chat.embed, threads=_threads())
    prompts = []
    for text in PROMPTS:
        p = chat.prompt([{"role": "user", "content": text}])
        prompts.append((p.embeds, p.positions, p.delta))
    return engines, prompts


def _vision_graphs(folder: Path) -> list[Path]:
    return [folder / f for f in GenaiSpec.load(folder).vision_graphs()]


#: Patch grids the INT8 vision encoder is compared on: square, wide, tall.
COSINE_GRIDS = ((1, 8, 8), (1, 4, 12), (1, 12, 4))


def _vision_cosine(folder: Path, seed: int = 0) -> float:
    """Worst cosine of INT8 to FP32 image embeddings (random pixel input): over ``COSINE_GRIDS``
    for the one encoder of any size, over the buckets in older folders."""
    spec = GenaiSpec.load(folder)
    rng = np.random.default_rng(seed)
    worst = 1.0
    for graph in _vision_graphs(folder):
        fp32, int8 = cpu_backend(graph), cpu_backend(_int8_file(graph))
        first = fp32.input_metadata[0]
        if spec.encoder is not None:
            width = int(str(first.shape[1]))
            feeds = [
                vision_feed(
                    rng.standard_normal((int(np.prod(g)), width)).astype(np.float32),
                    g,
                    spec.vision_config or {},
                )
                for g in COSINE_GRIDS
            ]
        else:
            shape = [int(d) if isinstance(d, int) else 1 for d in first.shape]
            feeds = [{first.name: rng.standard_normal(shape).astype(np.float32)}]
        for x in feeds:
            a = next(iter(fp32.infer(x).values())).ravel()
            b = next(iter(int8.infer(x).values())).ravel()
            worst = min(worst, float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    return round(worst, 6)


def _repository(out: Path, folder: Path, entry: ZooModel, decoders: dict[str, str]) -> Path:
    """``OUT/repository/<name>``: the folder as version 1, serving the INT8 decoder and vision
    graphs when there are some."""
    name = entry.name.replace("-", "_").replace(".", "_")
    target = out / "repository" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target / "1")
    config = ModelConfig(
        name,
        backend=ModelKind.GENERATION,
        threads_per_instance=_threads(),
        genai=GenAIConfig(decoder=decoders.get("int8"), vision_int8="int8" in decoders),
    )
    (target / "config.yaml").write_text(dump_config(config))
    return target


def _report(out: Path, summary: DeploySummary) -> Path:
    lines = [
        f"# kiln deploy {summary.model}",
        "",
        f"Command: `{summary.command}`" if summary.command else "",
        "",
        "| precision | decoder MB | first token ms (median) | decode tokens/s (median) | logit cosine vs fp32 (mean / min) | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in summary.chat_precisions().items():
        quality = p.quality
        q = (
            f"{quality.logit_cosine_mean:.5f} / {quality.logit_cosine_min:.5f} | {quality.top1_agreement:.1%}"
            if quality
            else "reference | reference"
        )
        if p.vision_cosine_min is not None:
            q += f" (vision embeddings cosine >= {p.vision_cosine_min:.5f})"
        ttft = p.bench.ttft_ms_median if p.bench else ""
        rate = p.bench.decode_tok_s_median if p.bench else ""
        size = p.size_mb if p.size_mb is not None else ""
        lines.append(f"| {name} | {size} | {ttft} | {rate} | {q} |")
    lines += [
        "",
        (
            f"Quality: both decoders fed the same tokens (fp32's greedy continuation, {NEW_TOKENS} steps) "
            f"of {len(PROMPTS)} built-in prompts. Speed: the first prompt, {NEW_TOKENS} new tokens, "
            f"{ROUNDS} interleaved rounds, all cores."
        ),
        "",
        f"Measured on: {summary.cpu.get('description', 'unknown')}.",
        "",
        f"Serve it: `kiln serve {out / 'repository'}` then POST /v1/chat/completions.",
        *[f"- {n}" for n in summary.notes],
        "",
        "Stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary.stages.items()),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path  # summary.json: Stages writes it after every stage
