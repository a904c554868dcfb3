"""``KVConfConnector``: vLLM's ``KVConnectorBase_V1`` around a kvconf connector.

vLLM constructs it as ``cls(vllm_config, role, kv_cache_config)`` in both roles; it runs kvconf's
pipeline on the connector tree its ``kv_connector_extra_config`` carries (validate, resolve,
contract, the connector's checks against vLLM's own plan) and builds the declared connector with
kvconf's three arguments, fed from vLLM's. Every ``KVConnectorBase_V1`` method vLLM 0.32 calls is
answered, by the kvconf connector where its API has the method, here where it does not.

How a step's outcome travels, in both of vLLM's process layouts (one process, or the scheduler in
the engine core and the worker in a worker process): the worker's saves that finished and those
that failed go back to the scheduler each step as worker metadata (vLLM's
``build_connector_worker_meta``), where the connector records them in its index; a request whose
blocks the scheduler kept at its end (``request_finished`` returned True) is named to the worker in
the next step's metadata, and the worker reports it finished (``get_finished``) once every save of
it is done, so vLLM frees exactly the requests it kept. Blocks that failed to load are reported
with ``get_block_ids_with_load_errors`` (vLLM then recomputes or fails the request by its
``kv_load_failure_policy``), each with the connector's reason in a log line and in the stats.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvconf.contract import signature as contract
from kvconf.contract.api import KVCacheBlocks
from kvconf.contract.api import KVConnectorMetadata as KVConfMetadata
from kvconf.contract.api import KVConnectorRole as KVConfRole
from kvconf.contract.capabilities import ExplainsFailures
from kvconf.errors import ConfigError

from .adapt import RequestCache, kv_cache_data, own_plan, page_problems, plan_differences
from .adapt import scheduler_output as kvconf_step
from .tree import check_tree, connector_tree

__all__ = ["KVConfConnector", "KVConfStats", "check_at_resolution"]

log = logging.getLogger("vllm.kvconf")  # under vLLM's logger: its handler and format


def _transfer_config_in_caller(depth: int = 12) -> Any:
    """The ``KVTransferConfig`` that vLLM's factory is resolving the class for: a local variable
    of one of the calling frames (``get_connector_class(kv_transfer_config)``), or None."""
    frame: Optional[FrameType] = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        for value in frame.f_locals.values():
            if type(value).__name__ == "KVTransferConfig" and hasattr(value, "kv_connector_extra_config"):
                return value
        frame = frame.f_back
    return None


_CHECKED: dict[str, None] = {}
"""Trees already checked at resolution (vLLM resolves the class several times)."""


def check_at_resolution() -> None:
    """Runs kvconf's checks on the tree vLLM is resolving the plug-in for, where it can be found;
    raises kvconf's error (a ``ValueError``) so that vLLM's config validation stops with it."""
    transfer = _transfer_config_in_caller()
    if transfer is None:
        return
    import json

    try:
        key = json.dumps(transfer.kv_connector_extra_config, sort_keys=True, default=str)
    except (TypeError, ValueError):
        key = repr(transfer.kv_connector_extra_config)
    if key in _CHECKED:
        return
    check_tree(connector_tree(transfer.kv_connector_extra_config), "worker", transfer, None)
    _CHECKED[key] = None


def _saving(meta: Any) -> set[str]:
    """The requests a kvconf connector's step metadata saves: its ``saves`` ops (the tiers, the
    example connector), a multi connector's children's."""
    out = {op.request_id for op in getattr(meta, "saves", ())}
    for child in getattr(meta, "children", ()):
        out |= _saving(child)
    return out


# ---- what travels between the two sides ------------------------------------------------------------
@dataclass
class PluginMetadata(KVConnectorMetadata):
    """Scheduler -> worker, each step: the kvconf connector's metadata, and the requests whose
    blocks the scheduler kept at their end (the worker reports them finished once saved)."""

    inner: KVConfMetadata
    kept: set[str] = field(default_factory=set)


@dataclass
class PluginWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, each step: requests whose saves finished, and those whose save failed
    (with the reason)."""

    saved: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, PluginWorkerMetadata)
        return PluginWorkerMetadata(self.saved | other.saved, {**self.failed, **other.failed})


@dataclass
class PluginHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler, once at start-up: what the connector's worker tells its scheduler side
    (a prefill's side-channel address)."""

    data: dict[str, Any]


@dataclass
class KVConfStats(KVConnectorStats):
    """Counts of one interval: blocks loaded and refused (a failed check), saves that failed."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


# ---- the plug-in -----------------------------------------------------------------------------------
class KVConfConnector(KVConnectorBase_V1):
    """A kvconf connector in vLLM: ``kv_connector_extra_config`` carries its tree."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        side = "worker" if role == KVConnectorRole.WORKER else "scheduler"
        tree = connector_tree(transfer.kv_connector_extra_config)
        if tree.get("engine_id") is None and transfer.engine_id:
            # one id for both sides of this vLLM instance (vLLM's, made once per instance): a
            # connector whose scheduler and worker meet through it finds itself
            tree = {**tree, "engine_id": transfer.engine_id}
        kv = kv_cache_data(kv_cache_config)
        job = check_tree(tree, side, transfer, kv)
        assert job.cfg is not None and job.cls is not None and job.resolved is not None
        self._kvconf_kv_cache = job.cfg.kv_cache_config_for(hybrid=False)
        problems = page_problems(kv_cache_config, self._kvconf_kv_cache)
        if problems:
            raise ConfigError(problems)
        self.plan_differences = self._compare_plans(vllm_config, kv_cache_config) if side == "scheduler" else []
        self.inner = job.cls(job.cfg.connector, KVConfRole.from_name(side), self._kvconf_kv_cache)
        contract.check_received(self.inner, self._kvconf_kv_cache, module=job.resolved.module,
                                attribute=job.resolved.attribute)
        self.name = job.cfg.connector.name
        log.info("kvconf: %s connector (%s) constructed on the %s side", self.name, job.cls.__qualname__, side)
        # scheduler side
        self._requests = RequestCache()
        self._kept: set[str] = set()
        # worker side
        self._kept_by_scheduler: set[str] = set()
        self._had_saves: set[str] = set()
        self._saved: set[str] = set()
        self._to_report = PluginWorkerMetadata()
        self._stats: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def _compare_plans(self, vllm_config: Any, kv_cache_config: Any) -> list[str]:
        cache, model, sched = vllm_config.cache_config, vllm_config.model_config, vllm_config.scheduler_config
        dtype = self._kvconf_kv_cache.kv_cache_groups[0].kv_cache_spec.model_dump().get("dtype", "bfloat16")
        budget = sum(t.size for t in kv_cache_config.kv_cache_tensors)
        ours, why = own_plan(model.model, cache.block_size, dtype, budget, model.max_model_len,
                             sched.max_num_batched_tokens)
        if ours is None:
            log.warning("kvconf: did not plan the KV cache itself to compare with vLLM's: %s", why)
            return []
        differences = plan_differences(self._kvconf_kv_cache, ours)
        if differences:
            for d in differences:
                log.warning("kvconf: vLLM's KV-cache plan differs from kvconf's for the same model and budget: %s", d)
        else:
            log.info("kvconf: vLLM's KV-cache plan equals kvconf's for the same model and budget (num_blocks=%d, "
                     "%d group(s), %d tensor(s))", ours.num_blocks, len(ours.kv_cache_groups),
                     len(ours.kv_cache_tensors))
        return differences

    # ---- worker side ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.inner.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, PluginMetadata)
        self._kept_by_scheduler |= connector_metadata.kept
        self.inner.bind_connector_metadata(connector_metadata.inner)
        self._had_saves |= _saving(connector_metadata.inner)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self.inner.clear_connector_metadata()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """vLLM's hook before preempted requests' blocks are reused: the connector's, where it has
        one (kvconf's tiers save within the step, so nothing of theirs is in flight then)."""
        hook = getattr(self.inner, "handle_preemptions", None)
        if callable(hook) and isinstance(kv_connector_metadata, PluginMetadata):
            hook(kv_connector_metadata.inner)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.inner.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.inner.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        self.inner.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self.inner.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        sending, recving = self.inner.get_finished(finished_req_ids)
        failed = self.inner.get_save_errors() if isinstance(self.inner, ExplainsFailures) else {}
        for rid, why in failed.items():
            log.warning("kvconf: %s could not save request %s: %s", self.name, rid, why)
            self._count("failed_saves", 1)
        done = set(sending or ()) | set(failed)
        if set(sending or ()) - set(failed):
            self._count("saved_requests", len(set(sending or ()) - set(failed)))
        self._to_report.saved |= set(sending or ()) - set(failed)
        self._to_report.failed.update(failed)
        self._saved |= done
        holds = getattr(self.inner, "holds_finished_requests", False)  # reports its kept requests itself
        finished = {rid for rid in self._kept_by_scheduler
                    if rid in self._saved or (rid not in self._had_saves and not holds)}
        self._kept_by_scheduler -= finished
        self._saved -= finished
        self._had_saves -= finished
        for rid in finished_req_ids:  # ended without being kept: nothing more is reported for them
            if rid not in self._kept_by_scheduler:
                self._saved.discard(rid)
                self._had_saves.discard(rid)
        return finished or None, set(recving) if recving else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        bad = set(self.inner.get_block_ids_with_load_errors())
        if isinstance(self.inner, ExplainsFailures):
            reasons = self.inner.get_load_error_reasons()
            for why in sorted(set(reasons.values())):
                blocks = sorted(b for b, w in reasons.items() if w == why)
                log.warning("kvconf: %s refused %d block(s) %s: %s", self.name, len(blocks), blocks[:8], why)
            bad |= set(reasons)
        if bad:
            self._count("refused_blocks", len(bad))
        return bad

    def build_connector_worker_meta(self) -> Optional[KVConnectorWorkerMetadata]:
        if not self._to_report.saved and not self._to_report.failed:
            return None
        out, self._to_report = self._to_report, PluginWorkerMetadata()
        return out

    def get_kv_connector_stats(self) -> Optional[KVConnectorStats]:
        if not any(self._stats.values()):
            return None
        out, self._stats = KVConfStats(data=self._stats), {}
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict[str, Any]] = None) -> Optional[KVConnectorStats]:
        return KVConfStats(data=dict(data or {}))

    def transfer_totals(self) -> dict[str, float]:
        """The kvconf connector's bytes and seconds of loads and saves so far (``loaded_bytes``,
        ``load_seconds``, ``saved_bytes``, ``save_seconds``), where it keeps them: for benchmarks."""
        hook = getattr(self.inner, "transfer_totals", None)
        return dict(hook()) if callable(hook) else {}

    def _count(self, key: str, n: int) -> None:
        self._stats[key] = self._stats.get(key, 0) + n
        self.totals[key] = self.totals.get(key, 0) + n

    def shutdown(self) -> None:
        if self.totals:
            log.info("kvconf: %s totals: %s", self.name, ", ".join(f"{k}={v}" for k, v in sorted(self.totals.items())))
        self.inner.shutdown()

    # ---- scheduler side ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        n, is_async = self.inner.get_num_new_matched_tokens(self._requests(request), num_computed_tokens)
        if n is None:
            return None, False
        n = min(n, request.num_tokens - 1 - num_computed_tokens)  # vLLM computes the last token itself
        return (n, is_async) if n > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        ids = tuple(list(g) for g in blocks.get_block_ids())
        self.inner.update_state_after_alloc(self._requests(request), KVCacheBlocks(ids), num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = PluginMetadata(self.inner.build_connector_meta(kvconf_step(scheduler_output)), self._kept)
        self._kept = set()
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, PluginWorkerMetadata):
            for rid in meta.failed:
                if isinstance(self.inner, ExplainsFailures):
                    self.inner.report_save_failed(rid)
            self.inner.update_connector_output(meta.saved, set())

    def on_new_request(self, request: Any) -> None:
        hook = getattr(self.inner, "on_new_request", None)
        if callable(hook):
            hook(self._requests(request))

    def get_handshake_metadata(self) -> Optional[KVConnectorHandshakeMetadata]:
        """Worker, once: what the connector's scheduler side needs of it (a prefill's side-channel
        address), carried by vLLM to :meth:`set_xfer_handshake_metadata`."""
        hook = getattr(self.inner, "handshake", None)
        found = hook() if callable(hook) else None
        return PluginHandshake(found) if found else None

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        hook = getattr(self.inner, "set_handshake", None)
        for rank in sorted(metadata):
            item = metadata[rank]
            if callable(hook) and isinstance(item, PluginHandshake):
                hook(item.data)
                return

    def has_pending_push_work(self) -> bool:
        hook = getattr(self.inner, "has_pending_push_work", None)
        return bool(hook()) if callable(hook) else False

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        mine = self._requests(request)
        mine.num_computed_tokens = request.num_computed_tokens
        mine.aborted = str(getattr(request.status, "name", request.status)) not in (
            "FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")
        delay, params = self.inner.request_finished(mine, block_ids)
        self._requests.forget(request.request_id)
        if delay:
            self._kept.add(request.request_id)
        return delay, params

    def shutdown_scheduler(self) -> None:  # pragma: no cover - vLLM calls shutdown on both sides
        self.shutdown()
