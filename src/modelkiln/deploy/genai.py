"""``kiln deploy`` for chat models (qwen2-vl, qwen2.5-vl, their -tiny): export the folder (every
graph parity-checked), weight-only INT8 of the decoder and the vision graphs (MatMulNBits, per
channel), quality of INT8 vs FP32 (decoder fed the same tokens; vision embeddings), time to first
token and decode rate of both, a kiln serve repository (served at /v1/chat/completions) and a
report."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from modelkiln.deploy.run import DeployOptions, DeploySummary, Stages
from modelkiln.onnx_io import model_bytes
from modelkiln.zoo import ZooModel

#: Prompts the INT8 decoder is compared and timed on (text-only chats).
PROMPTS = (
    "Describe a harbour town at dawn in a few sentences.",
    "What should I pack for a week by the sea?",
    "Explain how a lighthouse works.",
)
NEW_TOKENS = 32
ROUNDS = 3


def deploy_genai(opts: DeployOptions, entry: ZooModel, status: Any = None) -> DeploySummary:
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    summary = DeploySummary(opts.model, entry.name, entry.task, command=opts.command)
    stage = Stages(summary, out, status)
    folder = out / "model"
    if "fp16" in opts.precisions:
        summary.notes.append("fp16 is not offered for chat models here (CPU): fp32 and weight-only int8 only")
    with stage("export"):
        from modelkiln.export import export

        if folder.exists():
            shutil.rmtree(folder)
        result = export(entry, folder, weights=opts.weights)
        summary.files["exported"] = str(folder)
        summary.precisions["fp32"] = {"parity_max_abs": max(p.max_abs for p in result.parity)}
    decoders = {"fp32": "decoder.onnx"}
    if "int8" in opts.precisions:
        with stage("int8"):
            from modelkiln.quant.config import QuantConfig, WeightKernel
            from modelkiln.quant.quantize import quantize

            config = QuantConfig(weight_only=True, weight_kernel=WeightKernel.MATMUL_NBITS)
            quantize(folder / "decoder.onnx", folder / "decoder.int8.onnx", None, config=config)
            for graph in _vision_graphs(folder):
                quantize(graph, graph.with_suffix(".int8.onnx"), None, config=config)
            decoders["int8"] = "decoder.int8.onnx"
            summary.files["int8"] = str(folder / "decoder.int8.onnx")
            summary.int8 = {"kernel": "MatMulNBits (8-bit, per output channel, accuracy level 4)"}
    with stage("compare"):
        engines, prompts = _engines(folder, decoders)
        if "int8" in engines:
            from modelkiln.genai.measure import teacher_forced

            summary.precisions.setdefault("int8", {})["quality"] = teacher_forced(
                engines["fp32"], engines["int8"], prompts, NEW_TOKENS
            )
            summary.precisions["int8"]["vision_cosine_min"] = _vision_cosine(folder)
    with stage("bench"):
        from modelkiln.genai.measure import speed

        for name, figures in speed(engines, *prompts[0], NEW_TOKENS, ROUNDS).items():
            summary.precisions.setdefault(name, {})["bench"] = figures
            summary.precisions[name]["size_mb"] = round(model_bytes(folder / decoders[name]) / 1e6, 1)
    with stage("repository"):
        summary.files["repository"] = str(_repository(out, folder, entry, decoders))
    with stage("report"):
        summary.files["report"] = str(_report(out, summary))
    return summary


def _engines(folder: Path, decoders: dict[str, str]) -> tuple[dict[str, Any], list[tuple]]:
    """The FP32 engine (inside a ChatModel, for the prompt processing), the INT8 one beside it on
    the same embedding, and the built-in prompts as (embeds, positions, delta)."""
    from modelkiln.genai.chat import ChatModel
    from modelkiln.genai.engine import Engine

    threads = os.cpu_count() or 1
    chat = ChatModel(folder, threads=threads)
    engines = {"fp32": chat.engine}
    if "int8" in decoders:
        engines["int8"] = Engine(folder / decoders["int8"], chat.embed, threads=threads)
    prompts = []
    for text in PROMPTS:
        p = chat.prompt([{"role": "user", "content": text}])
        prompts.append((p.embeds, p.positions, p.delta))
    return engines, prompts


def _vision_graphs(folder: Path) -> list[Path]:
    spec = json.loads((folder / "genai.json").read_text(encoding="utf-8"))
    return [folder / f for f in spec["vision"].values()]


def _vision_cosine(folder: Path, seed: int = 0) -> float:
    """Worst cosine of INT8 to FP32 image embeddings over the buckets (random pixel input)."""
    import numpy as np

    from modelkiln.runtime.session import ort_session

    rng = np.random.default_rng(seed)
    worst = 1.0
    for graph in _vision_graphs(folder):
        fp32, int8 = ort_session(graph), ort_session(graph.with_suffix(".int8.onnx"))
        shape = [int(d) for d in fp32.get_inputs()[0].shape]
        x = {"pixel_values": rng.standard_normal(shape).astype(np.float32)}
        a, b = fp32.run(None, x)[0].ravel(), int8.run(None, x)[0].ravel()
        worst = min(worst, float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    return round(worst, 6)


def _repository(out: Path, folder: Path, entry: ZooModel, decoders: dict[str, str]) -> Path:
    """``OUT/repository/<name>``: the folder as version 1, serving the INT8 decoder and vision
    graphs when there are some."""
    from modelkiln.serve.config import GenAIConfig, ModelConfig, dump_config

    name = entry.name.replace("-", "_").replace(".", "_")
    target = out / "repository" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target / "1")
    config = ModelConfig(
        name,
        backend="genai",
        threads_per_instance=os.cpu_count() or 1,
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
    for name, p in summary.precisions.items():
        bench, quality = p.get("bench", {}), p.get("quality")
        q = (
            f"{quality['logit_cosine_mean']:.5f} / {quality['logit_cosine_min']:.5f} | {quality['top1_agreement']:.1%}"
            if quality
            else "reference | reference"
        )
        if "vision_cosine_min" in p:
            q += f" (vision embeddings cosine >= {p['vision_cosine_min']:.5f})"
        lines.append(
            f"| {name} | {p.get('size_mb', '')} | {bench.get('ttft_ms_median', '')} | "
            f"{bench.get('decode_tok_s_median', '')} | {q} |"
        )
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
