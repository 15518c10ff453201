"""The shared-buffer decoder step (GroupQueryAttention reading and writing one cache buffer in
place, ``build_decoder(kv_layout="shared")``) and the engine's slots of that buffer: logits and
cache against transformers on the tiny and the mid configuration (head size 128, as 2B's), greedy
generation token for token, batched decode with sequences joining and leaving (holes between
slots) equal to each sequence alone, no cache-sized buffer borrowed per step, the exact bytes a
sequence holds (one copy, no ping-pong), and the errors at the cache's limits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from modelkiln.errors import BadInput, ConfigError, PoolExhausted
from modelkiln.export.builder.attention import shared_feed
from modelkiln.export.builder.qwen2 import build_decoder, build_embedding
from modelkiln.export.builder.tensors import StateDict

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

LOGIT_TOL = 1e-4  # the bound for FP32 logits against transformers
MID = {"hidden": 512, "layers": 8, "heads": 4, "kv_heads": 2}


def _cpu(path: Path, opt: str = "DISABLE"):
    from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend

    return cpu_backend(path, optimization=GraphOptimization[opt])


@pytest.fixture(scope="module")
def tiny():
    from modelkiln.zoo.qwen_vl import build_tiny

    return build_tiny()


@pytest.fixture(scope="module")
def mid():
    from modelkiln.zoo.qwen_vl import build_tiny

    return build_tiny(**MID)


def _engine(folder: Path, name: str, **kw):
    from modelkiln.genai.engine import Engine

    embed = _cpu(folder / "embed.onnx")
    return Engine(folder / name, lambda ids: embed.infer({"input_ids": ids[None]})["inputs_embeds"][0], **kw)


def _start(engine, ids: list[int], new: int, seed: int | None = None):
    from modelkiln.genai.engine import Sampling

    positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids)))
    sampling = Sampling(0.9, 0.9, seed) if seed is not None else Sampling()
    return engine.start(engine.embed(np.asarray(ids, np.int64)), positions, 0, new, set(), sampling)


@pytest.mark.parametrize("size", ["tiny", "mid"])
def test_shared_step_matches_transformers(size, tiny, mid, tmp_path) -> None:
    """A chunk on a cache, a decode step at batch 3, a prefill, a batch-2 prefill with three
    distinct M-RoPE rows; the cache is compared where the step wrote it (the buffer is longer)."""
    from modelkiln.zoo.qwen_vl import decoder_example, decoder_part, decoder_step_module

    model, _ = tiny if size == "tiny" else mid
    text = model.model.language_model.config
    path = build_decoder(text, StateDict(model.state_dict()), tmp_path, kv_layout="shared")
    part = decoder_part(text)
    worst = {"logits": 0.0, "cache": 0.0}
    for opt in ("DISABLE", "ALL"):
        backend = _cpu(path, opt)
        for batch, seq, past in ((1, 5, 3), (3, 1, 6), (1, 9, 0), (2, 6, 0)):
            feed = decoder_example(part, batch, seq, past, seq)
            if batch == 2:
                rng = np.random.default_rng(3)
                feed["position_ids"] = (
                    rng.integers(0, 40, (3, batch, seq)) + np.array([0, 3, 7])[:, None, None]
                ).astype(np.int64)
            with torch.no_grad():
                refs = decoder_step_module(model)(*(torch.from_numpy(feed[s.name]) for s in part.inputs))
            got = backend.infer(shared_feed(feed, capacity=past + seq + 11))
            worst["logits"] = max(worst["logits"], float(np.abs(got["logits"] - refs[0].numpy()).max()))
            for spec, ref in zip(part.outputs[1:], refs[1:], strict=True):
                written = got[spec.name][:, :, : past + seq]
                worst["cache"] = max(worst["cache"], float(np.abs(written - ref.numpy()).max()))
    assert worst["logits"] <= LOGIT_TOL and worst["cache"] <= LOGIT_TOL, worst


def test_layout_is_a_builder_option_read_from_the_graph(tiny_layouts: Path) -> None:
    import onnx

    shared = onnx.load(tiny_layouts / "shared.onnx")
    ops = {n.op_type for n in shared.graph.node}
    assert "GroupQueryAttention" in ops and "Concat" in ops  # rotary halves still concatenated
    names = [i.name for i in shared.graph.input]
    assert names[:4] == ["inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length"]
    assert "attention_mask" not in names
    assert _engine(tiny_layouts, "shared.onnx").shared and not _engine(tiny_layouts, "concat.onnx").shared
    with pytest.raises(ConfigError, match="KV-cache layout 'paged'"):
        build_decoder(None, None, tiny_layouts, kv_layout="paged")


def test_greedy_generation_is_transformers_token_for_token(mid, tmp_path) -> None:
    from modelkiln.genai.engine import Engine

    model, processor = mid
    text = model.model.language_model.config
    tensors = StateDict(model.state_dict())
    build_decoder(text, tensors, tmp_path, kv_layout="shared")
    embed = _cpu(build_embedding(text, tensors, tmp_path))
    engine = Engine(
        tmp_path / "decoder.onnx", lambda ids: embed.infer({"input_ids": ids[None]})["inputs_embeds"][0]
    )
    messages = [{"role": "user", "content": "Tell me about the harbour at dawn."}]
    ids = processor.tokenizer(processor.apply_chat_template(messages, add_generation_prompt=True)).input_ids
    ours = engine.generate(ids, 16)
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None
        )
    assert engine.shared and len(ours) == 16 and ours == ref[0, len(ids) :].tolist()


def test_batched_decode_with_sequences_joining_and_leaving_equals_each_alone(tiny_layouts: Path) -> None:
    """Four sequences of different prompt lengths, answer lengths and samplers; two join while
    others run (one of them into the slot a finished one left, another after a hole opened), so
    steps bind slot ranges with holes. Every token equals the sequence run alone, on both layouts;
    the shared steps borrow only logits from the pool (never a cache-sized buffer)."""
    from modelkiln.genai.batch import decode_batch

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 500, n).tolist() for n in (5, 17, 9, 30, 12, 3)]
    news = [4, 12, 7, 10, 9, 6]
    seeds = [None, 1, None, 2, None, 3]
    joins = {0: 0, 1: 0, 2: 0, 3: 0, 4: 5, 5: 8}  # sequence -> the step it starts at
    results = {}
    for name in ("concat.onnx", "shared.onnx"):
        engine = _engine(tiny_layouts, name)
        alone = []
        for ids, new, seed in zip(prompts, news, seeds, strict=True):
            g = _start(engine, ids, new, seed)
            g.run()
            alone.append(g.tokens)
        gens: dict[int, object] = {}
        step, peak = 0, 0
        while len(gens) < len(prompts) or not all(g.done for g in gens.values()):
            for i, at in joins.items():
                if at == step and i not in gens:
                    g = gens[i] = _start(engine, prompts[i], news[i], seeds[i])
                    g.step()  # prefill alone
            running = [g for g in gens.values() if not g.done]
            if running:
                before = engine.pool.stats().in_use_bytes
                decode_batch(engine, running)
                peak = max(peak, engine.pool.stats().peak_bytes - before)
            for g in gens.values():
                if g.done:
                    g.close()  # leaves a hole in the shared buffer's slots
            step += 1
        results[name] = [gens[i].tokens for i in range(len(prompts))]
        assert results[name] == alone, name
        assert engine.pool.stats().outstanding == 0
        if engine.shared:
            one_cache = 2 * len(engine.past_names) * engine.kv_heads * engine.head_dim * 4 * 30
            assert peak < one_cache  # only logits rows moved through the pool
            assert engine.kv is not None and engine.kv.in_use == 0
    assert results["concat.onnx"] == results["shared.onnx"]


def test_a_sequence_holds_exactly_its_bytes_once(tiny_layouts: Path) -> None:
    """sequence_bytes = the pages its positions fill in its slot + its logits; per token that is
    2 x layers x kv_heads x head_dim x 4 bytes (no second ping-pong buffer), pages rounded."""
    from modelkiln.genai.kv_cache import PAGE

    engine = _engine(tiny_layouts, "shared.onnx")
    concat = _engine(tiny_layouts, "concat.onnx")
    per_token = len(engine.past_names) * engine.kv_heads * engine.head_dim * 4
    positions_per_page = PAGE // (engine.head_dim * 4)
    for capacity in (positions_per_page, 8 * positions_per_page):
        kv = engine.sequence_bytes(capacity) - engine.sequence_bytes(0)
        assert kv == per_token * capacity
        assert concat.sequence_bytes(capacity) > 2 * kv  # ping-pong: two buffers per cache tensor
    g = _start(engine, [1, 2, 3], 5)
    assert engine.kv is not None
    assert engine.pool.stats().in_use_bytes + engine.kv.slot_bytes(8) == engine.sequence_bytes(8)
    g.close()
    assert engine.pool.stats().in_use_bytes == 0 and engine.kv.in_use == 0


def test_limits_of_the_shared_cache_are_errors_naming_them(tiny_layouts: Path) -> None:
    engine = _engine(tiny_layouts, "shared.onnx", slots=2, capacity=64)
    a = _start(engine, [1, 2, 3], 5)
    b = _start(engine, [4, 5], 5)
    assert {a.cache.slot, b.cache.slot} == {0, 1}
    with pytest.raises(PoolExhausted, match="all 2 slots hold a sequence"):
        _start(engine, [6], 2)
    b.close()
    with pytest.raises(BadInput, match="exceed the shared cache's capacity"):
        _start(engine, [6], 500)  # a slot is held: the buffer cannot be remade larger
    a.close()
    big = _start(engine, list(range(40)), 200)  # idle: remade with room for it
    assert engine.kv is not None and engine.kv.capacity >= 240
    big.run()
    assert len(big.tokens) == 200


def test_chat_model_runs_a_shared_decoder(qwen_tiny_export, tmp_path: Path, tiny) -> None:
    """ChatModel reads the layout from the graph: the same answers from the exported (shared, the
    default) decoder and a concat one built from the same weights, an image chat included."""
    from modelkiln.genai.chat import ChatModel

    folder = tmp_path / "tiny"
    shutil.copytree(qwen_tiny_export[0], folder)
    model, _ = tiny
    build_decoder(
        model.model.language_model.config,
        StateDict(model.state_dict()),
        folder,
        "decoder.concat.onnx",
        kv_layout="concat",
    )
    image = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    answers = []
    for decoder in (None, "decoder.concat.onnx"):
        chat = ChatModel(folder, decoder)
        gen = chat.start(chat.prompt(messages, [image]), 10)
        gen.stop = set()
        gen.run()
        answers.append(gen.tokens)
        assert chat.engine.shared == (decoder is None)
    assert answers[0] == answers[1]
