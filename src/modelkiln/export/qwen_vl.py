"""Qwen2-VL / Qwen2.5-VL export: the token embedding, the decoder step (``export.builder.qwen2``)
and the vision encoder (``export.builder.vision``: one graph for any image size) built from the
weights, tensor by tensor into external data (FP32, FP16 or W8), the processor files and
``genai.json`` beside.

Tracing a decoder needed ~7x its FP32 weights in RAM; the builder needs about one weight matrix
at a time beside what is already written, so a 2B model exports on a 24 GB machine. Tracing also
fixed the vision encoder's patch grid (so images were squeezed into a few buckets); the built
encoder takes the grid's tables as inputs. ``MODELKILN_QWEN_TRACE=1`` traces the decoder and
embedding, as before, for comparison (the vision encoder is built either way).

Every part is checked against transformers before it is moved into place. A model in memory (the
tiny and mid random ones) is the reference as it is; a checkpoint on disk is checked through a
truncated decoder (its first ``REFERENCE_LAYERS`` layers built by the same code, against the same
layers loaded into transformers), so the check never needs the whole model in RAM twice.

``export`` is the package's entry point for every family: Qwen-VL ones come here, the others go
on to ``exporter.export``.
"""

from __future__ import annotations

import copy
import gc
import importlib
import logging
import os
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import onnx

from modelkiln import zoo
from modelkiln._deps import require
from modelkiln.errors import ConfigError, ExportError, ParityFailed
from modelkiln.export import exporter
from modelkiln.export.builder.attention import SHARED, check_layout, shared_feed
from modelkiln.export.builder.layers import Precision, w8a8_signed
from modelkiln.export.builder.nbits import PER_CHANNEL
from modelkiln.export.builder.qwen2 import build_decoder, build_embedding
from modelkiln.export.builder.tensors import SafetensorsFolder, StateDict, Tensors
from modelkiln.export.builder.vision import VisionShape, build_vision, vision_feed
from modelkiln.export.exporter import DEFAULT_OPSET, ExportResult, output_paths
from modelkiln.export.parity import PARITY_BATCHES
from modelkiln.numerics import TensorDiff, Tolerance, tensor_diff, worst
from modelkiln.onnx_io import graph_tensors
from modelkiln.quantmath import NBITS_MIN_BLOCK, is_nbits_block
from modelkiln.runtime import cpu
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend
from modelkiln.zoo.base import Part, ZooModel
from modelkiln.zoo.qwen_vl import (
    DECODER_EXAMPLES,
    VISION_GRIDS,
    Checkpoint,
    QwenVLFamily,
    decoder_example,
    decoder_part,
    decoder_step_module,
    vision_reference,
)

log = logging.getLogger(__name__)

#: Set to 1 to trace the decoder and embedding (the pre-builder export) instead of building them.
TRACE_ENV = "MODELKILN_QWEN_TRACE"
#: Layers of the truncated decoder that checks a checkpoint read from disk.
REFERENCE_LAYERS = 2
#: What a part must meet against transformers FP32, per weight precision.
TOLERANCES = {
    Precision.FP32: Tolerance(),
    Precision.FP16: Tolerance(atol=None, min_cosine=0.9999),
    Precision.W8: Tolerance(atol=None, min_cosine=0.999),
    Precision.W8A8: Tolerance(atol=None, min_cosine=0.999),
}
_QWEN2, _QWEN25 = (
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
)
#: The vision encoder class of each generation (the reference of a checkpoint on disk).
VISION_CLASSES = {
    "qwen2-vl": (_QWEN2, "Qwen2VisionTransformerPretrainedModel"),
    "qwen2.5-vl": (_QWEN25, "Qwen2_5_VisionTransformerPretrainedModel"),
}
#: The text model class of each generation (the truncated reference of a checkpoint on disk).
TEXT_CLASSES = {"qwen2-vl": (_QWEN2, "Qwen2VLTextModel"), "qwen2.5-vl": (_QWEN25, "Qwen2_5_VLTextModel")}


def traced_requested() -> bool:
    return os.environ.get(TRACE_ENV, "").strip().lower() in ("1", "true", "yes")


def export(
    model: str | ZooModel,
    out: str | Path,
    weights: str | None = None,
    opset: int = DEFAULT_OPSET,
    image_size: int | None = None,
    nms: bool = False,
    tolerance: Tolerance | None = None,
    precision: str | Precision | None = None,
    kv_layout: str | None = None,
    block_size: int = 0,
    vision_precision: str | None = None,
) -> ExportResult:
    """``exporter.export``'s signature: Qwen-VL families through the graph builder (unless
    ``MODELKILN_QWEN_TRACE=1``), every other family through ``exporter.export``. ``precision``
    (fp32, fp16, w8, w8a8: how the builder stores the language model's weights), ``block_size``
    (W8's MatMulNBits block along K; 0: the largest power of two dividing K) and ``kv_layout``
    (shared, the default, or concat: ``builder/attention.py``) apply to built models only."""
    entry = model if isinstance(model, ZooModel) else zoo.get(model, image_size)
    if isinstance(entry, QwenVLFamily) and not traced_requested():
        if nms:
            raise ExportError(f"--nms applies to detectors; {entry.name} is a {entry.task} model")
        chosen = Precision.FP32 if precision is None else Precision.parse(precision)
        return export_qwen_vl(
            entry,
            out,
            weights,
            precision=chosen,
            opset=opset,
            tolerance=tolerance,
            block_size=block_size,
            kv_layout=kv_layout or SHARED,
            vision_precision=vision_precision or Precision.FP32,
        )
    if kv_layout is not None:
        why = (
            f"traced ({TRACE_ENV} is set): its cache layout is concat"
            if isinstance(entry, QwenVLFamily)
            else f"a {entry.task} model with no KV cache"
        )
        raise ExportError(
            f"--kv-layout applies to Qwen-VL decoders built from their weights; {entry.name} is {why}"
        )
    for flag, given in (("--block-size", block_size), ("--vision-precision", vision_precision)):
        if given:
            raise ExportError(
                f"{flag} applies to Qwen-VL models built from their weights ({TRACE_ENV} unset); "
                f"{entry.name} is not one"
            )
    if isinstance(entry, QwenVLFamily) and precision is None:
        return _traced_qwen_vl(entry, out, weights, opset, tolerance)
    if precision is not None:
        raise ExportError(
            f"--precision applies to models built from their weights (qwen2-vl, qwen2.5-vl); "
            f"{entry.name} is exported by tracing in FP32: quantize it with kiln quantize"
        )
    return exporter.export(entry, out, weights, opset, image_size, nms, tolerance)


def _traced_qwen_vl(
    entry: QwenVLFamily, out: str | Path, weights: str | None, opset: int, tolerance: Tolerance | None
) -> ExportResult:
    """``MODELKILN_QWEN_TRACE=1``: the embedding and decoder traced (the pre-builder export), the
    vision encoder built as always (a traced one would fix the patch grid)."""
    entry.with_vision = False
    try:
        result = exporter.export(entry, out, weights, opset, None, False, tolerance)
    finally:
        entry.with_vision = True
    ckpt = Checkpoint(entry.config, None, model=entry._model)
    tensors = StateDict(entry._model.state_dict(), entry.name)
    paths = output_paths(entry, Path(out))
    result.files = paths
    result.parity += _built_vision(entry, ckpt, tensors, paths, weights, Precision.FP32, 0, Tolerance())
    return result


def export_qwen_vl(
    entry: QwenVLFamily,
    out: str | Path,
    weights: str | None = None,
    precision: str | Precision = Precision.FP32,
    opset: int = DEFAULT_OPSET,
    tolerance: Tolerance | None = None,
    block_size: int = 0,
    vision: bool = True,
    kv_layout: str = SHARED,
    vision_precision: str | Precision = Precision.FP32,
) -> ExportResult:
    """Write ``entry``'s folder (embed.onnx and decoder.onnx in ``precision``, vision.onnx in
    ``vision_precision``, processor files, genai.json) to ``out``; ParityFailed (nothing of that
    part written) when a part misses ``tolerance`` (default: per precision, ``TOLERANCES``; the
    vision encoder always its precision's bound). ``vision=False`` skips the
    vision graph (benchmarks of the builder alone: genai.json still names it, so such a folder does
    not open in ChatModel). ``kv_layout``: the decoder's cache interface (``shared``: batched
    decode without copies on ONNX Runtime; ``concat``: any runtime)."""
    precision = Precision.parse(precision)
    vision_precision = Precision.parse(vision_precision)
    check_layout(kv_layout)
    check_block_size(block_size, precision)
    out = Path(out)
    started = time.perf_counter()
    ckpt = entry.checkpoint(weights if weights is not None else entry.default_weights)
    try:
        paths = output_paths(entry, out)
        result = ExportResult(entry.name, paths)
        tensors: Tensors = (
            StateDict(ckpt.model.state_dict(), entry.name)
            if ckpt.model is not None
            else SafetensorsFolder(_folder(ckpt))
        )
        tol = tolerance or TOLERANCES[precision]
        out.mkdir(parents=True, exist_ok=True)
        result.parity += _built_part(
            entry, ckpt, tensors, "embed", paths, weights, precision, block_size, tol, kv_layout
        )
        result.parity += _built_part(
            entry, ckpt, tensors, "decoder", paths, weights, precision, block_size, tol, kv_layout
        )
        if vision:
            # FP32 unless asked: the reference encoder (deploy adds a weight-only vision.int8.onnx);
            # W8A8 is the fast one for large images on CPUs without VNNI (docs/genai.md)
            result.parity += _built_vision(
                entry, ckpt, tensors, paths, weights, vision_precision, 0, TOLERANCES[vision_precision]
            )
        entry.write_assets(out)
    finally:
        ckpt.cleanup()
    log.info("%s exported to %s in %.0f s", entry.name, out, time.perf_counter() - started)
    return result


def _folder(ckpt: Checkpoint) -> Path:
    if ckpt.folder is None:
        raise ExportError("a checkpoint without a model in memory needs a weights folder")
    return ckpt.folder


def check_block_size(block_size: int, precision: Precision) -> None:
    """ConfigError unless ``block_size`` is 0 (the default block), ``nbits.PER_CHANNEL`` or one
    MatMulNBits takes, for a precision that stores MatMulNBits blocks (W8; W8A8's down_proj)."""
    if not block_size:
        return
    if precision not in (Precision.W8, Precision.W8A8):
        raise ConfigError(
            f"--block-size sets W8's MatMulNBits block; precision {precision.value} has none "
            "(use --precision w8 or w8a8)"
        )
    if block_size != PER_CHANNEL and not is_nbits_block(block_size):
        raise ConfigError(f"--block-size must be a power of two >= {NBITS_MIN_BLOCK}, got {block_size}")


def _metadata(entry: QwenVLFamily, part: str, weights: str | None, precision: Precision) -> dict[str, str]:
    """The part's provenance; a W8A8 decoder or encoder built with int8 weights (on a CPU with
    VNNI/AMX) also names the int32 dot product it needs, so loading it on an AVX2-only CPU warns
    (cpu.py)."""
    meta = {
        **zoo.export_metadata(entry, part, weights),
        "modelkiln.export.method": "builder",
        "modelkiln.precision": precision.value,
    }
    if part in ("decoder", "vision") and precision is Precision.W8A8 and w8a8_signed():
        meta[cpu.INT8_FORMAT_KEY] = "w8a8 (int8 weights)"
        meta[cpu.INT8_REQUIRES_KEY] = cpu.INT32_DOT
        meta[cpu.INT8_REMEDY_KEY] = (
            "Export it again with MODELKILN_W8A8_WEIGHTS=u8 (uint8 weights: exact on every CPU)"
        )
    return meta


def _built_part(
    entry: QwenVLFamily,
    ckpt: Checkpoint,
    tensors: Tensors,
    name: str,
    paths: dict[str, Path],
    weights: str | None,
    precision: Precision,
    block_size: int,
    tol: Tolerance,
    kv_layout: str = SHARED,
) -> list[TensorDiff]:
    """Build one part into a scratch folder beside its destination, check it, move it in."""
    text, target = entry.config.text_config, paths[name]
    meta = _metadata(entry, name, weights, precision)
    tie = bool(entry.config.tie_word_embeddings)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        if name == "embed":
            built = build_embedding(text, tensors, scratch, target.name, precision, meta)
            checks = _check_embedding(entry, tensors, built)
        else:
            built = build_decoder(
                text,
                tensors,
                scratch,
                target.name,
                precision,
                meta,
                block_size=block_size,
                tie_word_embeddings=tie,
                kv_layout=kv_layout,
            )
            log.info("built %s in %.0f s", built.name, time.perf_counter() - started)
            checks = _check_decoder(
                entry, ckpt, tensors, built, scratch, precision, block_size, tol, kv_layout
            )
        _raise_unless_passed(entry.name, name, checks)
        _move_graph(built, target)
    log.info("wrote %s (%s, %s)", target, name, precision.value)
    return checks


def _move_graph(built: Path, target: Path) -> None:
    """The graph and its external data (when it has one) into place, data first."""
    data = built.with_name(f"{built.name}.data")
    stale = target.with_name(f"{target.name}.data")
    if data.is_file():
        os.replace(data, stale)
    elif stale.is_file():
        stale.unlink()
    os.replace(built, target)


def _raise_unless_passed(model: str, part: str, checks: list[TensorDiff]) -> None:
    if checks and not all(c.passed for c in checks):
        bad = worst(checks)
        raise ParityFailed(
            f"{model}/{part}: ONNX output {bad.name!r} differs from transformers at batch {bad.batch}: "
            f"max abs {bad.max_abs:.3g} > {bad.limit or 0.0:.3g} or cosine {bad.cosine:.6f} too low; "
            "no file written"
        )


def _check_embedding(entry: QwenVLFamily, tensors: Tensors, built: Path) -> list[TensorDiff]:
    """The graph's rows against the checkpoint's table (the embedding is a lookup: exact, or the
    float16 rounding of the table)."""
    backend = cpu_backend(built, optimization=GraphOptimization.DISABLE)
    checks = []
    for batch in PARITY_BATCHES:
        feed = entry.example_inputs("embed", batch=batch, seed=batch)
        got = backend.infer(feed)["inputs_embeds"]
        ref = tensors.rows("model.embed_tokens.weight", feed["input_ids"])
        checks.append(
            tensor_diff("inputs_embeds", got, ref, Tolerance(atol=1e-3, rtol=0.0), part="embed", batch=batch)
        )
    return checks


def _check_decoder(
    entry: QwenVLFamily,
    ckpt: Checkpoint,
    tensors: Tensors,
    built: Path,
    scratch: Path,
    precision: Precision,
    block_size: int,
    tol: Tolerance,
    kv_layout: str = SHARED,
) -> list[TensorDiff]:
    """The decoder against transformers: the whole step when the model is in memory; otherwise a
    truncated decoder built by the same code from the same tensors against those layers loaded
    into transformers. A shared-layout graph gets the same feed in its own form (each past in a
    buffer of exactly past + new positions, so its presents compare as they are)."""
    torch = require("torch", "checking the Qwen-VL decoder")
    text = entry.config.text_config
    if ckpt.model is not None:
        graph, module, layers = built, decoder_step_module(ckpt.model), int(text.num_hidden_layers)
    else:
        layers = min(REFERENCE_LAYERS, int(text.num_hidden_layers))
        tie = bool(entry.config.tie_word_embeddings)
        graph = build_decoder(
            text,
            tensors,
            scratch,
            "reference.onnx",
            precision,
            layers=layers,
            block_size=block_size,
            tie_word_embeddings=tie,
            kv_layout=kv_layout,
        )
        module = decoder_step_module(reference_text_model(entry, tensors, layers))
        log.info("checking %s through its first %d layers", entry.name, layers)
    part = decoder_part(module.lm.config)
    backend = cpu_backend(graph, optimization=GraphOptimization.DISABLE)
    checks = []
    for batch in PARITY_BATCHES:
        seq, past = DECODER_EXAMPLES[batch % len(DECODER_EXAMPLES)]
        feed = decoder_example(part, batch, seq, past, batch)
        with torch.no_grad():
            refs = module(*(torch.from_numpy(feed[s.name]) for s in part.inputs))
        got = backend.infer(shared_feed(feed) if kv_layout == SHARED else feed)
        for spec, ref in zip(part.outputs, refs, strict=True):
            checks.append(
                tensor_diff(spec.name, got[spec.name], ref.numpy(), tol, part="decoder", batch=batch)
            )
    del backend
    if graph != built:
        for f in (graph, graph.with_name(f"{graph.name}.data")):
            f.unlink(missing_ok=True)
    return checks


def reference_text_model(entry: QwenVLFamily, tensors: Tensors, layers: int) -> Any:
    """transformers' text model with the first ``layers`` layers of the checkpoint, its final norm
    and LM head, shaped as ``decoder_step_module`` expects. The decoder step takes embeddings, so
    the reference has a one-row token table instead of the checkpoint's (never read), and the head
    wraps the checkpoint's matrix without a copy."""
    require("torch", "the reference text model")
    import torch

    config = copy.deepcopy(entry.config.text_config)
    config.num_hidden_layers, config.vocab_size, config.pad_token_id = layers, 1, None
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:layers]
    with torch.no_grad():
        text = _class(TEXT_CLASSES[entry.family])(config).eval()
        for name, param in text.state_dict().items():
            if not name.startswith("embed_tokens."):
                param.copy_(torch.from_numpy(tensors.get(f"model.{name}")))
        head_name = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
        if isinstance(tensors, SafetensorsFolder):
            head = _chunked_head(tensors.stored(head_name))  # bf16 kept: 0.47 GB, not 0.93, at 2B
        else:
            matrix = torch.from_numpy(tensors.get(head_name))
            head = torch.nn.Linear(matrix.shape[1], matrix.shape[0], bias=False, device="meta")
            head.weight = torch.nn.Parameter(matrix, requires_grad=False)
    return types.SimpleNamespace(model=types.SimpleNamespace(language_model=text), lm_head=head.eval())


def _chunked_head(weight: Any) -> Any:
    """The LM head as a module over ``weight`` [vocab, hidden] in its stored dtype, widened to
    float32 a block of rows at a time: float32 logits exactly as a float32 Linear computes them
    (widening bfloat16 is exact), without a float32 copy of the whole matrix (the reference check
    is what set the export's peak RSS)."""
    import torch

    class ChunkedHead(torch.nn.Module):
        rows = 16384

        def __init__(self) -> None:
            super().__init__()
            self.weight = weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = [
                torch.matmul(x, self.weight[i : i + self.rows].float().T)
                for i in range(0, self.weight.shape[0], self.rows)
            ]
            return torch.cat(parts, dim=-1)

    return ChunkedHead()


def _class(where: tuple[str, str]) -> Any:
    require("transformers", "the Qwen-VL reference modules")
    return getattr(importlib.import_module(where[0]), where[1])


def vision_from_tensors(entry: QwenVLFamily, tensors: Tensors) -> Any:
    """transformers' vision encoder alone (``visual.*`` weights), the reference of a checkpoint on
    disk: the language model's weights are never loaded into torch."""
    require("torch", "the Qwen-VL vision encoder")
    import torch

    vision_class = _class(VISION_CLASSES[entry.family])
    started = time.perf_counter()
    with torch.no_grad():
        visual = vision_class._from_config(entry.config.vision_config).eval()
        for name, param in visual.state_dict().items():
            param.copy_(torch.from_numpy(tensors.get(f"visual.{name}")))
    log.info("vision encoder loaded from %s in %.0f s", tensors.source, time.perf_counter() - started)
    return visual


def _built_vision(
    entry: QwenVLFamily,
    ckpt: Checkpoint,
    tensors: Tensors,
    paths: dict[str, Path],
    weights: str | None,
    precision: Precision,
    block_size: int,
    tol: Tolerance,
) -> list[TensorDiff]:
    """Build the vision encoder into a scratch folder beside its destination, check it against
    transformers on several patch grids (square, wide, tall, odd: ``VISION_GRIDS``), move it in.
    torch and ONNX Runtime never hold the weights together: torch's outputs are kept, the torch
    encoder let go, then the graph is run."""
    target = paths["vision"]
    shape = VisionShape.of(entry.config.vision_config, entry.family)
    meta = _metadata(entry, "vision", weights, precision)
    with tempfile.TemporaryDirectory(prefix=".vision-", dir=target.parent) as tmp:
        started = time.perf_counter()
        built = build_vision(
            entry.config.vision_config,
            entry.family,
            tensors,
            Path(tmp),
            target.name,
            precision,
            meta,
            block_size=block_size,
        )
        log.info("built %s in %.0f s", built.name, time.perf_counter() - started)
        feeds = []
        visual = ckpt.model.model.visual if ckpt.model is not None else vision_from_tensors(entry, tensors)
        for batch, grid in enumerate(VISION_GRIDS):
            pixels = entry.example_inputs("vision", seed=batch)["pixel_values"]
            feeds.append(
                (batch, vision_feed(pixels, grid, shape.to_dict()), vision_reference(visual, pixels, grid))
            )
        del visual
        gc.collect()
        backend = cpu_backend(built, optimization=GraphOptimization.DISABLE)
        checks = [
            tensor_diff(
                "image_embeds", backend.infer(feed)["image_embeds"], ref, tol, part="vision", batch=batch
            )
            for batch, feed, ref in feeds
        ]
        del backend
        _raise_unless_passed(entry.name, "vision", checks)
        _move_graph(built, target)
    log.info("wrote %s (vision, %s)", target, precision.value)
    return checks


def _gather_external_data(proto: onnx.ModelProto, source: Path, target: Path) -> None:
    """Point every external initializer of ``proto`` (the tracer writes one file per tensor) into
    one ``<target>.data`` in ``source``, copying the bytes across a buffer at a time."""
    external = [t for t in graph_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    data_name = f"{target.name}.data"
    offset = 0
    with (source / data_name).open("wb") as data:
        for tensor in external:
            info = {e.key: e.value for e in tensor.external_data}
            start, length = int(info.get("offset", 0)), info.get("length")
            pad = -offset % 4096
            data.write(b"\0" * pad)
            offset += pad
            with (source / info["location"]).open("rb") as f:
                f.seek(start)
                copied = _copy(f, data, None if length is None else int(length))
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", copied)):
                tensor.external_data.add(key=key, value=str(value))
            offset += copied
    stray = {e.value for t in graph_tensors(proto.graph) for e in t.external_data if e.key == "location"} - {
        data_name
    }
    if stray:
        raise ExportError(f"{target.name}: weights left outside {data_name}: {sorted(stray)[:3]}")


def _copy(src: Any, dst: Any, length: int | None, buffer: int = 64 << 20) -> int:
    copied = 0
    while length is None or copied < length:
        chunk = src.read(buffer if length is None else min(buffer, length - copied))
        if not chunk:
            break
        dst.write(chunk)
        copied += len(chunk)
    return copied


def export_decoder_step(model: Any, path: str | Path, opset: int = 17) -> Part:
    """Trace the decoder step of a transformers Qwen2-VL model (any size in memory) to ``path``;
    returns its I/O. The benchmarks' traced baseline; ``export_qwen_vl`` builds it instead."""
    torch = require("torch", "exporting the Qwen2-VL decoder step")
    part = decoder_part(model.model.language_model.config)
    example = decoder_example(part, batch=1, seq=5, past=3, seed=0)
    with torch.no_grad():
        torch.onnx.export(
            decoder_step_module(model),
            tuple(torch.from_numpy(example[s.name]) for s in part.inputs),
            str(path),
            input_names=[s.name for s in part.inputs],
            output_names=[s.name for s in part.outputs],
            dynamic_axes=part.dynamic_axes(),
            opset_version=opset,
            dynamo=False,
        )
    return part
