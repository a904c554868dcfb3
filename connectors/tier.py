"""What the two tier connectors (offloading, shared_storage) share: prefix-hash keys and the
scheduler side that decides, per request, which chunks to load from the tier and which to save.

A chunk is ``chunk_blocks`` consecutive KV blocks; its key is the SHA-256 of the token ids of
every chunk up to and including it (:meth:`kvconf.contract.api.Request.prefix_hashes`), so two requests that
share a prompt prefix share the keys of its chunks. The scheduler side never moves bytes: it asks
the tier's index what it holds and hands the worker side :class:`TierMetadata`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from kvconf.contract.api import KVCacheBlocks, KVConnectorMetadata, Request, SchedulerOutput
from kvconf.contract.base import KVConnectorBase
from kvconf.contract.capabilities import ComparesToBaseline, ExplainsFailures, ExportsToVLLM, SupportsHMA
from kvconf.contract.saves import SavePlans
from kvconf.runtime.views import byte_views


@dataclass
class Chunk:
    key: bytes
    block_ids: tuple[list[int], ...]
    """The chunk's block ids in each KV-cache group: a layer's pages lie at its own group's ids."""
    place: Any = None
    """Where the tier keeps it (the offloading tier's slot); None where the key says it all."""


@dataclass
class TierOp:
    request_id: str
    chunks: list[Chunk]


@dataclass
class TierMetadata(KVConnectorMetadata):
    loads: list[TierOp] = field(default_factory=list)
    saves: list[TierOp] = field(default_factory=list)


def _slice(groups: tuple[list[int], ...], start: int, stop: int) -> tuple[list[int], ...]:
    return tuple(list(ids[start:stop]) for ids in groups)


class StepLoads:
    """A step's layered loads: which layers a thread has claimed, which are in, their errors.
    The I/O thread claims layers in the model's order; the forward pass's thread may claim the
    one it waits for, or the next one nobody has begun.

    >>> s = StepLoads([], ["a", "b", "c"])
    >>> s.claim(), s.claim("a"), s.claim("c")
    ('a', 'b', 'c')
    >>> s.done("c", {}), s.done("a", {1: "bad"}), s.events["a"].is_set(), s.done("b", {})
    (False, False, True, True)
    >>> s.errors, s.events["b"].is_set()
    ({1: 'bad'}, False)
    """

    def __init__(self, ops: list[TierOp], order: list[str]) -> None:
        self.ops, self.order, self.t0 = ops, order, time.perf_counter()
        self.events = {name: threading.Event() for name in order}
        self.errors: dict[int, str] = {}
        self._claimed: set[str] = set()
        self._left = len(order)
        self._lock = threading.Lock()

    def claim(self, first: Optional[str] = None) -> Optional[str]:
        """A layer for the calling thread to load: ``first`` if nobody has begun it, else the
        first in order that nobody has; None when every layer is taken."""
        with self._lock:
            if first is not None and first not in self._claimed:
                self._claimed.add(first)
                return first
            name = next((n for n in self.order if n not in self._claimed), None)
            if name is not None:
                self._claimed.add(name)
            return name

    def done(self, name: str, errors: dict[int, str]) -> bool:
        """Layer ``name`` is in: its event is set, unless it is the step's last (True then: the
        caller records the step's errors and time, then sets every event)."""
        with self._lock:
            self.errors.update(errors)
            self._left -= 1
            last = self._left == 0
        if not last:
            self.events[name].set()
        return last


class TierConnector(KVConnectorBase, SupportsHMA, ExplainsFailures, ExportsToVLLM, ComparesToBaseline):
    """Scheduler side by prefix hash; the worker side loads a step's chunks in ``start_load_kv``
    and saves them in ``wait_for_save``. Subclasses give the tier: ``_present``, ``_reserve``,
    ``_commit``, ``_abandon``, ``_load_chunks`` (or ``_load``) and ``_save``. Benchmarked
    against the fastest plain host copy of the same blocks unless a subclass says otherwise.
    Handles a hybrid model's groups: a chunk holds each group's block ids, and each layer's
    pages are copied at its own group's ids (:meth:`ids_of`)."""

    chunk_blocks = 1

    def __init__(self, config, role, kv_cache_config) -> None:
        super().__init__(config, role, kv_cache_config)
        self._block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        self._pending = TierMetadata()
        self._group_of = kv_cache_config.group_of()
        self._unconfirmed: dict[str, list[Chunk]] = {}
        self._plans = SavePlans()
        """Saves planned per request, sent to the worker as the engine computes their chunks."""
        self._computed: dict[str, int] = {}
        """Tokens the engine had already, per request, as its last lookup was told."""
        self._held: dict[str, int] = {}
        """Leading chunks the tier held at a request's last lookup (its own hit, loaded or not)."""
        self._views: dict[str, Any] = {}
        self._saved_requests: set[str] = set()
        self._load_errors: dict[int, str] = {}
        self._save_errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._layer_order: list[str] = []
        self._io: Optional[ThreadPoolExecutor] = None
        """The worker's I/O thread (layered tiers): one, so that a step's layers go in order."""
        self._step_loads: Optional[StepLoads] = None
        """The layered loads of the step under way (None where it loads nothing layer by layer)."""
        self._loading: Any = None
        self._layers_saved: set[str] = set()
        self._save_jobs: list[Any] = []
        self._save_busy = 0.0
        self._totals = {"loaded_bytes": 0.0, "load_seconds": 0.0, "load_wait_seconds": 0.0, "saved_bytes": 0.0,
                        "save_seconds": 0.0, "save_wait_seconds": 0.0}

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_blocks * self._block_size

    def keys(self, request: Request) -> list[bytes]:
        """Keys of the request's full chunks that a load may cover (the prefix hash of each chunk's
        last block, kept by the request: never computed twice); the last token is always computed
        by the engine, so a chunk that ends with it is not among them."""
        return self.save_keys(request)[:(request.num_tokens - 1) // self.chunk_tokens]

    def save_keys(self, request: Request) -> list[bytes]:
        """Keys of every full chunk of the request's tokens (a prompt of exactly N chunks saves N:
        a later prompt that extends it loads them all)."""
        k = self.chunk_blocks
        return request.prefix_hashes(self._block_size)[k - 1::k][:request.num_tokens // self.chunk_tokens]

    # ---- the tier (subclasses) -----------------------------------------------------------------
    def _present(self, keys: list[bytes]) -> int:
        """How many leading ``keys`` the tier holds (no side effects)."""
        raise NotImplementedError

    def _reserve(self, keys: list[bytes], loading: list[bytes]) -> list[Any]:
        """A place for each new key to be saved (None: do not save it); may evict, never ``loading``."""
        return [None] * len(keys)

    def _touch(self, keys: list[bytes]) -> None:
        """The keys were used (for LRU)."""

    def _places(self, keys: list[bytes]) -> list[Any]:
        """Where the tier holds each of ``keys``, for the worker to load them from."""
        return [None] * len(keys)

    def _commit(self, chunks: list[Chunk]) -> None:
        """The worker saved these chunks: the tier now holds them."""

    def _abandon(self, chunks: list[Chunk]) -> None:
        """The save of these chunks failed: release what ``_reserve`` set aside."""

    def _load_chunks(self, op: TierOp) -> dict[int, str]:
        """Copies the op's chunks into the KV cache; ``block id -> reason`` for what failed."""
        raise NotImplementedError

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        """Tokens the tier holds beyond the ``num_computed_tokens`` the engine has already (its own
        prefix cache). Loads start at a chunk boundary: where the engine's hit ends inside a chunk,
        the tier offers nothing (it would overwrite blocks the engine shares)."""
        if not self.is_consumer:
            return 0, False
        self._computed[request.request_id] = num_computed_tokens  # where the loads begin, for update_state_after_alloc
        self._held.pop(request.request_id, None)
        if num_computed_tokens % self.chunk_tokens:
            return 0, False
        held = self._present(self.keys(request))
        self._held[request.request_id] = held
        hit = held * self.chunk_tokens
        return max(0, hit - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Loads the tier's chunks after the engine's own hit, and plans the saves of every full
        chunk after those: they go to the worker once the engine has computed them
        (:meth:`build_connector_meta`)."""
        groups = blocks.get_block_ids()
        k = self.chunk_blocks
        start = self._computed.pop(request.request_id, 0) // self.chunk_tokens
        n_load = num_external_tokens // self.chunk_tokens
        loading = self.keys(request)[start:start + n_load]
        if loading:
            self._touch(loading)
            places = self._places(loading)
            self._pending.loads.append(TierOp(request.request_id, [
                Chunk(key, _slice(groups, i * k, (i + 1) * k), place)
                for i, (key, place) in enumerate(zip(loading, places), start)]))
        if self.is_producer:
            # never a chunk the tier holds already (another child of a multi connector may be the
            # one loading it): a disk segment named by its first chunk would replace another's
            first = max(start + n_load, self._held.pop(request.request_id, 0))
            todo = [(i, key) for i, key in enumerate(self.save_keys(request)) if i >= first]
            self._plans.plan(request.request_id, todo, groups)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """The step's loads, and the saves of every planned chunk that the step has computed
        (:class:`~kvconf.contract.saves.SavePlans`)."""
        pinned = [c.key for op in self._pending.loads for c in op.chunks]
        k = self.chunk_blocks
        for rid, ready, groups in self._plans.ready(scheduler_output, k, self.chunk_tokens):
            places = self._reserve([key for _, key in ready], pinned)
            chunks = [Chunk(key, _slice(groups, i * k, (i + 1) * k), place)
                      for (i, key), place in zip(ready, places) if place is not False]
            if chunks:
                self._pending.saves.append(TierOp(rid, chunks))
                self._unconfirmed.setdefault(rid, []).extend(chunks)
        meta, self._pending = self._pending, TierMetadata()
        return meta

    def update_connector_output(self, finished_sending: set[str], finished_recving: set[str]) -> None:
        for rid in finished_sending:
            chunks = self._unconfirmed.pop(rid, None)
            if chunks:
                self._commit(chunks)

    def report_save_failed(self, request_id: str) -> None:
        """The worker could not save the request's chunks."""
        chunks = self._unconfirmed.pop(request_id, None)
        if chunks:
            self._abandon(chunks)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        """Saves planned and not yet sent are dropped (the blocks go); those sent keep the blocks
        until the worker reports them."""
        self._plans.drop(request.request_id)
        self._computed.pop(request.request_id, None)
        self._held.pop(request.request_id, None)
        return request.request_id in self._unconfirmed, None

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, Optional[dict[str, Any]]]:
        return self.request_finished(request, block_ids[0])

    def ids_of(self, chunk: Chunk, layer: str) -> list[int]:
        """The block ids of ``chunk`` where ``layer`` keeps its pages (its group's)."""
        return chunk.block_ids[self._group_of[layer]]

    # ---- worker side -------------------------------------------------------------------------
    layered = False
    """The tier moves a step's pages layer by layer on its I/O thread (:meth:`_load_layer`,
    :meth:`_begin_save`, :meth:`_save_layer`, :meth:`_end_save`); else in one batch on the calling
    thread (:meth:`_load`, :meth:`_save`)."""

    parallel_loads = False
    """A layered tier whose :meth:`_load_layer` may run for two layers of a step at once, in any
    order: the forward pass's thread, waiting for a layer, then loads layers itself (two cores
    copy where one did; the thread would only wait)."""

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._views = byte_views(kv_caches)
        self._layer_order = list(self._views)

    def _io_pool(self) -> ThreadPoolExecutor:
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="kvconf-tier-io")
        return self._io

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """The step's loads. Layered: started on the I/O thread, layer by layer in the model's
        order, and :meth:`wait_for_layer_load` waits for one layer's pages alone, so that the
        forward pass computes a layer while the next one loads. Else all of them, here."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierMetadata)
        self._step_loads = None
        if not any(op.chunks for op in meta.loads):
            return
        if not self.layered:
            t0 = time.perf_counter()
            errors = self._load(meta.loads)
            self._tally("load", time.perf_counter() - t0, self._op_bytes(meta.loads))
            if errors:
                with self._lock:
                    self._load_errors.update(errors)
            return
        step = self._step_loads = StepLoads(meta.loads, list(self._layer_order))

        def run() -> None:
            while (name := step.claim()) is not None:
                self._load_one(step, name)

        self._loading = self._io_pool().submit(run)

    def _load_one(self, step: StepLoads, name: str) -> None:
        """Loads layer ``name`` of the step (claimed by this thread); the thread that ends the step's
        last layer records the errors and the time before that layer is said to be in."""
        try:
            errors = self._load_layer(step.ops, name)
        except Exception as exc:
            why = f"loading layer {name} failed: {type(exc).__name__}: {exc}"
            errors = {b: why for op in step.ops for c in op.chunks for ids in c.block_ids for b in ids}
        if step.done(name, errors):
            self._tally("load", time.perf_counter() - step.t0, self._op_bytes(step.ops))
            if step.errors:
                with self._lock:
                    self._load_errors.update(step.errors)
            for ev in step.events.values():
                ev.set()

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Returns once ``layer_name``'s pages of the step's loads are in (at once where nothing
        loads). Where the tier allows it (:attr:`parallel_loads`), this thread, which has nothing
        else to do meanwhile, loads the layers the I/O thread has not begun, this one first."""
        step = self._step_loads
        ev = step.events.get(layer_name) if step is not None else None
        if step is None or ev is None or ev.is_set():
            return
        t0 = time.perf_counter()
        if self.parallel_loads:
            while not ev.is_set() and (name := step.claim(layer_name)) is not None:
                self._load_one(step, name)
        ev.wait()
        self._totals["load_wait_seconds"] += time.perf_counter() - t0

    def _await_loads(self) -> None:
        """Waits for the loads in flight: their errors are known after."""
        loading = self._loading
        if loading is not None:
            loading.result()

    def _finish_loads(self) -> None:
        """Waits for the step's loads to end (errors included): before the step is reported."""
        if self._loading is not None:
            self._loading.result()
            self._loading = None
        self._step_loads = None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """Layered: starts copying this layer's pages of the step's saves (the forward pass has
        written them) on the I/O thread and returns. Else nothing: the step's saves are one batch in
        :meth:`wait_for_save`."""
        if not self.layered:
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, TierMetadata) or not meta.saves or layer_name in self._layers_saved:
            return
        if not self._layers_saved:
            self._save_jobs.append(self._io_pool().submit(self._timed, self._begin_save, meta.saves))
        self._layers_saved.add(layer_name)
        self._save_jobs.append(self._io_pool().submit(self._timed, self._save_layer, meta.saves, layer_name))

    def _timed(self, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._save_busy += time.perf_counter() - t0

    def wait_for_save(self) -> None:
        """Ends the step's saves: layered, waits for the layers' copies (a layer vLLM did not hand
        over is copied now) and completes them (:meth:`_end_save`); else saves every request of the
        step here. A request whose save failed is reported by :meth:`get_save_errors`, the others by
        :meth:`get_finished`."""
        self._finish_loads()
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierMetadata)
        if not meta.saves:
            return
        if self.layered:
            for name in self._layer_order:
                if name not in self._layers_saved:
                    self.save_kv_layer(name, None, None)
            jobs, self._save_jobs, self._layers_saved = self._save_jobs, [], set()
            waited = time.perf_counter()
            errors: dict[str, str] = {}
            for job in jobs:
                try:
                    errors.update(job.result() or {})
                except Exception as exc:
                    errors.update({op.request_id: f"{type(exc).__name__}: {exc}" for op in meta.saves})
            t0 = time.perf_counter()
            errors.update(self._end_save(meta.saves, errors))
            self._totals["save_wait_seconds"] += time.perf_counter() - waited
            busy, self._save_busy = self._save_busy, 0.0
            self._tally("save", busy + time.perf_counter() - t0, self._op_bytes(meta.saves))
        else:
            t0 = time.perf_counter()
            errors = self._save(meta.saves)
            self._tally("save", time.perf_counter() - t0, self._op_bytes(meta.saves))
        self._save_errors.update(errors)
        self._saved_requests.update(op.request_id for op in meta.saves if op.request_id not in errors)

    def _op_bytes(self, ops: list[TierOp]) -> int:
        pages = self.kv_cache_config.bytes_per_block
        return sum(len(c.block_ids[0]) for op in ops for c in op.chunks) * pages

    def _tally(self, side: str, seconds: float, nbytes: int) -> None:
        self._totals[f"{side}ed_bytes" if side == "load" else "saved_bytes"] += nbytes
        self._totals[f"{side}_seconds"] += seconds

    def transfer_totals(self) -> dict[str, float]:
        """Bytes and seconds of this worker's loads (from a step's start to its last layer in) and
        saves (the time spent copying and completing them), so far; and how long the engine waited
        for them (``load_wait_seconds``: in ``wait_for_layer_load``; ``save_wait_seconds``: in
        ``wait_for_save``): what the tier held the forward pass for."""
        return dict(self._totals)

    def _load(self, ops: list[TierOp]) -> dict[int, str]:
        """Loads the ops' chunks; ``block id -> reason`` for what failed. One op at a time unless
        a tier batches them."""
        errors: dict[int, str] = {}
        for op in ops:
            errors.update(self._load_chunks(op))
        return errors

    def _save(self, ops: list[TierOp]) -> dict[str, str]:
        """Saves the ops' chunks out of the KV cache; ``request id -> reason`` for what failed."""
        raise NotImplementedError

    def _load_layer(self, ops: list[TierOp], layer: str) -> dict[int, str]:
        """Layered tiers: one layer's pages of the ops' chunks into the KV cache; ``block -> reason``."""
        raise NotImplementedError

    def _begin_save(self, ops: list[TierOp]) -> dict[str, str]:
        """Layered tiers: before the first layer of a step's saves; ``request -> reason``."""
        return {}

    def _save_layer(self, ops: list[TierOp], layer: str) -> dict[str, str]:
        """Layered tiers: one layer's pages of the ops' chunks out of the KV cache; ``request -> reason``."""
        raise NotImplementedError

    def _end_save(self, ops: list[TierOp], failed: dict[str, str]) -> dict[str, str]:
        """Layered tiers: after every layer (``failed``: the requests that failed so far); ``request -> reason``."""
        return {}

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        done, self._saved_requests = self._saved_requests, set()
        return done or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._await_loads()
        with self._lock:
            return set(self._load_errors)

    def get_load_error_reasons(self) -> dict[int, str]:
        self._await_loads()
        with self._lock:
            errors, self._load_errors = self._load_errors, {}
            return errors

    def get_save_errors(self) -> dict[str, str]:
        errors, self._save_errors = self._save_errors, {}
        return errors

    def shutdown(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        self._views = {}
