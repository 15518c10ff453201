"""The Qwen-VL graph builder against transformers and against the traced export it replaces:
decoder-step logits and KV cache on the tiny and a mid configuration (M-RoPE with three distinct
position rows, left padding), greedy generation token for token, the same interface as the traced
graph, W8 packed bit for bit as the weight-only INT8 path packs it, FP16, external data, the
export from a weights folder (the path users' Qwen2-VL-2B-Instruct takes, checked through a
truncated decoder) and the random 2B preset's configuration and shard writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from modelkiln.errors import ConfigError, WeightsError
from modelkiln.export.builder import writer
from modelkiln.export.builder.attention import shared_feed
from modelkiln.export.builder.layers import Precision
from modelkiln.export.builder.nbits import pack_chunks
from modelkiln.export.builder.qwen2 import TextShape, build_decoder, build_embedding
from modelkiln.export.builder.tensors import SafetensorsFolder, StateDict
from modelkiln.quantmath import pack_int8_rows as pack_rows
from modelkiln.quantmath import per_channel_block
from modelkiln.zoo.qwen_vl import (
    QWEN2_VL_2B,
    QwenVLFamily,
    bfloat16_bits,
    build_tiny,
    checkpoint_tensors,
    decoder_example,
    decoder_part,
    decoder_step_module,
    preset_config,
    qwen2_vl_2b_random,
    random_tensor,
    tiny_tokenizer,
    write_random_checkpoint,
)

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

#: The issue's bound for FP32 logits against transformers.
LOGIT_TOL = 1e-4
MID = {"hidden": 512, "layers": 8, "heads": 4, "kv_heads": 2}  # head size 128, as Qwen2-VL-2B's


def _cpu(path: Path, opt: str = "DISABLE"):
    from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend

    return cpu_backend(path, optimization=GraphOptimization[opt])


def _feeds(part, seeds=(0, 1, 2, 3)) -> list[dict[str, np.ndarray]]:
    """A chunk on a cache, a decode step at batch 3, a prefill, and a batch of 2 with distinct
    M-RoPE rows (an image's t/h/w grid) and the first row left-padded."""
    feeds = []
    for (batch, seq, past), seed in zip(((1, 5, 3), (3, 1, 6), (1, 9, 0), (2, 6, 4)), seeds, strict=True):
        feed = decoder_example(part, batch, seq, past, seed)
        if seed == 3:
            rng = np.random.default_rng(seed)
            feed["position_ids"] = (
                rng.integers(0, 40, (3, batch, seq)) + np.array([0, 3, 7])[:, None, None]
            ).astype(np.int64)
            feed["attention_mask"][0, :3] = 0
        feeds.append(feed)
    return feeds


def _reference(model, feed: dict, part) -> list[np.ndarray]:
    with torch.no_grad():
        outs = decoder_step_module(model)(*(torch.from_numpy(feed[s.name]) for s in part.inputs))
    return [o.numpy() for o in outs]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


@pytest.fixture(scope="module")
def mid():
    return build_tiny(**MID)


@pytest.fixture(scope="module")
def built_tiny(tiny, tmp_path_factory) -> Path:
    model, _ = tiny
    folder = tmp_path_factory.mktemp("tiny-built")
    build_decoder(model.model.language_model.config, StateDict(model.state_dict()), folder)
    build_embedding(model.model.language_model.config, StateDict(model.state_dict()), folder)
    return folder


@pytest.mark.parametrize("size", ["tiny", "mid"])
def test_decoder_logits_and_cache_match_transformers(size, tiny, mid, tmp_path) -> None:
    model, _ = tiny if size == "tiny" else mid
    text = model.model.language_model.config
    path = build_decoder(text, StateDict(model.state_dict()), tmp_path)
    part = decoder_part(text)
    for opt in ("DISABLE", "ALL"):  # the file as written, and as ONNX Runtime fuses it
        backend = _cpu(path, opt)
        for feed in _feeds(part):
            got = backend.infer(feed)
            ref = _reference(model, feed, part)
            errors = {
                s.name: float(np.abs(got[s.name] - r).max()) for s, r in zip(part.outputs, ref, strict=True)
            }
            print(size, opt, {k: f"{v:.1e}" for k, v in list(errors.items())[:3]})
            assert max(errors.values()) < LOGIT_TOL, errors


def test_interface_is_the_traced_decoders(tiny, built_tiny, tmp_path) -> None:
    """Same input/output names, element types and dims (symbolic names included) as the graph
    the engine ran before: what makes genai/engine.py, chat and serve run it unchanged."""
    from modelkiln.export.qwen_vl import export_decoder_step

    model, _ = tiny
    traced = tmp_path / "traced.onnx"
    export_decoder_step(model, traced)

    def io(path: Path) -> list[tuple]:
        graph = onnx.load(path, load_external_data=False).graph
        return [
            (
                v.name,
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in [*graph.input, *graph.output]
        ]

    built = io(built_tiny / "decoder.onnx")
    assert [x[:2] for x in built] == [x[:2] for x in io(traced)]
    part = decoder_part(model.model.language_model.config)
    assert built == [
        (s.name, 1 if s.dtype == "float32" else 7, list(s.shape)) for s in (*part.inputs, *part.outputs)
    ]


def test_embedding_is_the_table(tiny, built_tiny) -> None:
    model, _ = tiny
    ids = np.random.default_rng(0).integers(0, model.config.text_config.vocab_size, (2, 7))
    got = _cpu(built_tiny / "embed.onnx").infer({"input_ids": ids})["inputs_embeds"]
    assert np.array_equal(got, model.model.language_model.embed_tokens.weight.detach().numpy()[ids])


def test_greedy_generation_is_transformers_token_for_token(mid, tmp_path) -> None:
    """16 greedy tokens of the mid configuration through the generation engine (KV cache bound in
    place, prefill then decode steps) against transformers' generate."""
    from modelkiln.genai.engine import Engine

    model, processor = mid
    text = model.model.language_model.config
    tensors = StateDict(model.state_dict())
    build_decoder(text, tensors, tmp_path)
    embed = _cpu(build_embedding(text, tensors, tmp_path))
    engine = Engine(
        tmp_path / "decoder.onnx", lambda ids: embed.infer({"input_ids": ids[None]})["inputs_embeds"][0]
    )
    messages = [{"role": "user", "content": "Tell me about the harbour at dawn."}]
    ids = processor.tokenizer(processor.apply_chat_template(messages, add_generation_prompt=True)).input_ids
    ours = engine.generate(ids, 16)
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
        )
    assert len(ours) == 16 and ours == ref[0, len(ids) :].tolist()


@pytest.mark.parametrize("k", [8, 64, 96, 1536, 200])
def test_w8_packing_is_the_weight_only_paths_bit_for_bit(k: int) -> None:
    from modelkiln.quant.matmul_nbits import pack_int8_blocks

    rng = np.random.default_rng(k)
    w_nk = (rng.standard_normal((37, k)) * rng.uniform(0.01, 3.0, (37, 1))).astype(np.float32)
    w_nk[5] = 0.0  # an all-zero channel: scale 1, as the quant path writes it
    for block in (per_channel_block(k), 16, 32):
        b, s = pack_rows(w_nk, block)
        qb, qs = pack_int8_blocks(w_nk.T.copy(), block)
        assert np.array_equal(b, qb) and np.array_equal(s.reshape(-1), qs)
        chunks = list(pack_chunks(w_nk, block, chunk=8))
        assert np.array_equal(np.concatenate([c[0] for c in chunks]), qb)


def test_w8_decoder_is_the_quantized_fp32_decoder(tiny, built_tiny, tmp_path) -> None:
    """Built in W8 directly == built in FP32 then quantized by quant/matmul_nbits (every MatMul,
    LM head included): same initializers, same logits to the bit."""
    import onnx_ir as ir

    from modelkiln.quant.matmul_nbits import quantize_matmul_nbits

    model, _ = tiny
    text = model.model.language_model.config
    w8 = build_decoder(text, StateDict(model.state_dict()), tmp_path, "w8.onnx", Precision.W8)
    quantized = ir.load(built_tiny / "decoder.onnx")
    assert quantize_matmul_nbits(quantized) == 4 * text.num_hidden_layers + 1  # qkv, o, gate+up, down; head
    ir.save(quantized, tmp_path / "quantized.onnx")
    a, b = onnx.load(tmp_path / "quantized.onnx"), onnx.load(w8)
    ia = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    na = [n for n in a.graph.node if n.op_type == "MatMulNBits"]
    nb = [n for n in b.graph.node if n.op_type == "MatMulNBits"]
    assert len(na) == len(nb) == 4 * text.num_hidden_layers + 1
    for x, y in zip(na, nb, strict=True):
        assert all(np.array_equal(ia[x.input[i]], ib[y.input[i]]) for i in (1, 2))
        assert {at.name: at.i for at in x.attribute} == {at.name: at.i for at in y.attribute}
    part = decoder_part(text)
    feed = _feeds(part)[3]
    got, want = _cpu(w8).infer(feed), _cpu(tmp_path / "quantized.onnx").infer(feed)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    ref = _reference(model, feed, part)[0].ravel().astype(np.float64)
    logits = got["logits"].ravel().astype(np.float64)
    assert logits @ ref / np.linalg.norm(logits) / np.linalg.norm(ref) > 0.999


def test_fp16_weights_halve_the_file_and_keep_the_logits(mid, tmp_path) -> None:
    model, _ = mid
    text = model.model.language_model.config
    tensors = StateDict(model.state_dict())
    fp32 = build_decoder(text, tensors, tmp_path, "fp32.onnx")
    fp16 = build_decoder(text, tensors, tmp_path, "fp16.onnx", Precision.FP16)
    assert fp16.stat().st_size < 0.55 * fp32.stat().st_size
    part = decoder_part(text)
    feed = _feeds(part)[0]
    got = _cpu(fp16).infer(feed)["logits"].ravel().astype(np.float64)
    ref = _reference(model, feed, part)[0].ravel().astype(np.float64)
    assert got @ ref / np.linalg.norm(got) / np.linalg.norm(ref) > 0.9999


def test_large_weights_go_to_one_aligned_external_file(tiny, built_tiny, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(writer, "INLINE_MAX_BYTES", 0)
    model, _ = tiny
    path = build_decoder(model.model.language_model.config, StateDict(model.state_dict()), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    external = [t for t in onnx.load(path, load_external_data=False).graph.initializer if t.external_data]
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in external]
    assert external and all(o % writer.ALIGN == 0 for o in offsets)
    part = decoder_part(model.model.language_model.config)
    feed = _feeds(part)[0]
    got, want = _cpu(path).infer(feed), _cpu(built_tiny / "decoder.onnx").infer(feed)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_qwen2_5_vl_decoder_builds_the_same_way(tmp_path) -> None:
    model, _ = build_tiny(family="qwen2.5-vl")
    text = model.model.language_model.config
    path = build_decoder(text, StateDict(model.state_dict()), tmp_path)
    part = decoder_part(text)
    feed = _feeds(part)[3]
    got = _cpu(path).infer(feed)["logits"]
    assert np.abs(got - _reference(model, feed, part)[0]).max() < LOGIT_TOL


def test_unsupported_configs_are_refused(tiny) -> None:
    import copy

    text = copy.deepcopy(tiny[0].config.text_config)
    text.layer_types = ["sliding_attention"] * text.num_hidden_layers
    text.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "mrope_section": [1, 1, 1]}
    with pytest.raises(ConfigError, match="sliding-window layers") as err:
        TextShape.of(text)
    assert "rope type 'yarn'" in str(err.value) and "M-RoPE sections [1, 1, 1]" in str(err.value)


def test_missing_weight_names_the_checkpoint(tmp_path) -> None:
    from safetensors.numpy import save_file

    save_file(
        {"model.embed_tokens.weight": np.zeros((4, 2), np.float32)}, str(tmp_path / "model.safetensors")
    )
    tensors = SafetensorsFolder(tmp_path)
    assert "model.language_model.embed_tokens.weight" in tensors  # transformers 5's spelling too
    with pytest.raises(WeightsError, match=rf"{tmp_path}: no weight 'model.norm.weight'"):
        tensors.get("model.norm.weight")


# -- the export: the zoo family through the builder ------------------------------------------------


def test_zoo_export_builds_decoder_and_embedding(tmp_path, monkeypatch) -> None:
    """``export("qwen2-vl-tiny")`` builds every graph, the vision encoder included (metadata says
    which); MODELKILN_QWEN_TRACE=1 traces the embedding and decoder, as before (the concat cache
    layout: the built one in that layout computes the same logits; a traced export refuses
    ``kv_layout``)."""
    from modelkiln.errors import ExportError
    from modelkiln.export.qwen_vl import TRACE_ENV, export

    built = export("qwen2-vl-tiny", tmp_path / "built", kv_layout="concat")
    assert built.passed and max(p.max_abs for p in built.parity) < 1e-5

    def method(path: Path) -> str | None:
        props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        assert props["modelkiln.zoo"] == "qwen2-vl-tiny"
        return props.get("modelkiln.export.method")

    assert (
        method(tmp_path / "built" / "decoder.onnx") == method(tmp_path / "built" / "embed.onnx") == "builder"
    )
    assert method(tmp_path / "built" / "vision.onnx") == "builder"
    monkeypatch.setenv(TRACE_ENV, "1")
    with pytest.raises(ExportError, match="qwen2-vl-tiny is traced"):
        export("qwen2-vl-tiny", tmp_path / "refused", kv_layout="shared")
    traced = export("qwen2-vl-tiny", tmp_path / "traced")
    assert traced.passed and method(tmp_path / "traced" / "decoder.onnx") is None
    assert method(tmp_path / "traced" / "vision.onnx") == "builder"  # a traced one fixed the grid
    part = decoder_part(build_tiny()[0].config.text_config)
    feed = _feeds(part)[3]
    a = _cpu(tmp_path / "built" / "decoder.onnx").infer(feed)["logits"]
    b = _cpu(tmp_path / "traced" / "decoder.onnx").infer(feed)["logits"]
    assert np.abs(a - b).max() < 1e-5


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory) -> Path:
    """A 3-layer tiny Qwen2-VL saved as a weights folder (config, safetensors, processor): the
    layout of a user's Qwen2-VL-2B-Instruct download."""
    model, processor = build_tiny(layers=3)
    folder = tmp_path_factory.mktemp("weights")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_export_from_a_weights_folder_checks_a_truncated_decoder(weights_folder, tmp_path) -> None:
    """``qwen2-vl --weights DIR``: weights streamed from the shards, the decoder checked through its
    first two layers (never the whole model in torch), then the full graph against transformers
    loaded from the same folder, and a chat with it token for token."""
    from transformers import Qwen2VLForConditionalGeneration

    from modelkiln.export.qwen_vl import REFERENCE_LAYERS, export
    from modelkiln.genai.chat import ChatModel

    result = export(QwenVLFamily(tiny=False), tmp_path, weights=str(weights_folder))
    assert result.passed
    assert REFERENCE_LAYERS == 2 and sum(p.name.startswith("present_key") for p in result.parity) == 2 * 2
    model = Qwen2VLForConditionalGeneration.from_pretrained(weights_folder).eval()
    part = decoder_part(model.config.text_config)
    decoder = _cpu(tmp_path / "decoder.onnx")
    assert "seqlens_k" in [i.name for i in decoder.input_metadata]  # the default: the shared layout
    for feed in _feeds(part)[:3]:  # (the fourth is left-padded: a concat-layout batch)
        got = decoder.infer(shared_feed(feed))["logits"]
        assert np.abs(got - _reference(model, feed, part)[0]).max() < LOGIT_TOL
    spec = json.loads((tmp_path / "genai.json").read_text())
    assert spec["model"] == "qwen2-vl" and spec["vision"] == "vision.onnx" and "buckets" not in spec
    chat = ChatModel(tmp_path)
    messages = [{"role": "user", "content": "Describe the harbour."}]
    prompt = chat.prompt(messages)
    gen = chat.engine.start(prompt.embeds, prompt.positions, prompt.delta, 8)
    gen.stop = set()
    gen.run()
    ids = chat.processor(chat.processor.apply_chat_template(messages))["input_ids"].tolist()
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None
        )
    assert gen.tokens == ref[0, len(ids) :].tolist()


def test_w8a8_exports_from_a_weights_folder_and_passes_its_bound(weights_folder, tmp_path) -> None:
    """W8A8 (the decoder and, asked for, the vision encoder) goes through ``export`` with its own
    bound against transformers (every precision has one: a missing one was a KeyError after the
    whole build), down_proj in MatMulNBits (its heavy-tailed input), QKV, o_proj, gate+up and the
    head through the int8 GEMM."""
    from collections import Counter

    from modelkiln.export.qwen_vl import TOLERANCES, export

    assert set(TOLERANCES) == set(Precision)
    result = export(
        QwenVLFamily(tiny=False),
        tmp_path,
        weights=str(weights_folder),
        precision="w8a8",
        vision_precision="w8a8",
    )
    assert result.passed, result

    def kinds(name: str) -> Counter[str]:
        return Counter(n.op_type for n in onnx.load(tmp_path / name, load_external_data=False).graph.node)

    assert (kinds("decoder.onnx")["MatMulInteger"], kinds("decoder.onnx")["MatMulNBits"]) == (3 * 3 + 1, 3)
    # the encoder (quick-GELU MLP, no heavy-tailed product): patch embedding, QKV, proj, fc1, fc2
    # per block, the merger's two
    depth = json.loads((weights_folder / "config.json").read_text())["vision_config"]["depth"]
    assert kinds("vision.onnx")["MatMulInteger"] == 1 + 4 * depth + 2
    assert any(p.part == "vision" for p in result.parity)


def test_export_block_size_reaches_every_matmulnbits_and_bad_ones_are_refused(
    weights_folder, tmp_path
) -> None:
    """``kiln export --block-size 32``: every MatMulNBits of the W8 decoder packed in blocks of 32
    (llama.cpp Q8_0's), the check passed; a block MatMulNBits cannot take, a precision without
    blocks, or a model not built from its weights is refused before any work, naming the value."""
    from modelkiln.export.qwen_vl import export

    result = export(
        QwenVLFamily(tiny=False), tmp_path / "b32", weights=str(weights_folder), precision="w8", block_size=32
    )
    assert result.passed
    nodes = onnx.load(tmp_path / "b32" / "decoder.onnx", load_external_data=False).graph.node
    blocks = {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {32}
    for folder, precision, block, message in (
        ("b24", "w8", 24, "power of two >= 16, got 24"),
        ("f16", "fp16", 32, "precision fp16 has none"),
    ):
        with pytest.raises(ConfigError, match=message):
            export(
                QwenVLFamily(tiny=False),
                tmp_path / folder,
                weights=str(weights_folder),
                precision=precision,
                block_size=block,
            )
    assert not (tmp_path / "b24").exists() and not (tmp_path / "f16").exists()
    from modelkiln.errors import ExportError

    with pytest.raises(ExportError, match="--block-size applies to Qwen-VL"):
        export("resnet50", tmp_path / "r.onnx", weights="random", image_size=32, block_size=32)
    with pytest.raises(ExportError, match="--vision-precision applies to Qwen-VL"):  # was silently ignored
        export("resnet50", tmp_path / "r.onnx", weights="random", image_size=32, vision_precision="w8a8")


def test_a_w8a8_decoder_with_int8_weights_names_the_cpu_it_needs(monkeypatch) -> None:
    """int8 weights (built on a VNNI/AMX CPU) saturate on AVX2: the decoder's metadata says so, and
    an AVX2-only CPU is told how to rebuild it; uint8 weights (the AVX2 build) need nothing."""
    from modelkiln.export.qwen_vl import _metadata
    from modelkiln.runtime.cpu import CpuInfo, unmet_requirement

    avx2 = CpuInfo("x86_64", "AMD EPYC", frozenset({"avx2"}))
    vnni = CpuInfo("x86_64", "Xeon", frozenset({"avx2", "avx512_vnni"}))
    entry = QwenVLFamily(tiny=True)
    monkeypatch.setenv("MODELKILN_W8A8_WEIGHTS", "s8")
    props = _metadata(entry, "decoder", None, Precision.W8A8)
    reason = unmet_requirement(props, avx2)
    assert reason is not None and "MODELKILN_W8A8_WEIGHTS=u8" in reason and "w8a8" in reason
    assert unmet_requirement(props, vnni) is None
    assert unmet_requirement(_metadata(entry, "vision", None, Precision.W8A8), avx2) is not None
    assert unmet_requirement(_metadata(entry, "embed", None, Precision.W8A8), avx2) is None
    monkeypatch.setenv("MODELKILN_W8A8_WEIGHTS", "u8")
    assert unmet_requirement(_metadata(entry, "decoder", None, Precision.W8A8), avx2) is None
    assert unmet_requirement(_metadata(entry, "decoder", None, Precision.W8), avx2) is None


# -- the random 2B preset ---------------------------------------------------------------------------


def test_preset_is_qwen2_vl_2b_instructs_architecture() -> None:
    entry = qwen2_vl_2b_random()
    assert entry.name == "qwen2-vl-2b-random" and entry.with_vision
    config = preset_config(tiny_tokenizer())
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        1536,
        28,
        12,
        2,
    )
    assert (t.intermediate_size, t.vocab_size, t.rope_parameters["rope_theta"]) == (8960, 151936, 1e6)
    assert (v.depth, v.embed_dim, v.num_heads, v.hidden_size) == (32, 1280, 16, 1536)
    assert config.tie_word_embeddings and QWEN2_VL_2B["text_config"]["rms_norm_eps"] == 1e-6
    shapes = checkpoint_tensors(config)
    assert "lm_head.weight" not in shapes and shapes["model.embed_tokens.weight"] == (151936, 1536)
    params = sum(int(np.prod(s)) for s in shapes.values())
    assert 2.20e9 < params < 2.22e9  # Qwen2-VL-2B: 2.21 B parameters
    assert TextShape.of(t).head_dim == 128


def test_random_shards_are_what_transformers_loads(tmp_path) -> None:
    """The streamed shard writer at a small size: transformers loads every tensor it expects (no
    missing, no unexpected), values are the seeded draws rounded to bfloat16 as torch rounds."""
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration

    tok = tiny_tokenizer()
    config = preset_config(tok)
    config.text_config.num_hidden_layers, config.text_config.vocab_size = 1, len(tok)
    config.text_config.layer_types = ["full_attention"]
    config.vision_config.depth, config.vision_config.embed_dim, config.vision_config.num_heads = 1, 64, 2
    files = write_random_checkpoint(config, tmp_path, seed=3)
    config.save_pretrained(tmp_path)
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    stored = {k: v for f in files for k, v in load_file(f).items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    drawn = np.concatenate(list(random_tensor(name, tuple(stored[name].shape), seed=3)))
    assert np.array_equal(
        stored[name].view(torch.int16).numpy().view(np.uint16).ravel(), bfloat16_bits(drawn)
    )
    assert torch.equal(stored[name].float().ravel(), torch.from_numpy(drawn).bfloat16().float())
    assert torch.equal(stored["model.norm.weight"].float(), torch.ones(1536))
    assert (
        model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    )  # tied


def test_traced_external_data_is_gathered_into_one_file(tmp_path) -> None:
    """A traced vision graph over 2 GB comes with one file per tensor; the export streams them into
    one aligned ``<name>.onnx.data`` and the graph runs the same."""
    from onnx import TensorProto, helper

    from modelkiln.export.qwen_vl import _gather_external_data

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    shift = rng.standard_normal((2, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["m"]),
        # the tracer leaves constants as Constant nodes, whose large values go to files as well
        helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(shift, "c")),
        helper.make_node("Add", ["m", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(
        model,
        tmp_path / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
        convert_attribute=True,
    )
    proto = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    _gather_external_data(proto, tmp_path, tmp_path / "vision.onnx")
    (tmp_path / "vision.onnx").write_bytes(proto.SerializeToString())
    value = proto.graph.node[2].attribute[0].t
    assert value.data_location == TensorProto.EXTERNAL  # the case the check is about
    tensors = [*proto.graph.initializer, value]
    locations = {e.value for t in tensors for e in t.external_data if e.key == "location"}
    assert locations == {"vision.onnx.data"}
    for f in tmp_path.iterdir():  # the tracer's files go with its scratch folder
        if f.name not in ("vision.onnx", "vision.onnx.data"):
            f.unlink()
    x = rng.standard_normal((2, 8)).astype(np.float32)
    assert np.allclose(_cpu(tmp_path / "vision.onnx").infer({"x": x})["y"], x @ w1 @ w2 + shift, atol=1e-5)


def test_the_reference_head_keeps_bf16_weights_and_computes_float32_logits() -> None:
    """The truncated check's LM head (a checkpoint on disk) holds the stored bfloat16 matrix and
    widens it a block of rows at a time: the logits equal a float32 Linear over the widened matrix
    (a head that computed in bfloat16, or dropped a block, would not)."""
    from modelkiln.export.qwen_vl import _chunked_head

    weight = (torch.randn(40000, 64) * 0.02).to(torch.bfloat16)  # more rows than one block
    x = torch.randn(2, 1, 64)
    got = _chunked_head(weight)(x)
    want = torch.nn.functional.linear(x, weight.float())
    assert got.shape == (2, 1, 40000) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
