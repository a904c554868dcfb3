"""Hybrid models end to end: the plan vLLM makes, allocated exactly, and every built-in connector
(all are SupportsHMA) saving, loading and verifying every byte on it, the groups sharing one
allocation and holding block ids of their own, on the layer-outermost and the block-outermost
layouts."""

from __future__ import annotations

import pytest

from conftest import json_out, run_kvconf

pytestmark = pytest.mark.torch

CONNECTORS = ["example", "offloading", "shared_storage",
              pytest.param("mooncake", marks=pytest.mark.mooncake), pytest.param("nixl", marks=pytest.mark.nixl)]


def test_run_allocates_exactly_the_hybrid_plan_and_verifies_every_group(workdir):
    proc = run_kvconf("kv_cache=gemma3_hybrid", "kv_cache.memory=1GiB", "action=run", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert out["plan"]["num_blocks"] == 1024 and len(out["plan"]["groups"]) == 6
    assert out["allocated_bytes"] == out["plan"]["total_bytes"] == 1 << 30
    st = out["self_test"]
    assert st["verified"] is True and st["hits"] > 0 and st["mismatched_blocks"] == 0


@pytest.mark.parametrize("layout", ["LBHNC", "BLHNC"])
@pytest.mark.parametrize("connector", CONNECTORS)
def test_every_connector_round_trips_a_hybrid_model(workdir, tmp_path, connector, layout):
    extra = [f"connector.extra.shared_storage_path={tmp_path / 'kv'}"] if connector == "shared_storage" else []
    if connector == "offloading":  # a 64 MiB host tier: the default 1 GiB pool is zeroed at registration (seconds)
        extra = ["connector.extra.cpu_bytes_to_use=64MiB"]
    proc = run_kvconf(f"connector={connector}", "kv_cache=gemma3_hybrid", f"kv_cache.layout={layout}",
                      "self_test.transfer_bytes=16MiB", "output=json", *extra, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert out["self_test"]["verified"] is True and out["self_test"]["bytes"] > 0
    assert out["allocated_bytes"] == out["plan"]["total_bytes"]


@pytest.mark.parametrize("target", [
    "kvconf_connectors.example:ExampleConnector", "kvconf_connectors.offloading:OffloadingConnector",
    "kvconf_connectors.shared_storage:SharedStorageConnector",
    pytest.param("kvconf_connectors.mooncake:MooncakeConnector", marks=pytest.mark.mooncake),
    pytest.param("kvconf_connectors.nixl:NixlConnector", marks=pytest.mark.nixl)])
def test_every_connector_passes_the_conformance_kit_on_a_hybrid_model(workdir, tmp_path, target):
    from test_ci_tools import conformance

    extra = ["--kvconf-override", f"connector.extra.shared_storage_path={tmp_path / 'kv'}"] if "Shared" in target else []
    proc = conformance(target, workdir, "--kvconf-override", "kv_cache=gemma3_hybrid", *extra)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "5 passed" in proc.stdout


@pytest.mark.parametrize(("connector", "groups"), [("example", 6), ("offloading", 6), ("shared_storage", 6),
                                                   ("mooncake", 6), ("nixl", 6)])
def test_the_plan_follows_whether_the_connector_supports_hybrid_groups(workdir, connector, groups):
    proc = run_kvconf(f"connector={connector}", "kv_cache=gemma3_hybrid", "action=check", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert len(json_out(proc)["plan"]["groups"]) == groups
