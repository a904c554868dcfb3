"""A small engine: drives a connector through its scheduler and worker methods as vLLM does.

For ``action=run`` (and conformance tests and benchmarks): requests whose KV blocks carry a known
pattern are computed and saved through the connector, their blocks are wiped, the same prompts
come back, and what the connector loads is checked byte for byte. :func:`self_test` is what
``action=run`` calls: a connector's own self-test where it has one
(:class:`~kvconf.contract.capabilities.SupportsSelfTest`), else this engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from kvconf.contract.api import (
    KVCacheBlocks,
    KVConnectorMetadata,
    KVConnectorRole,
    Request,
    SchedulerOutput,
    block_hashes,
)
from kvconf.contract.base import KVConnectorBase
from kvconf.contract.capabilities import (
    ColdLoads,
    ExplainsFailures,
    SelfTestContext,
    SupportsHMA,
    SupportsSelfTest,
)
from kvconf.errors import ConfigError, ConnectorRuntimeError, Problem
from kvconf.units import parse_bytes

from .pattern import block_pattern
from .views import byte_views

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Workload", "drive", "plan_workload", "run_self_test", "self_test"]


def self_test(connector: KVConnectorBase, kv_caches: Optional[dict[str, torch.Tensor]],
              ctx: SelfTestContext) -> dict[str, Any]:
    """What ``action=run`` does once the connector is up: the connector's own self-test where it
    has one, else this engine saves blocks with a known pattern through it, loads them back and
    verifies every byte."""
    if isinstance(connector, SupportsSelfTest):
        return connector.self_test(kv_caches, ctx)
    return drive(connector, kv_caches, ctx)


def drive(connector: KVConnectorBase, kv_caches: Optional[dict[str, torch.Tensor]],
          ctx: SelfTestContext) -> dict[str, Any]:
    """This engine's self-test of ``connector`` with the job's settings (:func:`run_self_test`)."""
    shared = ctx.bench.shared_prefix if ctx.bench is not None else 0.5
    cold = bool(ctx.bench is not None and getattr(ctx.bench, "cold_loads", False))
    concurrency = ctx.concurrency
    if concurrency is None and not ctx.batch_steps:
        concurrency = 1  # action=run: one request a step, so later requests find earlier ones' prefix
    budget = int((ctx.data.get("kv_cache") or {}).get("max_num_batched_tokens") or 2048)
    return run_self_test(connector, kv_caches, ctx.settings, shared, salt=ctx.salt,
                         blocks_per_request=ctx.prompt_blocks, concurrency=concurrency, cold=cold,
                         token_budget=budget)


@dataclass(frozen=True)
class Workload:
    """Requests the driver runs. Each has ``blocks_per_request`` full blocks plus one token; the
    first ``shared_blocks`` blocks are the same prompt prefix in every request."""

    requests: int
    blocks_per_request: int
    block_size: int
    shared_blocks: int
    salt: int = 0

    def prompt(self, r: int) -> list[int]:
        shared = self.shared_blocks * self.block_size
        n = self.blocks_per_request * self.block_size + 1
        s = self.salt * 1_000_003
        return [(i * 31 + s) % 32000 if i < shared else (r * 7919 + i * 31 + 1 + s) % 32000 for i in range(n)]


def plan_workload(connector: KVConnectorBase, settings: Any, shared_prefix: float = 0.5, salt: int = 0,
                  blocks_per_request: Optional[int] = None) -> Workload:
    """As many blocks per request as fit both the cache (save and load sets side by side) and
    ``settings.max_bytes`` per pass, or ``blocks_per_request``; ``shared_prefix`` of each request's
    blocks are a shared prefix."""
    cfg = connector.kv_cache_config
    requests = int(getattr(settings, "requests", 4))
    bs = cfg.kv_cache_groups[0].kv_cache_spec.block_size
    groups = len(cfg.kv_cache_groups)  # each group holds its own block ids, from one pool (vLLM's)
    if blocks_per_request is not None:
        if 2 * requests * blocks_per_request * groups > cfg.num_blocks:
            raise ConfigError(Problem(
                "bench.prompt_blocks", f"{requests} requests of {blocks_per_request} blocks need "
                f"{2 * requests * blocks_per_request * groups} blocks (saved and loaded side by side, in "
                f"{groups} KV-cache group(s)); the cache has {cfg.num_blocks}", value=blocks_per_request,
                fix="lower bench.prompt_blocks or bench.requests, or raise kv_cache.num_blocks / kv_cache.memory"))
        return Workload(requests, blocks_per_request, bs, int(blocks_per_request * shared_prefix), salt)
    max_bytes = parse_bytes(getattr(settings, "max_bytes", "64MiB"))
    request_block = sum(s.page_size_bytes for s in cfg.layer_specs().values())  # a token block, every layer
    by_bytes = max(1, max_bytes // max(request_block, 1))
    by_cache = max(1, cfg.num_blocks // (2 * groups))
    total = min(by_bytes, by_cache)
    requests = max(1, min(requests, total))
    per = max(1, total // requests)
    return Workload(requests, per, bs, int(per * shared_prefix), salt)


def key_seed(key: bytes) -> int:
    """The pattern seed of a block: from its prefix hash, so equal prefixes hold equal bytes."""
    return int.from_bytes(key[:4], "little") & 0x7FFFFFFF


@dataclass
class _Tally:
    load_seconds: float = 0.0
    """Time in the connector's load calls (``start_load_kv``, ``wait_for_layer_load``)."""
    save_seconds: float = 0.0
    """Time in its save calls (``save_kv_layer``, ``wait_for_save``)."""
    saved_blocks: int = 0
    loaded_blocks: int = 0
    prefix_hits: int = 0
    hits: int = 0
    misses: int = 0
    mismatched: int = 0
    recomputed: int = 0
    first_bad: str = ""
    request_seconds: list = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.request_seconds = []


def run_self_test(worker: KVConnectorBase, kv_caches: Optional[dict[str, torch.Tensor]],
                  settings: Any, shared_prefix: float = 0.5, salt: int = 0,
                  blocks_per_request: Optional[int] = None, concurrency: Optional[int] = 1,
                  cold: bool = False, token_budget: int = 2048) -> dict[str, Any]:
    """Save then load through ``worker`` (and its scheduler side), as an engine would; every
    block that comes back from the connector is checked byte for byte.

    1. probe: what the connector already holds before this run saves anything;
    2. save pass: one request per step, so later requests reuse the shared prefix saved by
       earlier ones; what the connector does not provide is computed and saved;
    3. the KV cache is wiped (and with ``cold``, a :class:`ColdLoads` connector's files leave the
       page cache); load pass: the same prompts again, loaded from the connector.

    ``concurrency`` requests are scheduled in one step; None: as many as ``token_budget`` tokens
    (vLLM's ``max_num_batched_tokens``) hold, as vLLM's scheduler batches prefills.

    Timed are the connector's calls alone: ``save_seconds`` its save calls, ``load_seconds`` its
    load calls of the load pass (``loaded_bytes``), ``prefix_seconds`` those of the save pass (the
    shared prefix that later requests find, ``prefix_bytes``).
    A block whose load fails is recomputed under ``kv_load_failure_policy=recompute`` and fails
    the self-test (exit 1) under ``fail``, with the connector's reason.
    """
    if worker.role is KVConnectorRole.SCHEDULER or kv_caches is None:
        return _scheduler_only(worker, settings)
    import torch

    cls, cfg = type(worker), worker.kv_cache_config
    # A producer saves and a consumer loads: the side that ``worker`` is not is played by a twin
    # with the other kv_role and the same engine_id, as the other instance of a P/D pair would.
    saver = worker if worker.is_producer else _twin(worker, "kv_producer", kv_caches)
    loader = worker if worker.is_consumer else _twin(worker, "kv_consumer", kv_caches)
    sched_save = cls(saver.config, KVConnectorRole.SCHEDULER, cfg)
    sched_load = sched_save if loader is saver else cls(loader.config, KVConnectorRole.SCHEDULER, cfg)
    owned = {id(c): c for c in (saver, loader, sched_save, sched_load) if c is not worker}
    policy = worker.config.kv_load_failure_policy
    recompute_reasons: dict[str, str] = {}
    try:
        wl = plan_workload(worker, settings, shared_prefix, salt, blocks_per_request)
        views = byte_views(kv_caches)
        layers = list(views)
        page_bytes = sum(v.shape[1] for v in views.values())
        n_groups = len(cfg.kv_cache_groups)
        group_of = cfg.group_of()
        per = wl.blocks_per_request
        half = wl.requests * per * n_groups  # each group's blocks come from the one pool, as in vLLM
        save_ids = [tuple([g * wl.requests * per + r * per + j for j in range(per)] for g in range(n_groups))
                    for r in range(wl.requests)]
        load_base = half if cfg.num_blocks - half >= half else 0
        load_ids = [tuple([load_base + b for b in ids] for ids in group_ids) for group_ids in save_ids]
        prompts = [wl.prompt(r) for r in range(wl.requests)]
        seeds = [[key_seed(k) for k in block_hashes(p, wl.block_size)[:per]] for p in prompts]

        def fill(r: int, ids: tuple[list[int], ...], js: range) -> None:
            for li, name in enumerate(layers):
                own = ids[group_of[name]]
                for j in js:
                    views[name][own[j]].copy_(block_pattern(seeds[r][j], li, 0, views[name].shape[1]))

        def check(r: int, ids: tuple[list[int], ...], js: range, tally: _Tally) -> None:
            for li, name in enumerate(layers):
                own = ids[group_of[name]]
                for j in js:
                    if not torch.equal(views[name][own[j]], block_pattern(seeds[r][j], li, 0, views[name].shape[1])):
                        tally.mismatched += 1
                        tally.first_bad = tally.first_bad or f"request {r}, layer {name}, block {j}"

        def step(scheduler: KVConnectorBase, conn: KVConnectorBase, batch: list[tuple[int, tuple[list[int], ...]]],
                 tag: str, tally: _Tally, compute: bool) -> int:
            """One engine step for the requests of ``batch`` ((index, block ids) each); blocks loaded."""
            reqs, loaded = [], []
            for r, ids in batch:
                req = Request(f"{tag}-{r}", prompts[r])
                matched, _async = scheduler.get_num_new_matched_tokens(req, 0)
                n = (matched or 0) // wl.block_size
                scheduler.update_state_after_alloc(req, KVCacheBlocks(tuple(list(x) for x in ids)), n * wl.block_size)
                reqs.append(req)
                loaded.append(n)
            meta = scheduler.build_connector_meta(SchedulerOutput([q.request_id for q in reqs]))
            if not isinstance(meta, KVConnectorMetadata):
                raise ConnectorRuntimeError(Problem("connector", f"build_connector_meta returned "
                                                    f"{type(meta).__name__}, not KVConnectorMetadata"))
            conn.bind_connector_metadata(meta)
            t0 = time.perf_counter()
            conn.start_load_kv(None)
            for name in layers:
                conn.wait_for_layer_load(name)
            load_s = time.perf_counter() - t0
            tally.load_seconds += load_s
            tally.request_seconds.extend([load_s] * len(batch))
            reasons = conn.get_load_error_reasons() if isinstance(conn, ExplainsFailures) else {}
            bad_blocks = conn.get_block_ids_with_load_errors() | set(reasons)
            for k, ((r, ids), req) in enumerate(zip(batch, reqs)):
                bad = [j for j in range(loaded[k]) if any(x[j] in bad_blocks for x in ids)]
                if bad:
                    why = next((reasons[x[bad[0]]] for x in ids if x[bad[0]] in reasons),
                               "the connector reported a load error")
                    if policy == "fail":
                        raise ConnectorRuntimeError(Problem(
                            "self_test", f"request {req.request_id}: {len(bad)} block(s) failed to load "
                            "(kv_load_failure_policy=fail)", details=(why,),
                            fix="connector.kv_load_failure_policy=recompute recomputes such blocks instead"))
                    recompute_reasons[req.request_id] = why
                    tally.recomputed += len(bad)
                    fill(r, ids, range(bad[0], loaded[k]))  # from the first bad block on, as a prefix
                    loaded[k] = bad[0]
                check(r, ids, range(loaded[k]), tally)
                tally.loaded_blocks += loaded[k]
                fill(r, ids, range(loaded[k], per))  # computed (save pass) or recomputed (load pass)
                if not compute:
                    tally.misses += per - loaded[k]
            if compute:
                t1 = time.perf_counter()
                for name in layers:
                    conn.save_kv_layer(name, kv_caches[name], None)
                conn.wait_for_save()
                tally.save_seconds += time.perf_counter() - t1
                save_errors = conn.get_save_errors() if isinstance(conn, ExplainsFailures) else {}
                for k, req in enumerate(reqs):
                    save_error = save_errors.get(req.request_id)
                    if save_error is None:
                        tally.saved_blocks += per - loaded[k]
                        continue
                    if policy == "fail":
                        raise ConnectorRuntimeError(Problem(
                            "self_test", f"request {req.request_id}: its blocks could not be saved "
                            "(kv_load_failure_policy=fail)", details=(save_error,),
                            fix="make the tier writable; with connector.kv_load_failure_policy=recompute the "
                                "request goes on and later requests recompute what is missing"))
                    recompute_reasons[req.request_id] = save_error
                    if isinstance(scheduler, ExplainsFailures):
                        scheduler.report_save_failed(req.request_id)
            sending, recving = conn.get_finished({q.request_id for q in reqs})
            scheduler.update_connector_output(sending or set(), recving or set())
            conn.clear_connector_metadata()
            for (_, ids), req in zip(batch, reqs):
                if isinstance(scheduler, SupportsHMA):
                    scheduler.request_finished_all_groups(req, ids)
                else:
                    scheduler.request_finished(req, ids[0])
            return sum(loaded)

        preexisting = sum((sched_save.get_num_new_matched_tokens(Request(f"probe-{r}", prompts[r]), 0)[0] or 0)
                          // wl.block_size for r in range(wl.requests))
        save_tally, load_tally = _Tally(), _Tally()
        per_step = concurrency or max(1, token_budget // (per * wl.block_size + 1))
        batches = [list(range(i, min(i + per_step, wl.requests))) for i in range(0, wl.requests, per_step)]
        for batch in batches:
            save_tally.prefix_hits += step(sched_save, saver, [(r, save_ids[r]) for r in batch], "save", save_tally,
                                           compute=True)
        for v in views.values():
            v.zero_()
        if isinstance(loader, ColdLoads) and cold:
            loader.drop_cached()
        for batch in batches:
            load_tally.hits += step(sched_load, loader, [(r, load_ids[r]) for r in batch], "load", load_tally,
                                    compute=False)
        for r in range(wl.requests):  # after the load pass every block holds its pattern
            check(r, load_ids[r], range(per), load_tally)

        seconds = save_tally.save_seconds + save_tally.load_seconds + load_tally.load_seconds
        saved = save_tally.saved_blocks * page_bytes
        loaded_bytes = load_tally.loaded_blocks * page_bytes
        prefix_bytes = save_tally.loaded_blocks * page_bytes
        mismatched = save_tally.mismatched + load_tally.mismatched
        result = {
            "bytes": saved + loaded_bytes + prefix_bytes,
            "saved_bytes": saved,
            "loaded_bytes": loaded_bytes,
            "prefix_bytes": prefix_bytes,
            "save_seconds": round(save_tally.save_seconds, 6),
            "load_seconds": round(load_tally.load_seconds, 6),
            "prefix_seconds": round(save_tally.load_seconds, 6),
            "cold_loads": bool(cold and isinstance(loader, ColdLoads)),
            "request_seconds": [round(x, 6) for x in load_tally.request_seconds],
            "verified": mismatched == 0 and (load_tally.hits > 0 or bool(recompute_reasons)),
            "seconds": round(seconds, 6),
            "gbps": round((saved + loaded_bytes + prefix_bytes) / seconds / 1e9, 3) if seconds > 0 else None,
            "requests": wl.requests,
            "blocks_per_request": per,
            "shared_prefix_blocks": wl.shared_blocks,
            "hits": load_tally.hits,
            "misses": load_tally.misses,
            "prefix_hits": save_tally.prefix_hits,
            "preexisting_hits": preexisting,
            "recomputed_blocks": save_tally.recomputed + load_tally.recomputed,
            "recomputed": recompute_reasons,
            "mismatched_blocks": mismatched,
        }
        if mismatched:
            where = save_tally.first_bad or load_tally.first_bad
            raise ConnectorRuntimeError(Problem(
                "self_test", f"the self-test failed: {mismatched} block(s) differ from what was saved (first: {where})",
                fix="the connector's save or load path is wrong"))
        if load_tally.hits == 0 and not recompute_reasons:
            if saver is not loader:
                side = "kv_consumer" if loader is worker else "kv_producer"
                raise ConnectorRuntimeError(Problem(
                    "connector.kv_role", f"the self-test failed: the connector loaded nothing back. With kv_role={side} "
                    "one instance saves (kv_producer) and another with the same engine_id loads (kv_consumer), "
                    "as the two sides of a P/D pair: a consumer never saves, and finds only the blocks it can "
                    "reach from the producer's saves", value=side,
                    fix="keep saved blocks where an instance of the same engine_id finds them (a store shared by "
                        "engine_id, a disk, a peer), or run the self-test with connector.kv_role=kv_both, where one "
                        "instance saves and loads"))
            raise ConnectorRuntimeError(Problem(
                "self_test", "the self-test failed: the connector loaded nothing back of what it saved",
                fix="check the connector's capacity and its scheduler side (get_num_new_matched_tokens)"))
        return result
    finally:
        for conn in owned.values():
            conn.shutdown()


def _twin(worker: KVConnectorBase, kv_role: str, kv_caches: dict[str, torch.Tensor]) -> KVConnectorBase:
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
        per = wl.blocks_per_request
        scheduler.update_state_after_alloc(req, KVCacheBlocks(tuple(
            [(g * wl.requests + r) * per + j for j in range(per)] for g in range(n_groups))), matched or 0)
    meta = scheduler.build_connector_meta(SchedulerOutput([f"sched-{r}" for r in range(wl.requests)]))
    ok = isinstance(meta, KVConnectorMetadata)
    seconds = time.perf_counter() - t0
    if not ok:
        raise ConnectorRuntimeError(Problem("self_test", f"build_connector_meta returned {type(meta).__name__}",
                                            fix="return a KVConnectorMetadata"))
    return {"bytes": 0, "verified": True, "seconds": round(seconds, 6), "gbps": None,
            "requests": wl.requests, "matched_tokens": matched_total, "scheduler_only": True}
