"""A memory budget for ``kiln serve --memory-budget``: models load on their first request, the
least recently used idle ones are unloaded when a load would not fit, and a request that cannot
fit waits in its model's queue up to its timeout, then fails with the reason (503).

Each model's cost is what loading it cost the process (resident set before vs after its sessions
were created and warmed up: weights, session arenas, first-run allocations), not its file size,
measured once per load. Loads run one at a time on one thread, so each measurement is one model's.
The server keeps a ``Slot`` per plain model; its versions are served through ``LazyModel`` and
``LazyQueue`` stand-ins that forward to the real model and batcher while it is resident.

Chat models are always resident (their measured load cost is fixed); each running chat sequence
also holds a ``Reservation``: the bytes its KV cache and logits take from the request buffer pool,
from the moment it starts until it ends. Loads and reservations that do not fit wait in one line,
first come first served, for the same evictions and the same timeouts.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from modelkiln.errors import BadInput, ModelUnavailable, QueueFull
from modelkiln.runtime.memory_pool import MemoryPool
from modelkiln.serve.batcher import InferRequest, InferResponse, ModelQueue
from modelkiln.serve.config import ModelConfig, TensorConfig
from modelkiln.serve.model import KSERVE_DTYPES, ServedModel

log = logging.getLogger(__name__)
T = TypeVar("T")
MB = 1 << 20
#: How long a request without a timeout waits for memory before it is refused.
DEFAULT_WAIT_S = 30.0
#: A first load's cost is guessed from its files until measured: weights once per instance,
#: times this, plus the arena and first-run allocations below.
ESTIMATE_FACTOR = 1.25
ESTIMATE_OVERHEAD = 16 * MB
#: While chats wait for memory, how often the loader looks whether their clients left.
CANCEL_POLL_S = 0.25
#: Why a plain model is not resident before its first load.
NOT_LOADED_YET = "not loaded yet: loads on first request"


def size_text(nbytes: int) -> str:
    """Bytes for a message: MB with one decimal, kB below a tenth of a MB (KV caches can be small)."""
    return f"{nbytes / MB:.1f} MB" if nbytes >= MB // 10 or nbytes == 0 else f"{nbytes / 1024:.1f} kB"


def process_rss() -> int:
    """This process's resident set in bytes (psutil when installed, else /proc/self/status)."""
    try:
        import psutil  # noqa: PLC0415 - optional, not a declared dependency

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim), so an unloaded model's memory
    leaves the resident set and the next load's measurement is not hidden by reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class CostMeasurer(Protocol):
    """Runs ``load`` (session creation and warm-up) and says what it cost in bytes. Tests pass a
    fake, since a process's resident set moves with everything else it does."""

    def __call__(self, name: str, load: Callable[[], T]) -> tuple[T, int]: ...


def rss_cost(name: str, load: Callable[[], T]) -> tuple[T, int]:
    """Resident set after ``load`` minus before (the heap trimmed first)."""
    trim_heap()
    before = process_rss()
    result = load()
    after = process_rss()
    log.debug("%s: resident set %d -> %d MB", name, before // MB, after // MB)
    return result, max(after - before, 0)


@dataclass
class _Pending:
    request: InferRequest
    version: int
    wait_until: float  # monotonic: the request's deadline, or DEFAULT_WAIT_S from now


@dataclass
class Slot:
    """One plain model under the budget: all its versions load and unload together."""

    name: str
    config: ModelConfig
    versions: dict[int, Path]
    load: Callable[[], dict[int, tuple[ServedModel, ModelQueue]]]
    pinned: bool = False
    #: Measured cost of the last load (bytes); before the first load, an estimate from its files.
    cost: int = 0
    measured: bool = False
    floor: int = 0  # its weights once per instance: a measurement below this is memory reuse
    resident: dict[int, tuple[ServedModel, ModelQueue]] | None = None
    loading: bool = False
    #: The models as last loaded (sessions released): validation and metadata while not resident.
    shape: dict[int, ServedModel] = field(default_factory=dict)
    inflight: int = 0
    pending: collections.deque[_Pending] = field(default_factory=collections.deque)
    last_used: float = 0.0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    closed: bool = False
    #: Why it is not resident (the repository index says it): never loaded, evicted for whom, failed.
    reason: str = NOT_LOADED_YET

    def __post_init__(self) -> None:
        files = sum(p.stat().st_size for p in self.versions.values() if p.is_file())
        self.floor = files * self.config.instance_count
        self.cost = int(self.floor * ESTIMATE_FACTOR) + ESTIMATE_OVERHEAD * len(self.versions)

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and not self.pending and not self.loading


@dataclass(frozen=True)
class ModelMemory:
    """One model's row in /metrics."""

    name: str
    resident_bytes: int
    cost_bytes: int
    pinned: bool
    loads: int
    evictions: int
    load_seconds: float
    #: A chat model's KV-cache bytes reserved by its running sequences now (None: not a chat model).
    kv_reserved_bytes: int | None = None
    #: Models unloaded to make room for a chat model's sequences (0 for other models).
    kv_evictions: int = 0


@dataclass(frozen=True)
class Residency:
    """A budgeted model as the repository index and the readiness routes see it."""

    state: str  # READY (resident) | LOADING | UNAVAILABLE (not resident: ``reason`` says why)
    reason: str
    #: Whether a request would be served (at once, or after a load): the model-ready answer.
    servable: bool


@dataclass(eq=False)  # compared by identity: the budget removes exactly this one
class Reservation:
    """The bytes one chat sequence's KV cache holds under the budget, counted from the moment it
    is granted until ``release()`` (idempotent; while still waiting, it withdraws it)."""

    budget: MemoryBudget
    owner: str  # the chat model
    nbytes: int
    wait_until: float  # monotonic: after this, a waiting reservation fails with the reason
    on_grant: Callable[[Reservation], None]
    on_fail: Callable[[BaseException], None]
    abandoned: Callable[[], bool]  # the chat was cancelled (its client left): stop waiting
    since: float = field(default_factory=time.monotonic)
    state: str = "waiting"  # waiting | granted | released | failed

    def release(self) -> None:
        self.budget.give_back(self)


class MemoryBudget:
    """The slots, what they hold, and the one thread that loads, evicts and times out."""

    def __init__(
        self, budget_bytes: int, measure: CostMeasurer = rss_cost, pool: MemoryPool | None = None
    ) -> None:
        """``pool``: the server's request buffer pool (batch buffers, KV caches). What it gains or
        loses while a model loads is not that model's cost, and its cached blocks are dropped
        around each load and when memory is short."""
        if budget_bytes < 1:
            raise BadInput(f"memory budget must be >= 1 byte, got {budget_bytes}")
        self.budget = budget_bytes
        self.measure = measure
        self.pool = pool
        self._slots: dict[str, Slot] = {}
        #: Bytes of models that are not plain (pipelines' own state, chat models): always held.
        self._fixed: dict[str, int] = {}
        #: Chat models among the fixed ones, with the KV bytes their running sequences hold.
        self._kv: dict[str, int] = {}
        #: Per chat model, models unloaded to make room for its sequences.
        self._kv_evictions: dict[str, int] = collections.Counter()
        #: Reservations waiting for memory, in arrival order.
        self._waiting: list[Reservation] = []
        self._cond = threading.Condition(threading.RLock())
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="kiln-memory-budget", daemon=True)
        self._thread.start()

    # --- accounting ------------------------------------------------------------------------------
    def held(self) -> int:
        """Bytes counted against the budget: resident or loading models, the fixed ones and the
        KV caches of running chats."""
        with self._cond:
            return (
                sum(self._fixed.values())
                + sum(self._kv.values())
                + sum(s.cost for s in self._slots.values() if s.resident is not None or s.loading)
            )

    def _pinned_bytes(self) -> int:
        return sum(self._fixed.values()) + sum(
            s.cost for s in self._slots.values() if s.pinned and s.resident is not None
        )

    def stats(self) -> list[ModelMemory]:
        with self._cond:
            rows = [
                ModelMemory(
                    s.name,
                    s.cost if s.resident is not None else 0,
                    s.cost,
                    s.pinned,
                    s.loads,
                    s.evictions,
                    s.load_seconds,
                )
                for s in self._slots.values()
            ]
            rows += [
                ModelMemory(n, b, b, True, 1, 0, 0.0, self._kv.get(n), self._kv_evictions.get(n, 0))
                for n, b in self._fixed.items()
            ]
        return sorted(rows, key=lambda r: r.name)

    def measure_fixed(self, name: str, load: Callable[[], T], chat: bool = False) -> T:
        """Load a model that is always resident (a chat model, a pipeline) and count its cost.
        ``chat``: its sequences will reserve their KV caches (``reserve``); the cache its warm-up
        used is given back before the measurement ends, so it is never counted twice."""
        result, cost = self._measured(name, load)
        with self._cond:
            self._fixed[name] = cost
            if chat:
                self._kv.setdefault(name, 0)
            if self.held() > self.budget:
                log.warning(
                    "%s: %d MB always resident; %d of the %d MB budget now held",
                    name,
                    cost // MB,
                    self.held() // MB,
                    self.budget // MB,
                )
        return result

    def forget_fixed(self, name: str) -> None:
        with self._cond:
            self._fixed.pop(name, None)
            self._kv.pop(name, None)
            self._cond.notify_all()

    def _measured(self, name: str, load: Callable[[], T]) -> tuple[T, int]:
        """``measure`` around ``load``, less what the request buffer pool gained meanwhile (other
        requests' batch buffers and KV caches: never a model's state). The pool's cached blocks
        are dropped before and after, so a warm-up's buffers are not in the cost either."""
        pool = self.pool
        if pool is None:
            return self.measure(name, load)
        self.drop_cache()
        before = _pool_bytes(pool)

        def then_drop() -> T:
            out = load()
            self.drop_cache()
            return out

        result, cost = self.measure(name, then_drop)
        return result, max(cost - (_pool_bytes(pool) - before), 0)

    def drop_cache(self) -> None:
        """Give the pool's free (cached) blocks and the freed heap back to the system, so the
        resident set follows what the budget counts."""
        if self.pool is not None:
            self.pool.trim()
        trim_heap()

    # --- KV-cache reservations of chat sequences -------------------------------------------------
    def reserve(
        self,
        owner: str,
        nbytes: int,
        wait_until: float,
        on_grant: Callable[[Reservation], None],
        on_fail: Callable[[BaseException], None],
        abandoned: Callable[[], bool] = lambda: False,
    ) -> Reservation | None:
        """Hold ``nbytes`` for a sequence of chat model ``owner``: the reservation when it fits
        now (and nothing waits before it); else None, and later exactly one of ``on_grant`` (after
        idle models were unloaded for it, or memory was given back) or ``on_fail`` (its time is up,
        its chat was cancelled, the server stops), called from the budget's thread. A sequence
        that cannot fit even beside the pinned models alone is refused at once (ModelUnavailable)."""
        res = Reservation(self, owner, nbytes, wait_until, on_grant, on_fail, abandoned)
        with self._cond:
            if self._stop:
                raise ModelUnavailable(f"model '{owner}': the server is shutting down")
            if nbytes > self.budget - self._pinned_bytes():
                raise ModelUnavailable(self._why_kv(res, "it cannot fit beside the pinned models"))
            if not self._anyone_waiting() and nbytes <= self.budget - self.held():
                self._grant(res)
                return res
            self._waiting.append(res)
            self._cond.notify_all()
        self.drop_cache()  # memory is short: cached blocks should not hold the resident set up
        return None

    def give_back(self, res: Reservation) -> None:
        """A sequence ended (or gave up waiting): its bytes are free again."""
        with self._cond:
            if res.state == "granted":
                if res.owner in self._kv:  # not if its model was already forgotten (unloaded)
                    self._kv[res.owner] -= res.nbytes
            elif res.state == "waiting" and res in self._waiting:
                self._waiting.remove(res)
            else:
                return
            res.state = "released"
            self._cond.notify_all()

    def _grant(self, res: Reservation) -> None:
        """Count ``res`` (the lock held)."""
        res.state = "granted"
        self._kv[res.owner] = self._kv.get(res.owner, 0) + res.nbytes

    def _anyone_waiting(self) -> bool:
        """A load or a reservation already waits for memory (they go first: one line for all)."""
        return bool(self._waiting) or any(
            s.pending and s.resident is None and not s.loading for s in self._slots.values()
        )

    # --- slots -----------------------------------------------------------------------------------
    def add(self, slot: Slot) -> dict[int, tuple[LazyModel, LazyQueue]]:
        """Register ``slot`` (a pinned one is loaded now: it must fit); its stand-ins per version."""
        with self._cond:
            self._slots[slot.name] = slot
        if slot.pinned:
            with self._cond:
                if not self._make_room(slot):
                    del self._slots[slot.name]
                    raise ModelUnavailable(self._why(slot, "pinned, it must be loaded at start"))
                slot.loading = True
            self._load(slot)
            if slot.resident is None:
                with self._cond:
                    del self._slots[slot.name]
                raise ModelUnavailable(f"model '{slot.name}': pinned model failed to load")
        return {v: (LazyModel(self, slot, v), LazyQueue(self, slot, v)) for v in slot.versions}

    def slot(self, name: str) -> Slot | None:
        with self._cond:
            return self._slots.get(name)

    def residency(self, name: str) -> Residency | None:
        """Whether plain model ``name`` is resident, and if not why and whether it ever can be
        (None: not a budgeted plain model)."""
        with self._cond:
            slot = self._slots.get(name)
            if slot is None:
                return None
            if slot.resident is not None:
                return Residency("READY", "", True)
            if slot.loading:
                return Residency("LOADING", "loading (memory budget)", True)
            if not slot.pinned and slot.cost > self.budget - self._pinned_bytes():
                return Residency(
                    "UNAVAILABLE", self._why(slot, "it cannot fit beside the pinned models"), False
                )
            return Residency("UNAVAILABLE", slot.reason, True)

    def submit(self, slot: Slot, version: int, request: InferRequest) -> Future[InferResponse]:
        """Forward to the resident batcher, or queue until the model is loaded."""
        with self._cond:
            if slot.closed:
                raise ModelUnavailable(f"model '{slot.name}' is unloading")
            slot.last_used = time.monotonic()
            if slot.resident is not None and not slot.pending:
                self._forward(slot, version, request, raise_errors=True)
                return request.future
            if not slot.pinned and slot.cost > self.budget - self._pinned_bytes():
                raise ModelUnavailable(self._why(slot, "it cannot fit beside the pinned models"))
            if len(slot.pending) >= slot.config.queue.max_queue_size:
                raise QueueFull(
                    f"model '{slot.name}': queue full ({len(slot.pending)} requests waiting for memory)"
                )
            wait_until = request.deadline or time.monotonic() + DEFAULT_WAIT_S
            slot.pending.append(_Pending(request, version, wait_until))
            self._cond.notify_all()
        return request.future

    def _forward(self, slot: Slot, version: int, request: InferRequest, raise_errors: bool) -> None:
        """Hand ``request`` to the resident batcher of ``version`` (the lock held)."""
        assert slot.resident is not None
        model, queue = slot.resident[version]
        try:
            if request.batch != model.validate(request.feed):
                raise BadInput(f"model '{slot.name}': batch size does not match the inputs")
            queue.submit(request)
        except Exception as exc:
            if raise_errors:
                raise
            request.future.set_exception(exc)
            return
        slot.inflight += 1
        request.future.add_done_callback(lambda _: self._finished(slot))

    def _finished(self, slot: Slot) -> None:
        with self._cond:
            slot.inflight -= 1
            slot.last_used = time.monotonic()
            if slot.inflight == 0:
                self._cond.notify_all()

    def remove(self, slot: Slot, drain: bool) -> None:
        """Unload ``slot`` for good (unload/reload through the repository API, shutdown)."""
        with self._cond:
            if slot.closed:
                return
            slot.closed = True
            if self._slots.get(slot.name) is slot:
                del self._slots[slot.name]
            pending = list(slot.pending)
            slot.pending.clear()
            resident, slot.resident = slot.resident, None
            self._cond.notify_all()
        for p in pending:
            p.request.future.set_exception(ModelUnavailable(f"model '{slot.name}' unloaded"))
        if resident is not None:
            self._release(slot, resident, drain)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            slots = list(self._slots.values())
            waiting, self._waiting = self._waiting, []
            for res in waiting:
                res.state = "failed"
            self._cond.notify_all()
        self._thread.join(timeout=30)
        for res in waiting:
            _call(res.on_fail, ModelUnavailable(f"model '{res.owner}': the server is shutting down"))
        for slot in slots:
            self.remove(slot, drain=True)

    # --- the loader thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            load: Slot | None = None
            granted: Reservation | None = None
            evicted: list[tuple[Slot, dict[int, tuple[ServedModel, ModelQueue]]]] = []
            with self._cond:
                if self._stop:
                    return
                failed = self._expire()
                demand = self._next_demand()
                victims = None
                if demand is not None:
                    victims = self._victims(demand.cost if isinstance(demand, Slot) else demand.nbytes)
                if victims is None:  # nothing to do, or it cannot fit now: wait for a change
                    if not failed:
                        self._cond.wait(timeout=self._next_expiry())
                else:
                    assert demand is not None
                    if isinstance(demand, Slot):
                        load, demand.loading = demand, True
                        label = demand.name
                    else:
                        self._waiting.remove(demand)
                        self._grant(demand)
                        granted, label = demand, f"a sequence of {demand.owner}"
                        self._kv_evictions[demand.owner] += len(victims)
                    evicted = self._evict(victims, f"evicted to fit {label} (memory budget)")
            for res, exc in failed:
                _call(res.on_fail, exc)
            for v, resident in evicted:
                log.info("memory budget: unloading %s (%d MB, least recently used)", v.name, v.cost // MB)
                self._release(v, resident, drain=True)
            if granted is not None:
                _call(granted.on_grant, granted)
            if load is not None:
                self._load(load)

    def _next_demand(self) -> Slot | Reservation | None:
        """What waits longest for memory: a non-resident model's oldest request, or a chat
        sequence's reservation (one line for both, first come first served)."""
        waiting: list[tuple[float, Slot | Reservation]] = [
            (s.pending[0].request.enqueued, s)
            for s in self._slots.values()
            if s.pending and s.resident is None and not s.loading
        ]
        waiting += [(r.since, r) for r in self._waiting]
        return min(waiting, key=lambda w: w[0], default=(0.0, None))[1]

    def _victims(self, need: int) -> list[Slot] | None:
        """Least recently used idle unpinned models to unload so ``need`` bytes fit; None: they
        cannot (yet)."""
        free = self.budget - self.held()
        if need <= free:
            return []
        chosen: list[Slot] = []
        candidates = sorted(
            (s for s in self._slots.values() if s.resident is not None and not s.pinned and s.idle),
            key=lambda s: s.last_used,
        )
        for s in candidates:
            chosen.append(s)
            free += s.cost
            if need <= free:
                return chosen
        return None

    @staticmethod
    def _evict(victims: list[Slot], why: str) -> list[tuple[Slot, dict[int, tuple[ServedModel, ModelQueue]]]]:
        """Take ``victims`` out of the accounting (the lock held); the caller releases them."""
        out = []
        for v in victims:
            assert v.resident is not None
            out.append((v, v.resident))
            v.resident = None
            v.evictions += 1
            v.reason = why
        return out

    def _overflow(self, loaded: Slot) -> list[tuple[Slot, dict[int, tuple[ServedModel, ModelQueue]]]]:
        """A load measured above its estimate: unload least recently used idle models until the
        budget holds again, as far as they allow (the lock held)."""
        victims: list[Slot] = []
        over = self.held() - self.budget
        candidates = sorted(
            (
                s
                for s in self._slots.values()
                if s is not loaded and s.resident is not None and not s.pinned and s.idle
            ),
            key=lambda s: s.last_used,
        )
        for s in candidates:
            if over <= 0:
                break
            victims.append(s)
            over -= s.cost
        return self._evict(victims, f"evicted to fit {loaded.name} (memory budget)")

    def _make_room(self, slot: Slot) -> bool:
        """Evict for a pinned load at start (the lock held); False when it cannot fit."""
        victims = self._victims(slot.cost)
        if victims is None:
            return False
        for v, resident in self._evict(victims, f"evicted to fit {slot.name} (memory budget)"):
            self._release(v, resident, drain=True)
        return True

    def _load(self, slot: Slot) -> None:
        """Load ``slot`` (``loading`` already set, its estimate counted), measure, forward its queue."""
        start = time.perf_counter()
        try:
            loaded, cost = self._measured(slot.name, slot.load)
        except Exception as exc:  # noqa: BLE001 - its waiting requests get the reason, the server lives
            log.error("memory budget: %s failed to load: %s", slot.name, exc)
            with self._cond:
                slot.loading = False
                slot.reason = f"failed to load: {exc}"
                failed = list(slot.pending)
                slot.pending.clear()
                self._cond.notify_all()
            for p in failed:
                p.request.future.set_exception(ModelUnavailable(f"model '{slot.name}' failed to load: {exc}"))
            return
        seconds = time.perf_counter() - start
        with self._cond:
            slot.cost = max(cost, slot.floor)
            slot.measured = True
            slot.loads += 1
            slot.load_seconds += seconds
            slot.loading = False
            slot.resident = loaded
            slot.shape = {v: m for v, (m, _) in loaded.items()}
            slot.last_used = time.monotonic()
            if slot.closed:  # unloaded while it loaded
                resident, slot.resident = slot.resident, None
            else:
                resident = None
                while slot.pending:
                    p = slot.pending.popleft()
                    self._forward(slot, p.version, p.request, raise_errors=False)
            over = self._overflow(slot)
            self._cond.notify_all()
        if resident is not None:
            self._release(slot, resident, drain=True)
        for v, held in over:
            log.info("memory budget: unloading %s (%d MB, over budget after a load)", v.name, v.cost // MB)
            self._release(v, held, drain=True)
        log.info(
            "memory budget: loaded %s in %.2fs (~%d MB; %d of %d MB held)",
            slot.name,
            seconds,
            slot.cost // MB,
            self.held() // MB,
            self.budget // MB,
        )

    def _release(self, slot: Slot, resident: dict[int, tuple[ServedModel, ModelQueue]], drain: bool) -> None:
        for model, queue in resident.values():
            queue.close(drain=drain)
            model.release()
        resident.clear()
        self.drop_cache()

    def _expire(self) -> list[tuple[Reservation, BaseException]]:
        """Refuse the waiting requests whose time is up, saying why (the lock held); the waiting
        reservations whose time is up or whose chat was cancelled are returned with their error,
        to be told outside the lock."""
        now = time.monotonic()
        for slot in self._slots.values():
            if not any(p.wait_until <= now for p in slot.pending):
                continue
            expired = [p for p in slot.pending if p.wait_until <= now]
            slot.pending = collections.deque(p for p in slot.pending if p.wait_until > now)
            for p in expired:
                waited = now - p.request.enqueued
                p.request.future.set_exception(ModelUnavailable(self._why(slot, f"waited {waited:.1f}s")))
        failed: list[tuple[Reservation, BaseException]] = []
        for res in list(self._waiting):
            if res.abandoned():
                exc = ModelUnavailable(f"model '{res.owner}': chat cancelled while it waited for memory")
            elif res.wait_until <= now:
                exc = ModelUnavailable(self._why_kv(res, f"waited {now - res.since:.1f}s"))
            else:
                continue
            self._waiting.remove(res)
            res.state = "failed"
            failed.append((res, exc))
        return failed

    def _busy(self) -> int:
        """Bytes in use by requests: unpinned models with work in flight, running chats' KV caches."""
        return sum(self._kv.values()) + sum(
            s.cost for s in self._slots.values() if s.resident is not None and not s.pinned and not s.idle
        )

    def _why(self, slot: Slot, when: str) -> str:
        return (
            f"model '{slot.name}' needs ~{slot.cost // MB} MB{'' if slot.measured else ' (estimated)'} "
            f"but does not fit the memory budget of {self.budget // MB} MB: {self.held() // MB} MB held, "
            f"{self._pinned_bytes() // MB} MB pinned, {self._busy() // MB} MB in use by other requests ({when})"
        )

    def _why_kv(self, res: Reservation, when: str) -> str:
        return (
            f"model '{res.owner}': a chat sequence needs {size_text(res.nbytes)} for its KV cache but "
            f"does not fit the memory budget of {size_text(self.budget)}: {size_text(self.held())} held, "
            f"{size_text(self._pinned_bytes())} pinned, {size_text(self._busy())} in use by other "
            f"requests ({when})"
        )

    def _next_expiry(self) -> float | None:
        times = [p.wait_until for s in self._slots.values() for p in s.pending]
        times += [r.wait_until for r in self._waiting]
        if not times:
            return None
        wait = max(min(times) - time.monotonic(), 0.001)
        return min(wait, CANCEL_POLL_S) if self._waiting else wait


def _pool_bytes(pool: MemoryPool) -> int:
    stats = pool.stats()
    return stats.in_use_bytes + stats.cached_bytes


def _call(fn: Callable[[T], None], arg: T) -> None:
    """A reservation's callback, from the budget's thread: its failure is its chat's, not ours."""
    try:
        fn(arg)
    except Exception:
        log.exception("memory budget: a reservation callback failed")


class LazyModel:
    """A budgeted model version as routes see it: validation and metadata from the model as last
    loaded; before its first load, the batch size only (the full check runs when it loads)."""

    def __init__(self, budget: MemoryBudget, slot: Slot, version: int) -> None:
        self._budget, self._slot, self.version = budget, slot, version

    @property
    def name(self) -> str:
        return self._slot.name

    @property
    def config(self) -> ModelConfig:
        return self._slot.config

    def served(self) -> ServedModel | None:
        """The real model while resident (a pipeline step), else None."""
        resident = self._slot.resident
        return resident[self.version][0] if resident is not None else None

    def validate(self, feed: dict[str, np.ndarray]) -> int:
        known = self._slot.shape.get(self.version)
        if known is not None:
            return known.validate(feed)
        if not feed:
            raise BadInput(f"model '{self.name}': no inputs")
        if self.config.max_batch_size == 0:
            return 1
        batches = {v.shape[0] if v.ndim else -1 for v in feed.values()}
        batch = batches.pop() if len(batches) == 1 else -1
        if not 1 <= batch <= self.config.max_batch_size:
            raise BadInput(
                f"model '{self.name}': inputs need one batch size in 1..{self.config.max_batch_size} "
                f"(max_batch_size), got {sorted({v.shape[0] if v.ndim else 0 for v in feed.values()})}"
            )
        return batch

    def metadata(self) -> dict[str, Any]:
        known = self._slot.shape.get(self.version)
        if known is not None:
            return known.metadata()
        return {
            "name": self.name,
            "versions": [str(self.version)],
            "platform": "onnxruntime_onnx",
            "inputs": [_declared(t, self.config) for t in self.config.inputs],
            "outputs": [_declared(t, self.config) for t in self.config.outputs],
        }


def _declared(t: TensorConfig, config: ModelConfig) -> dict[str, Any]:
    dims = ([-1] if config.max_batch_size > 0 else []) + list(t.dims)
    return {"name": t.name, "datatype": KSERVE_DTYPES[t.dtype], "shape": dims}


class LazyQueue:
    """The queue routes submit to: the resident batcher, or a wait for memory."""

    def __init__(self, budget: MemoryBudget, slot: Slot, version: int) -> None:
        self._budget, self._slot, self._version = budget, slot, version
        self.name = slot.name

    def submit(self, request: Any) -> Future[Any]:
        return self._budget.submit(self._slot, self._version, request)

    def depth(self) -> int:
        resident = self._slot.resident
        queued = resident[self._version][1].depth() if resident is not None else 0
        return len(self._slot.pending) + queued

    def close(self, drain: bool = True) -> None:
        self._budget.remove(self._slot, drain)
