"""The example connector: saves KV blocks into host memory and loads them back on a prefix hit.

Blocks are keyed by prefix hashes (:meth:`kvconf.contract.api.Request.prefix_hashes`), so a request
that shares a prompt prefix with an earlier one loads the shared blocks instead of recomputing
them. The store lives in this process and is shared by the scheduler-side and worker-side
connectors of one ``engine_id``, which is what kvconf's driver runs; it is not a transfer between
processes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

from kvconf.config.base import StrictModel
from kvconf.contract.api import (
    KVCacheBlocks,
    KVConnectorMetadata,
    KVConnectorRole,
    Request,
    SchedulerOutput,
)
from kvconf.contract.base import KVConnectorBase
from kvconf.contract.capabilities import ComparesToBaseline, SupportsHMA
from kvconf.contract.saves import SavePlans
from kvconf.runtime.views import byte_views
from kvconf.units import MemoryBytes, parse_bytes


class ExampleExtra(StrictModel):
    """Settings of the example connector."""

    capacity: MemoryBytes = "1GiB"
    """Most bytes the host store keeps; when full, the least recently used blocks are dropped."""


@dataclass
class _Transfer:
    request_id: str
    block_ids: tuple[list[int], ...]
    """The request's block ids in each KV-cache group (a layer's bytes are at its group's ids)."""
    keys: list[bytes]


@dataclass
class ExampleMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)


class _HostStore:
    """``key -> {layer: bytes of one block}``, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.blocks: OrderedDict[bytes, dict[str, Any]] = OrderedDict()
        self.lock = threading.Lock()

    def put(self, key: bytes, layer: str, data: Any) -> None:
        with self.lock:
            entry = self.blocks.setdefault(key, {})
            self.blocks.move_to_end(key)
            if layer in entry:
                self.used -= entry[layer].numel()
            entry[layer] = data
            self.used += data.numel()
            while self.used > self.capacity and len(self.blocks) > 1:
                _, old = self.blocks.popitem(last=False)
                self.used -= sum(t.numel() for t in old.values())

    def has(self, key: bytes, layers: int) -> bool:
        entry = self.blocks.get(key)
        return entry is not None and len(entry) == layers

    def get(self, key: bytes, layer: str) -> Any:
        with self.lock:
            self.blocks.move_to_end(key)
            return self.blocks[key][layer]


_STORES: dict[str, _HostStore] = {}


class ExampleConnector(KVConnectorBase, SupportsHMA, ComparesToBaseline):
    """Host-memory KV store with prefix reuse, for trying kvconf anywhere; benchmarked against the
    fastest plain host copy of the same blocks. Handles a hybrid model's KV-cache groups (each layer
    at its own group's block ids, the groups' tensors sharing one allocation)."""

    extra_config = ExampleExtra

    def __init__(self, config, role, kv_cache_config) -> None:
        super().__init__(config, role, kv_cache_config)
        capacity = parse_bytes(self.extra.capacity)
        self._store = _STORES.setdefault(str(config.engine_id), _HostStore(capacity))
        self._block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        self._num_layers = sum(len(g.layer_names) for g in kv_cache_config.kv_cache_groups)
        self._pending = ExampleMetadata()
        self._views: dict[str, Any] = {}
        self._group_of = kv_cache_config.group_of()
        self._plans = SavePlans()
        self._computed: dict[str, int] = {}
        """Tokens the engine had already, per request, as its last lookup was told."""

    # ---- scheduler side ----------------------------------------------------------------------
    def _matched_blocks(self, request: Request) -> list[bytes]:
        keys = request.prefix_hashes(self._block_size)
        # the engine always computes at least the last token itself
        keys = keys[: (request.num_tokens - 1) // self._block_size]
        n = 0
        while n < len(keys) and self._store.has(keys[n], self._num_layers):
            n += 1
        return keys[:n]

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        """Blocks the store holds beyond the ``num_computed_tokens`` the engine has already."""
        if not self.is_consumer:
            return 0, False
        self._computed[request.request_id] = num_computed_tokens
        if num_computed_tokens % self._block_size:
            return 0, False
        hit = len(self._matched_blocks(request)) * self._block_size
        return max(0, hit - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Loads the stored blocks after the engine's own hit; plans saves of the full blocks after
        those, sent as the engine computes them (:class:`~kvconf.contract.saves.SavePlans`)."""
        ids = blocks.get_block_ids()
        start = self._computed.pop(request.request_id, 0) // self._block_size
        keys = request.prefix_hashes(self._block_size)
        n_load = num_external_tokens // self._block_size
        if n_load:
            self._pending.loads.append(_Transfer(request.request_id, tuple(x[start:start + n_load] for x in ids),
                                                 keys[start:start + n_load]))
        if self.is_producer:
            self._plans.plan(request.request_id, [(i, k) for i, k in enumerate(keys) if i >= start + n_load], ids)

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, Optional[dict[str, Any]]]:
        self._plans.drop(request.request_id)
        self._computed.pop(request.request_id, None)
        return False, None  # saves complete within the step: nothing to hold

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        return self.request_finished_all_groups(request, (block_ids,))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        for rid, ready, groups in self._plans.ready(scheduler_output, 1, self._block_size):
            self._pending.saves.append(_Transfer(rid, tuple([g[i] for i, _ in ready] for g in groups),
                                                 [k for _, k in ready]))
        meta, self._pending = self._pending, ExampleMetadata()
        return meta

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._views = byte_views(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ExampleMetadata)
        for load in meta.loads:
            for name, view in self._views.items():
                for block_id, key in zip(load.block_ids[self._group_of[name]], load.keys):
                    view[block_id].copy_(self._store.get(key, name))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ExampleMetadata)
        view = self._views[layer_name]
        for save in meta.saves:
            for block_id, key in zip(save.block_ids[self._group_of[layer_name]], save.keys):
                self._store.put(key, layer_name, view[block_id].clone())

    def wait_for_save(self) -> None:
        return None  # saves complete in save_kv_layer

    def shutdown(self) -> None:
        if self.role is KVConnectorRole.WORKER:
            self._views.clear()
            _STORES.pop(str(self.config.engine_id), None)
            with self._store.lock:
                self._store.blocks.clear()
                self._store.used = 0
