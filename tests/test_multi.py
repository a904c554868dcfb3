"""The multi connector (vLLM's MultiConnector): children constructed with the same three arguments,
saves to every child, loads from the first that has the blocks, failures per child."""

from __future__ import annotations

import pytest

from conftest import json_out, run_kvconf
from kvconf.contract.api import KVCacheBlocks, KVConnectorRole, Request, SchedulerOutput
from kvconf.errors import ConfigError
from kvconf.runtime.pipeline import run_job

TIERS = "connector.extra.connectors=[{name: example, kv_role: kv_both}, " \
        "{name: offloading, kv_role: kv_both, extra: {cpu_bytes_to_use: 64MiB}}]"


@pytest.mark.torch
@pytest.mark.nixl
def test_multi_with_nixl_and_offloading_runs_and_verifies_both_children(workdir):
    proc = run_kvconf("connector=multi", "output=json", cwd=workdir, timeout=300)
    assert proc.returncode == 0, proc.stderr
    st = json_out(proc)["self_test"]
    assert [(c["name"], c["verified"]) for c in st["children"]] == [("nixl", True), ("offloading", True)]
    assert all(c["bytes"] > 0 for c in st["children"]) and st["verified"] is True


@pytest.mark.torch
def test_multi_engine_drive_saves_to_every_child_and_loads_from_the_first(workdir):
    proc = run_kvconf("connector=multi", TIERS, "output=json", cwd=workdir, timeout=300)
    assert proc.returncode == 0, proc.stderr
    st = json_out(proc)["self_test"]
    assert st["multi"]["verified"] is True and st["multi"]["hits"] > 0
    assert [c["name"] for c in st["children"]] == ["example", "offloading"]


def test_children_get_the_three_arguments_and_the_parents_engine_id(compose):
    from kvconf.config.models import validate
    from kvconf_connectors.multi import MultiConnector

    cfg = validate({**compose("connector=multi", TIERS, "connector.engine_id=e-7"), "action": "check"})
    kvc = cfg.kv_cache_config
    multi = MultiConnector(cfg.connector, KVConnectorRole.SCHEDULER, kvc)
    try:
        assert [c.kv_cache_config for c in multi.children] == [kvc, kvc]
        assert all(c.role is KVConnectorRole.SCHEDULER and c.config.engine_id == "e-7" for c in multi.children)
    finally:
        multi.shutdown()


@pytest.mark.parametrize(("hits", "loaded"), [((0, 32), 32), ((16, 48), 48), ((32, 32), 32)])
def test_load_comes_from_the_child_that_holds_the_most_of_the_blocks(compose, hits, loaded):
    """Every child sees the blocks; the one holding the most loads (the first among equals): a host
    tier holding a prompt's first blocks does not shadow a disk tier holding all of them."""
    from kvconf.config.models import validate
    from kvconf_connectors.multi import MultiConnector

    cfg = validate({**compose("connector=multi", TIERS), "action": "check"})
    multi = MultiConnector(cfg.connector, KVConnectorRole.SCHEDULER, cfg.kv_cache_config)
    calls: list[tuple[str, int]] = []
    for name, child, hit in zip(multi.names, multi.children, hits):
        child.get_num_new_matched_tokens = lambda req, n, hit=hit: (hit, False)  # type: ignore[method-assign]
        child.update_state_after_alloc = (  # type: ignore[method-assign]
            lambda req, blocks, k, name=name: calls.append((name, k)))
    req = Request("r1", list(range(65)))
    assert multi.get_num_new_matched_tokens(req, 0) == (loaded, False)
    multi.update_state_after_alloc(req, KVCacheBlocks(([1, 2, 3, 4],)), loaded)
    loader = hits.index(loaded)
    assert calls == [(n, loaded if i == loader else 0) for i, n in enumerate(["example", "offloading"])]
    multi.shutdown()


def test_hybrid_plan_only_when_every_child_supports_it(compose):
    report = run_job({**compose("connector=multi", TIERS, "kv_cache=gemma3_hybrid"), "action": "check"})
    assert len(report["plan"]["groups"]) > 1  # both children are SupportsHMA
    data = compose("connector=multi", "kv_cache=gemma3_hybrid",
                   "connector.extra.connectors=[{name: OneGroupOnly, module_path: zoo.connectors, kv_role: kv_both}]")
    report = run_job({**data, "action": "check"})
    assert len(report["plan"]["groups"]) == 1  # vLLM disables its hybrid manager for the whole


def test_a_broken_child_is_reported_at_its_own_path(compose):
    data = compose("connector=multi", "connector.extra.connectors=[{name: offloading, kv_role: kv_both, "
                   "extra: {cpu_bytes_to_use: 0}}, {name: mooncak, kv_role: kv_both}]")
    with pytest.raises(ConfigError) as err:
        run_job({**data, "action": "check"})
    paths = [p.path for p in err.value.problems]
    assert "connector.extra.connectors.0.extra.cpu_bytes_to_use" in paths
    assert "connector.extra.connectors.1.name" in paths


def test_a_tier_that_does_not_load_a_prefix_does_not_save_it_again_over_another_prompts(compose, tmp_path):
    """multi_tiers (offloading, then shared_storage): a second prompt sharing the first one's
    prefix loads it from the host tier; the disk tier holds it too and saves only the new chunks.
    (It used to save the prompt from its first chunk, into a segment named by that chunk: the
    first prompt's segment, replaced, and its tail lost on disk.)"""
    from kvconf.config.models import validate
    from kvconf.runtime.allocate import allocate, layer_views
    from kvconf_connectors.multi import MultiConnector

    cfg = validate({**compose("connector=multi_tiers", "kv_cache=tiny",
                              f"connector.extra.connectors.1.extra.shared_storage_path={tmp_path / 'kv'}"),
                    "action": "check"})
    kvc = cfg.kv_cache_config
    block = kvc.kv_cache_groups[0].kv_cache_spec.block_size

    def side(role):
        return MultiConnector(cfg.connector, role, kvc)

    sched, worker = side(KVConnectorRole.SCHEDULER), side(KVConnectorRole.WORKER)
    caches = layer_views(kvc, allocate(kvc, "cpu"))
    worker.register_kv_caches(caches)
    first = [7] * (4 * block) + list(range(100, 100 + 4 * block)) + [1]
    second = first[:4 * block] + list(range(900, 900 + 4 * block)) + [2]
    for rid, tokens, ids in (("a", first, list(range(0, 9))), ("b", second, list(range(20, 29)))):
        req = Request(rid, tokens)
        n, _ = sched.get_num_new_matched_tokens(req, 0)
        assert n == (0 if rid == "a" else 4 * block)  # b: the shared prefix, from the host tier
        sched.update_state_after_alloc(req, KVCacheBlocks((ids,)), n)
        worker.bind_connector_metadata(sched.build_connector_meta(SchedulerOutput([rid])))
        worker.start_load_kv(None)
        for name, t in caches.items():
            worker.save_kv_layer(name, t, None)
        worker.wait_for_save()
        sending, _ = worker.get_finished({rid})
        sched.update_connector_output(sending or set(), set())
        worker.clear_connector_metadata()
        sched.request_finished(req, ids)
    worker.shutdown()
    sched.shutdown()
    fresh = side(KVConnectorRole.SCHEDULER)  # a new process: the host tier is empty, the disk is not
    try:
        for rid, tokens in (("a2", first), ("b2", second)):
            assert fresh.get_num_new_matched_tokens(Request(rid, tokens), 0) == (8 * block, False), rid
    finally:
        fresh.shutdown()
