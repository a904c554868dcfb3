"""A small engine: drives a connector through its scheduler and worker methods as vLLM does.

For ``action=run`` (and conformance tests and benchmarks): requests whose KV blocks carry a known
pattern are computed and saved through the connector, their blocks are wiped, the same prompts
come back, and what the connector loads is checked byte for byte.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .connector import KVCacheBlocks, KVConnectorBase, KVConnectorMetadata, KVConnectorRole, Request, SchedulerOutput
from .errors import ConnectorRuntimeError, Problem
from .units import parse_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Workload", "plan_workload", "run_self_test"]


@dataclass(frozen=True)
class Workload:
    """Requests the driver runs: each takes ``blocks_per_request`` full blocks plus one token."""

    requests: int
    blocks_per_request: int
    block_size: int

    def prompt(self, r: int) -> list[int]:
        n = self.blocks_per_request * self.block_size + 1
        return [(r * 7919 + i * 31) % 32000 for i in range(n)]


def plan_workload(connector: KVConnectorBase, settings: Any) -> Workload:
    """As many blocks per request as fit both the cache (save and load sets side by side) and
    ``settings.max_bytes`` per pass."""
    cfg = connector.kv_cache_config
    requests = int(getattr(settings, "requests", 4))
    max_bytes = parse_bytes(getattr(settings, "max_bytes", "64MiB"))
    by_bytes = max(1, max_bytes // max(cfg.bytes_per_block, 1))
    by_cache = max(1, cfg.num_blocks // 2)
    total = min(by_bytes, by_cache)
    requests = max(1, min(requests, total))
    return Workload(requests, max(1, total // requests),
                    cfg.kv_cache_groups[0].kv_cache_spec.block_size)


def _byte_views(kv_caches: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Each layer as ``(num_blocks, page bytes)`` uint8, viewing the same memory."""
    import torch

    return {n: t.flatten(1).view(torch.uint8) for n, t in kv_caches.items()}


def run_self_test(worker: KVConnectorBase, kv_caches: Optional[dict[str, "torch.Tensor"]],
                  settings: Any) -> dict[str, Any]:
    """Save then load through ``worker`` (and a scheduler-side twin); every loaded byte verified."""
    if worker.role is KVConnectorRole.SCHEDULER or kv_caches is None:
        return _scheduler_only(worker, settings)
    import torch

    from .pattern import block_pattern

    cls, cfg = type(worker), worker.kv_cache_config
    # A producer saves and a consumer loads: the side that ``worker`` is not is played by a twin
    # with the other kv_role and the same engine_id, as the other instance of a P/D pair would.
    saver = worker if worker.is_producer else _twin(worker, "kv_producer", kv_caches)
    loader = worker if worker.is_consumer else _twin(worker, "kv_consumer", kv_caches)
    sched_save = cls(saver.config, KVConnectorRole.SCHEDULER, cfg)
    sched_load = sched_save if loader is saver else cls(loader.config, KVConnectorRole.SCHEDULER, cfg)
    owned = {id(c): c for c in (saver, loader, sched_save, sched_load) if c is not worker}
    try:
        wl = plan_workload(worker, settings)
        views = _byte_views(kv_caches)
        layers = list(views)
        n_groups = len(cfg.kv_cache_groups)
        per_req = wl.blocks_per_request
        half = wl.requests * per_req
        save_ids = [list(range(r * per_req, (r + 1) * per_req)) for r in range(wl.requests)]
        other = cfg.num_blocks - half
        load_base = half if other >= half else 0
        load_ids = [[load_base + b for b in ids] for ids in save_ids] if load_base else save_ids

        def forward(conn: KVConnectorBase, r: int, ids: list[int]) -> None:
            for li, name in enumerate(layers):
                conn.wait_for_layer_load(name)
                for j, b in enumerate(ids):
                    views[name][b].copy_(block_pattern(r, li, j, views[name].shape[1]))
                conn.save_kv_layer(name, kv_caches[name], None)

        def step(scheduler: KVConnectorBase, conn: KVConnectorBase, reqs: list[tuple[Request, list[int]]],
                 compute: bool) -> int:
            matched_total = 0
            for req, ids in reqs:
                matched, _async = scheduler.get_num_new_matched_tokens(req, 0)
                matched = matched or 0
                matched_total += matched
                scheduler.update_state_after_alloc(req, KVCacheBlocks(tuple(list(ids) for _ in range(n_groups))),
                                                   matched)
            meta = scheduler.build_connector_meta(SchedulerOutput([r.request_id for r, _ in reqs]))
            if not isinstance(meta, KVConnectorMetadata):
                raise ConnectorRuntimeError(Problem("connector", f"build_connector_meta returned "
                                                    f"{type(meta).__name__}, not KVConnectorMetadata"))
            conn.bind_connector_metadata(meta)
            conn.start_load_kv(None)
            if compute:
                for req, ids in reqs:
                    forward(conn, int(req.request_id.split("-")[1]), ids)
            else:
                for name in layers:
                    conn.wait_for_layer_load(name)
            conn.wait_for_save()
            conn.get_finished({r.request_id for r, _ in reqs})
            conn.clear_connector_metadata()
            for req, ids in reqs:
                scheduler.request_finished(req, ids)
            return matched_total

        page_bytes = sum(v.shape[1] for v in views.values())
        t0 = time.perf_counter()
        first = [(Request(f"save-{r}", wl.prompt(r)), save_ids[r]) for r in range(wl.requests)]
        preexisting = step(sched_save, saver, first, compute=True)
        t_save = time.perf_counter() - t0
        for v in views.values():
            v.zero_()
        t1 = time.perf_counter()
        second = [(Request(f"load-{r}", wl.prompt(r)), load_ids[r]) for r in range(wl.requests)]
        matched = step(sched_load, loader, second, compute=False)
        t_load = time.perf_counter() - t1
        errors = loader.get_block_ids_with_load_errors()

        expect_tokens = wl.requests * per_req * wl.block_size
        bad = []
        for r in range(wl.requests):
            for li, name in enumerate(layers):
                for j, b in enumerate(load_ids[r]):
                    if not torch.equal(views[name][b], block_pattern(r, li, j, views[name].shape[1])):
                        bad.append((r, name, j))
        verified = not bad and not errors and matched == expect_tokens
        saved = loaded = wl.requests * per_req * page_bytes
        seconds = t_save + t_load
        result = {
            "bytes": saved + loaded,
            "saved_bytes": saved,
            "loaded_bytes": loaded,
            "verified": verified,
            "seconds": round(seconds, 6),
            "gbps": round((saved + loaded) / seconds / 1e9, 3) if seconds > 0 else None,
            "requests": wl.requests,
            "blocks_per_request": per_req,
            "hits": matched // wl.block_size,
            "preexisting_hits": preexisting // wl.block_size,
            "mismatched_blocks": len(bad),
            "load_errors": sorted(errors),
        }
        if not verified:
            why = (f"{len(bad)} block(s) differ from what was saved (first: request {bad[0][0]}, layer "
                   f"{bad[0][1]}, block {bad[0][2]})" if bad else
                   f"the connector matched {matched} of {expect_tokens} tokens" if matched != expect_tokens else
                   f"load errors on blocks {sorted(errors)[:8]}")
            raise ConnectorRuntimeError(Problem("self_test", f"the self-test failed: {why}",
                                                fix="the connector's save or load path is wrong"))
        return result
    finally:
        for conn in owned.values():
            conn.shutdown()


def _twin(worker: KVConnectorBase, kv_role: str, kv_caches: dict[str, "torch.Tensor"]) -> KVConnectorBase:
    """A worker-side connector like ``worker`` but with the other data direction."""
    twin = type(worker)(worker.config.model_copy(update={"kv_role": kv_role}), KVConnectorRole.WORKER,
                        worker.kv_cache_config)
    twin.register_kv_caches(kv_caches)
    return twin


def _scheduler_only(scheduler: KVConnectorBase, settings: Any) -> dict[str, Any]:
    """role=scheduler: the scheduler-side calls for a few requests; no KV bytes exist."""
    wl = plan_workload(scheduler, settings)
    n_groups = len(scheduler.kv_cache_config.kv_cache_groups)
    t0 = time.perf_counter()
    matched_total = 0
    for r in range(wl.requests):
        req = Request(f"sched-{r}", wl.prompt(r))
        matched, is_async = scheduler.get_num_new_matched_tokens(req, 0)
        if matched is not None and (not isinstance(matched, int) or matched < 0):
            raise ConnectorRuntimeError(Problem("self_test", f"get_num_new_matched_tokens returned {matched!r}",
                                                fix="return (a non-negative int or None, bool)"))
        matched_total += matched or 0
        ids = list(range(r * wl.blocks_per_request, (r + 1) * wl.blocks_per_request))
        scheduler.update_state_after_alloc(req, KVCacheBlocks(tuple(list(ids) for _ in range(n_groups))),
                                           matched or 0)
    meta = scheduler.build_connector_meta(SchedulerOutput([f"sched-{r}" for r in range(wl.requests)]))
    ok = isinstance(meta, KVConnectorMetadata)
    seconds = time.perf_counter() - t0
    if not ok:
        raise ConnectorRuntimeError(Problem("self_test", f"build_connector_meta returned {type(meta).__name__}",
                                            fix="return a KVConnectorMetadata"))
    return {"bytes": 0, "verified": True, "seconds": round(seconds, 6), "gbps": None,
            "requests": wl.requests, "matched_tokens": matched_total, "scheduler_only": True}
