"""Continuous batching as plan + executor (genai/plan.py): what a step plans, sequences driven to
the end equal to each alone, and a failing batched step that fails only the sequence at fault
(its retry alone fails too) while the others go on token for token, on both cache layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelkiln.genai import batch as genai_batch
from modelkiln.genai.plan import Executor, plan_step, run_to_end

pytest.importorskip("transformers")
pytest.importorskip("torch")

PROMPTS = [[5, 9, 31, 7, 2], [100, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42, 43, 44]]
NEW = [6, 9, 7]


def _engine(folder: Path, name: str):
    from modelkiln.genai.engine import Engine
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    embed = cpu_backend(folder / "embed.onnx")
    return Engine(folder / name, lambda ids: embed.infer({"input_ids": ids[None]})["inputs_embeds"][0])


def _start(engine, i: int):
    ids = PROMPTS[i]
    positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids)))
    return engine.start(engine.embed(np.asarray(ids, np.int64)), positions, 0, NEW[i], set())


def _alone(engine) -> list[list[int]]:
    out = []
    for i in range(len(PROMPTS)):
        g = _start(engine, i)
        g.run()
        out.append(g.tokens)
    return out


def test_a_plan_finishes_prefills_and_decodes(tiny_layouts: Path) -> None:
    engine = _engine(tiny_layouts, "shared.onnx")
    a, b, c = (_start(engine, i) for i in range(3))
    plan = plan_step([a, b, c])
    assert plan.prefill == (a,) and plan.decode == () and plan.finish == ()  # one prefill per step
    Executor(engine).execute(plan)
    plan = plan_step([a, b, c], max_prefill=2)
    assert plan.prefill == (b, c) and plan.decode == (a,)
    Executor(engine).execute(plan)
    plan = plan_step([a, b, c], cancelled=lambda g: g is b, max_decode=1)
    assert plan.finish == (b,) and plan.decode == (a,) and not plan.prefill
    out = Executor(engine).execute(plan)
    assert out.finished == [b] and b.done and set(out.tokens) == {a}
    for g in (a, c):
        g.close()
    assert not plan_step([]) and engine.kv is not None and engine.kv.in_use == 0


@pytest.mark.parametrize("layout", ["concat", "shared"])
def test_run_to_end_equals_each_sequence_alone(tiny_layouts: Path, layout: str) -> None:
    engine = _engine(tiny_layouts, f"{layout}.onnx")
    expected = _alone(engine)
    gens = [_start(engine, i) for i in range(3)]
    seen: dict[int, list[int]] = {}
    failed = run_to_end(engine, gens, on_token=lambda g, t: seen.setdefault(id(g), []).append(t))
    assert not failed and [g.tokens for g in gens] == expected == [seen[id(g)] for g in gens]
    assert engine.pool.stats().outstanding == 0


@pytest.mark.parametrize("layout", ["concat", "shared"])
def test_a_failing_step_fails_only_the_sequence_that_fails_alone(
    tiny_layouts: Path, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequence 1's next input is broken after its 3rd token (a wrong-sized embedding, which no
    run accepts): the batched step fails, each sequence is retried alone, sequence 1 fails with
    its own error and the others produce exactly what they produce alone."""
    engine = _engine(tiny_layouts, f"{layout}.onnx")
    expected = _alone(engine)
    gens = [_start(engine, i) for i in range(3)]
    victim = gens[1]
    calls: list[int] = []
    real = genai_batch.decode_batch

    def counting(engine, batch):
        calls.append(len(batch))
        if victim in batch and len(victim.tokens) == 3:
            victim._embeds = np.zeros((1, 1, engine.hidden + 1), np.float32)
        return real(engine, batch)

    monkeypatch.setattr(genai_batch, "decode_batch", counting)
    failed = run_to_end(engine, gens, max_prefill=3)
    assert list(failed) == [victim] and len(victim.tokens) == 3
    assert [gens[0].tokens, gens[2].tokens] == [expected[0], expected[2]]
    assert 3 in calls and calls.count(1) >= 3  # the batched try, then each alone
    assert engine.pool.stats().outstanding == 0
    if engine.kv is not None:
        assert engine.kv.in_use == 0


def test_a_sequence_that_moved_before_the_failure_is_not_run_twice(
    tiny_layouts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batched step that fails after some sequences took their token: those keep it and are
    not stepped again; the rest are retried alone."""
    engine = _engine(tiny_layouts, "shared.onnx")
    expected = _alone(engine)
    gens = [_start(engine, i) for i in range(3)]
    for g in gens:
        g.step()
    real = genai_batch.decode_batch

    def half(engine, batch):
        if len(batch) > 1:
            real(engine, batch[:1])
            raise RuntimeError("lost the rest")
        return real(engine, batch)

    monkeypatch.setattr(genai_batch, "decode_batch", half)
    out = Executor(engine).decode(gens)
    assert out.retried == 1 and not out.failed
    assert [len(g.tokens) for g in gens] == [2, 2, 2]
    assert [g.tokens for g in gens] == [e[:2] for e in expected]
    for g in gens:
        g.close()
