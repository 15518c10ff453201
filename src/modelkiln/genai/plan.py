"""Continuous batching as a plan per step and an executor, as vLLM's scheduler splits it.

``plan_step`` looks at the sequences in flight and decides, without running anything, which
prefill this step (their whole prompt, each alone: prompts differ in length), which decode one
token together (one batched run: the weights are read once for all of them) and which finish
(done, or cancelled by their caller) and give their cache back. ``Executor.execute`` runs a plan
and reports, per sequence, the token it produced or the error it failed with.

A failing batched run fails nobody yet: its sequences are retried one by one, and only those that
fail alone fail (a sequence whose input is at fault, a cache it cannot extend...), so one bad
sequence never takes the others down. Retrying is safe because a batched step changes no
sequence before its run succeeded (``batch.decode_batch``); a sequence that did move before the
failure keeps what it got and is not run twice.

``run_to_end`` drives a set of sequences with this loop (benchmarks, tests, batch jobs); the
server (``serve/generation.py``) plans its decode rounds the same way and runs prefills as tasks
of their own on its thread pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from modelkiln.genai import batch as genai_batch  # the module: decode_batch is looked up per step
from modelkiln.genai.engine import Engine, Generation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one step does: nothing here has run yet."""

    prefill: tuple[Generation, ...] = ()
    decode: tuple[Generation, ...] = ()
    finish: tuple[Generation, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode or self.finish)


@dataclass
class Outcome:
    """What one step did, per sequence (by identity)."""

    tokens: dict[Generation, int] = field(default_factory=dict)
    failed: dict[Generation, BaseException] = field(default_factory=dict)
    finished: list[Generation] = field(default_factory=list)
    #: Batched runs that failed and were retried sequence by sequence.
    retried: int = 0


def prefilled(gen: Generation) -> bool:
    """A sequence's prompt is in its cache once its first step produced a token."""
    return bool(gen.tokens)


def plan_step(
    gens: Iterable[Generation],
    cancelled: Callable[[Generation], bool] = lambda g: False,
    max_prefill: int = 1,
    max_decode: int | None = None,
) -> Plan:
    """The next step for ``gens`` (in order of priority): finish what is done or cancelled,
    prefill at most ``max_prefill`` new sequences (a prompt's prefill is long; the others' decode
    waits one step per prefill at most), decode one token of every other prefilled sequence (at
    most ``max_decode``, the first ones)."""
    prefill: list[Generation] = []
    decode: list[Generation] = []
    finish: list[Generation] = []
    for g in gens:
        if g.done or cancelled(g):
            finish.append(g)
        elif not prefilled(g):
            if len(prefill) < max_prefill:
                prefill.append(g)
        elif max_decode is None or len(decode) < max_decode:
            decode.append(g)
    return Plan(tuple(prefill), tuple(decode), tuple(finish))


class Executor:
    """Runs plans on one engine; failures stay with the sequences that cause them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def execute(self, plan: Plan) -> Outcome:
        """Finish, then decode (one batched run), then prefill (each alone)."""
        out = Outcome()
        for g in plan.finish:
            g.close()
            out.finished.append(g)
        if plan.decode:
            self.decode(list(plan.decode), out)
        for g in plan.prefill:
            try:
                out.tokens[g] = g.step()
            except Exception as exc:  # noqa: BLE001 - this sequence's failure, nobody else's
                log.warning("prefill failed for one sequence: %s", exc)
                out.failed[g] = exc
        return out

    def decode(self, gens: list[Generation], out: Outcome | None = None) -> Outcome:
        """One token for each of ``gens`` in one batched run; if that run fails, each sequence
        again alone, and only those failing alone fail."""
        out = out if out is not None else Outcome()
        before = {g: (len(g.tokens), g.cache.length) for g in gens}
        try:
            tokens = genai_batch.decode_batch(self.engine, gens)
        except Exception as exc:  # noqa: BLE001 - isolate: retry each alone below
            if len(gens) == 1:
                out.failed[gens[0]] = exc
                return out
            out.retried += 1
            log.warning("batched decode of %d sequences failed (%s); retrying each alone", len(gens), exc)
            for g in gens:
                self._alone(g, before[g], exc, out)
            return out
        out.tokens.update(zip(gens, tokens, strict=True))
        return out

    def _alone(self, g: Generation, before: tuple[int, int], batch_error: Exception, out: Outcome) -> None:
        count, length = before
        if len(g.tokens) > count:  # it got its token before the batch failed
            out.tokens[g] = g.tokens[-1]
        elif g.cache.length != length:  # its cache moved but no token was taken: cannot redo
            out.failed[g] = batch_error
        else:
            try:
                out.tokens[g] = genai_batch.decode_batch(self.engine, [g])[0]
            except Exception as exc:  # noqa: BLE001 - fails alone: this sequence's own error
                out.failed[g] = exc


def run_to_end(
    engine: Engine,
    gens: list[Generation],
    on_token: Callable[[Generation, int], None] | None = None,
    max_prefill: int = 1,
) -> dict[Generation, BaseException]:
    """Step ``gens`` with plans until every one finished (each closed); returns the failed ones
    with their errors (closed too). ``on_token`` sees every token as it is chosen."""
    executor = Executor(engine)
    live, failed = list(gens), {}
    try:
        while live:
            outcome = executor.execute(plan_step(live, max_prefill=max_prefill))
            for g, token in outcome.tokens.items():
                if on_token is not None:
                    on_token(g, token)
            for g, exc in outcome.failed.items():
                g.close()
                failed[g] = exc
            gone = set(outcome.finished) | set(outcome.failed)
            live = [g for g in live if g not in gone]
    finally:
        for g in live:
            g.close()
    return failed
