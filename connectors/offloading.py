"""The offloading connector: KV blocks kept in a host-memory tier, reused on a prefix hit.

As vLLM's OffloadingConnector (``vllm/distributed/kv_transfer/kv_connector/v1/offloading_connector.py``): the scheduler side
keeps the tier's index (prefix-hash key -> slot, least recently used first) and decides what to
load and save; the worker side holds ``cpu_bytes_to_use`` bytes of host memory and copies blocks
between it and the KV cache. A full tier evicts; it never fails.

The copies overlap the forward pass, layer by layer, on the connector's I/O thread
(:class:`~kvconf_connectors.tier.TierConnector`): ``start_load_kv`` starts a step's loads and
``wait_for_layer_load`` returns once that layer's pages are in, so the engine computes layer i
while layer i + 1 loads; ``save_kv_layer`` starts copying the layer the engine has just written
and returns, and ``wait_for_save`` waits for the step's copies. Every request's chunks of the step
move in one torch call per layer and run of consecutive tier rows (usually one), as 8-byte words.
Where the KV cache is on a GPU, the host pool is pinned and each layer's copy is synchronised on
the I/O thread (no side stream yet).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from operator import attrgetter
from typing import Any, Literal

from pydantic import PositiveInt, model_validator

from kvconf.config.base import StrictModel
from kvconf.contract.capabilities import ChecksConfig
from kvconf.errors import ConfigError, Problem
from kvconf.units import MemoryBytes, format_bytes, parse_bytes
from kvconf_connectors.tier import Chunk, TierConnector, TierOp

Lru = Literal["lru"]
EvictionPolicy = Literal[Lru]


class OffloadingExtra(StrictModel):
    """Settings of the offloading connector (vLLM's names)."""

    cpu_bytes_to_use: MemoryBytes
    """Host memory for offloaded blocks (``4GiB``, bytes); replaces vLLM's retired ``num_cpu_blocks``."""
    block_size: PositiveInt | None = None
    """Tokens per offload chunk, a multiple of the KV cache's block size; unset means the same."""
    eviction_policy: EvictionPolicy = "lru"
    """Which chunks go when the tier is full: the least recently used."""

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if isinstance(data, dict) and "num_cpu_blocks" in data:
            raise ValueError(
                "num_cpu_blocks was retired (vLLM PR #24498); fix: give the tier's size in bytes with "
                "cpu_bytes_to_use instead, e.g. connector.extra.cpu_bytes_to_use=4GiB")
        return data


def _chunk_problems(extra: OffloadingExtra, kv_cache_config: Any) -> list[Problem]:
    """An offload chunk must be whole KV blocks, and the tier must hold at least one."""
    block = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    chunk_tokens = extra.block_size or block
    if chunk_tokens % block:
        return [Problem("connector.extra.block_size", f"an offload chunk of {chunk_tokens} tokens is not a whole "
                        f"number of KV blocks of {block} tokens", value=chunk_tokens,
                        fix=f"use a multiple of {block} (kv_cache.block_size)")]
    chunk_bytes = chunk_tokens // block * kv_cache_config.bytes_per_block
    capacity = parse_bytes(extra.cpu_bytes_to_use)
    if capacity < chunk_bytes:
        return [Problem("connector.extra.cpu_bytes_to_use", f"{format_bytes(capacity)} holds no chunk: one chunk is "
                        f"{chunk_tokens // block} block(s) x {kv_cache_config.bytes_per_block} B = {chunk_bytes} B",
                        value=extra.cpu_bytes_to_use, fix=f"give at least {chunk_bytes} B")]
    return []


class LRUIndex:
    """``key -> slot`` of a fixed number of slots, least recently used first.

    >>> idx = LRUIndex(2)
    >>> a, b = idx.reserve(b"a", set()), idx.reserve(b"b", set())
    >>> idx.commit(b"a"); idx.commit(b"b"); idx.touch(b"a")
    >>> idx.reserve(b"c", set()) == b          # b is the least recently used
    True
    >>> list(idx.order())
    [b'a', b'c']
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.free = list(range(slots - 1, -1, -1))
        self.entries: OrderedDict[bytes, tuple[int, bool]] = OrderedDict()  # key -> (slot, committed)
        self.committed: OrderedDict[bytes, None] = OrderedDict()
        """The committed keys alone, least recently used first: an eviction finds its victim at
        once, however many saves are still in flight."""
        self.evicted = 0

    def has(self, key: bytes) -> bool:
        e = self.entries.get(key)
        return e is not None and e[1]

    def touch(self, key: bytes) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)
            if key in self.committed:
                self.committed.move_to_end(key)

    def reserve(self, key: bytes, pinned: set[bytes]) -> int | None:
        """A slot for ``key``: a free one, else the least recently used committed key's."""
        if key in self.entries:
            return None  # already held or being saved
        if not self.free:
            victim = next((k for k in self.committed if k not in pinned), None)
            if victim is None:
                return None
            del self.committed[victim]
            self.free.append(self.entries.pop(victim)[0])
            self.evicted += 1
        slot = self.free.pop()
        self.entries[key] = (slot, False)
        return slot

    def commit(self, key: bytes) -> None:
        if key in self.entries:
            self.entries[key] = (self.entries[key][0], True)
            self.committed[key] = None
            self.committed.move_to_end(key)  # just saved: the most recently used

    def drop(self, key: bytes) -> None:
        self.committed.pop(key, None)
        e = self.entries.pop(key, None)
        if e is not None:
            self.free.append(e[0])

    def order(self) -> list[bytes]:
        """Keys from least to most recently used."""
        return list(self.entries)


def _spans(ids: list[int], most: int = 0) -> list[tuple[int, int, int]] | None:
    """``ids`` as ``(offset, first id, count)`` spans of consecutive ids, or None where they are too
    scattered for slices to pay (more spans than a quarter of the ids, at least 4): a gather or
    scatter by index then. A slice copies at memcpy speed; ``index_copy_`` scattered at a fraction.

    >>> _spans([7, 8, 9, 2, 3])
    [(0, 7, 3), (3, 2, 2)]
    >>> _spans([1, 5, 9, 13, 17, 21, 25, 29]) is None
    True
    """
    spans: list[tuple[int, int, int]] = []
    limit = most or max(4, len(ids) // 4)
    for i, x in enumerate(ids):
        if spans and x == spans[-1][1] + spans[-1][2]:
            at, first, n = spans[-1]
            spans[-1] = (at, first, n + 1)
        else:
            if len(spans) >= limit:
                return None
            spans.append((i, x, 1))
    return spans


def _gathers(ids: list[int]) -> list[tuple[int, int, int, Any]] | None:
    """How to load rows ``0..len(ids)-1`` of a pool run into blocks ``ids``: per run of consecutive
    block ids (in any order of the rows), ``(first block, count, first row, None)`` where the rows
    are consecutive too (a slice: a memcpy) or ``(first block, count, 0, row index)`` (a gather
    into the blocks' slice: a memcpy per page). An engine often hands a request's blocks out in
    descending order (it frees a request's blocks last first); those come out as one gather. None
    where the ids are too scattered (more runs than a quarter of them, at least 4): a scatter by
    index then.

    >>> _gathers([7, 8, 9, 2, 3])
    [(2, 2, 3, None), (7, 3, 0, None)]
    >>> [(b, n, at, None if ix is None else ix.tolist()) for b, n, at, ix in _gathers([12, 11, 10, 4])]
    [(4, 1, 3, None), (10, 3, 0, [2, 1, 0])]
    >>> _gathers([1, 5, 9, 13, 17, 21, 25, 29]) is None
    True
    """
    import torch

    order = sorted(range(len(ids)), key=ids.__getitem__)
    limit = max(4, len(ids) // 4)
    groups: list[list[int]] = []
    for i in order:
        if groups and ids[i] == ids[groups[-1][-1]] + 1:
            groups[-1].append(i)
        elif len(groups) >= limit:
            return None
        else:
            groups.append([i])
    out: list[tuple[int, int, int, Any]] = []
    for g in groups:
        if g == list(range(g[0], g[0] + len(g))):
            out.append((ids[g[0]], len(g), g[0], None))
        else:
            out.append((ids[g[0]], len(g), 0, torch.tensor(g, dtype=torch.int64)))
    return out


class OffloadingConnector(TierConnector, ChecksConfig):
    """Host-memory tier with LRU eviction."""

    extra_config = OffloadingExtra
    vllm_name = "OffloadingConnector"
    vllm_extra_keys = {"cpu_bytes_to_use": "cpu_bytes_to_use", "block_size": "block_size",
                       "eviction_policy": "eviction_policy"}

    def __init__(self, config, role, kv_cache_config) -> None:
        super().__init__(config, role, kv_cache_config)
        problems = _chunk_problems(self.extra, kv_cache_config)
        if problems:
            raise ConfigError(problems)
        self.chunk_blocks = (self.extra.block_size or self._block_size) // self._block_size
        self.chunk_bytes = self.chunk_blocks * kv_cache_config.bytes_per_block
        self.index = LRUIndex(parse_bytes(self.extra.cpu_bytes_to_use) // self.chunk_bytes)
        self._rows: dict[str, Any] = {}
        self._pool: dict[str, Any] = {}
        """``layer -> (rows, page)`` host tensor: row = slot x chunk_blocks + block in the chunk."""
        self._step_runs: Any = None

    @classmethod
    def config_problems(cls, connector: dict[str, Any], kv_cache_config: Any = None) -> list[Problem]:
        """The chunk against the plan, at check time (nothing is constructed then)."""
        if kv_cache_config is None:
            return []
        try:
            extra = OffloadingExtra.model_validate(connector.get("extra") or {})
        except ValueError:
            return []  # the extra model's own problems are reported already
        return _chunk_problems(extra, kv_cache_config)

    @classmethod
    def vllm_extra_config(cls, extra: Any) -> dict[str, Any]:
        out = super().vllm_extra_config(extra)
        out["cpu_bytes_to_use"] = parse_bytes(out["cpu_bytes_to_use"])
        return out

    # ---- the index (scheduler side) ------------------------------------------------------------
    def _present(self, keys: list[bytes]) -> int:
        n = 0
        while n < len(keys) and self.index.has(keys[n]):
            n += 1
        return n

    def _touch(self, keys: list[bytes]) -> None:
        for k in keys:
            self.index.touch(k)

    def _places(self, keys: list[bytes]) -> list[Any]:
        return [self.index.entries[k][0] for k in keys]

    def _reserve(self, keys: list[bytes], loading: list[bytes]) -> list[Any]:
        pinned = set(loading)
        out = []
        for k in keys:
            slot = self.index.reserve(k, pinned)
            out.append(False if slot is None else slot)
            pinned.add(k)
        return out

    def _commit(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            self.index.commit(c.key)

    def _abandon(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            self.index.drop(c.key)

    # ---- the host pool (worker side) -----------------------------------------------------------
    layered = True
    parallel_loads = True  # a layer's copies touch that layer's rows alone

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        import torch

        from kvconf.runtime.allocate import host_zeros  # the worker side alone: a contract check allocates nothing

        super().register_kv_caches(kv_caches)
        rows = self.index.slots * self.chunk_blocks
        # One pool, a slab per layer: a layer's rows are contiguous, so that a layer moves in one
        # gather or scatter of whole pages (as 8-byte words). Zeroed, so its pages are faulted in
        # now rather than during saves (fresh memory copies at ~4 GB/s here, touched memory at
        # ~15) and the host memory the tier is given is really held; in huge pages where the
        # kernel gives them (scattered saves into a cold pool of 4 KiB pages miss the TLB).
        self._rows = {n: v.view(torch.int64) if v.shape[1] % 8 == 0 else v for n, v in self._views.items()}
        pinned = any(v.device.type == "cuda" for v in self._views.values())
        widths = {n: r.shape[1] for n, r in self._rows.items()}
        if len(set(widths.values())) == 1 and len({r.dtype for r in self._rows.values()}) == 1:
            first = next(iter(self._rows.values()))
            slab = host_zeros((len(self._rows), rows, first.shape[1]), dtype=first.dtype, pin_memory=pinned)
            self._pool = {n: slab[i] for i, n in enumerate(self._rows)}
        else:  # layers of several page sizes (a hybrid model's groups): one buffer each
            self._pool = {n: host_zeros((rows, r.shape[1]), dtype=r.dtype, pin_memory=pinned)
                          for n, r in self._rows.items()}

    def _runs(self, ops: list[TierOp], save: bool) -> dict[int, list[tuple[int, int, Any, Any]]]:
        """``group -> [(first pool row, last row + 1, block ids, plan)]``: the chunks of ``ops`` as
        runs of consecutive pool rows, each with its blocks' ids as an index tensor and, where the
        ids are mostly consecutive (an engine hands a new request's blocks out in order, or in
        reverse), a plan of whole slices: spans to save (:func:`_spans`), gathers to load
        (:func:`_gathers`). Requests that share a prefix load the same rows into different blocks:
        a run never holds a row twice."""
        import torch

        k = self.chunk_blocks
        chunks = sorted((c for op in ops for c in op.chunks), key=attrgetter("place"))  # a chunk's rows are consecutive
        places = [c.place for c in chunks]
        runs: list[list[Chunk]] = []
        if len(set(places)) == len(places):  # each row once (every save, most loads): cut where a place is skipped
            cuts = [i for i in range(1, len(places)) if places[i] != places[i - 1] + 1]
            runs = [chunks[a:b] for a, b in zip([0, *cuts], [*cuts, len(chunks)]) if a < b]
        else:
            ending: dict[int, list[list[Chunk]]] = {}  # place -> runs whose last chunk is there
            for c in chunks:
                before = ending.get(c.place - 1)
                if before:
                    run = before.pop()
                    run.append(c)
                else:
                    run = [c]
                    runs.append(run)
                ending.setdefault(c.place, []).append(run)
        out: dict[int, list[tuple[int, int, Any, Any]]] = {}
        for g in range(len(runs[0][0].block_ids) if runs else 0):
            flat = [x for run in runs for c in run for x in c.block_ids[g]]
            ids = torch.frombuffer(array("q", flat), dtype=torch.int64)
            at, out[g] = 0, []
            for run in runs:
                n = len(run) * k
                part = flat[at:at + n]
                out[g].append((run[0].place * k, run[0].place * k + n, ids[at:at + n],
                               _spans(part) if save else _gathers(part)))
                at += n
        return out

    def _copy_layer(self, ops: list[TierOp], layer: str, save: bool) -> None:
        """One layer's pages of ``ops``' chunks between the KV cache and the pool: one gather or
        scatter per run of consecutive pool rows (usually one)."""
        import torch

        step = self._step_runs  # read once: another thread may be copying another op's layer
        if step is None or step[0] is not ops or step[1] != save:  # the step's runs, once for every layer
            step = self._step_runs = (ops, save, self._runs(ops, save))
        rows, pool = self._rows[layer], self._pool[layer]
        for first, end, ids, plan in step[2].get(self._group_of[layer], ()):
            dst = pool[first:end]
            if rows.device == pool.device and save:
                if plan is not None:  # slices: a memcpy each
                    for at, block, n in plan:
                        dst[at:at + n].copy_(rows[block:block + n])
                else:  # a gather: a memcpy per page
                    torch.index_select(rows, 0, ids, out=dst)
            elif rows.device == pool.device:
                if plan is not None and rows.is_contiguous():  # a gather writes a contiguous slice
                    for block, n, at, index in plan:
                        if index is None:  # a slice: a memcpy
                            rows[block:block + n].copy_(dst[at:at + n])
                        else:  # a gather into the blocks' slice: a memcpy per page
                            torch.index_select(dst, 0, index, out=rows[block:block + n])
                else:  # scattered: a scatter by index (about a third of memcpy's speed)
                    rows.index_copy_(0, ids, dst)
            else:  # a GPU cache: through the pinned pool, synchronised per layer
                ids = ids.to(rows.device)
                if save:
                    dst.copy_(rows.index_select(0, ids))
                else:
                    rows.index_copy_(0, ids, dst.to(rows.device, non_blocking=True))
                torch.cuda.synchronize(rows.device)

    def _load_layer(self, ops: list[TierOp], layer: str) -> dict[int, str]:
        self._copy_layer(ops, layer, save=False)  # a host copy does not fail
        return {}

    def _save_layer(self, ops: list[TierOp], layer: str) -> dict[str, str]:
        try:
            self._copy_layer(ops, layer, save=True)
        except Exception as exc:
            return {op.request_id: f"{exc}" for op in ops}
        return {}

    def shutdown(self) -> None:
        super().shutdown()
        self._pool = {}
        self._rows = {}
        self._step_runs = None

