"""The plug-in's JSON without vLLM: ``action=export export.target=kvconf`` writes it, ``kvconf lint``
checks the tree inside, ``kvconf import`` takes the tree back, and the plug-in reads a tree given
inline or as overrides with kvconf's messages."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import kvconf_env
from kvconf.errors import ConfigError
from kvconf.vllm.tree import check_tree, connector_tree


def kvconf(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvconf", *args], capture_output=True, text=True, cwd=cwd,
                          env=kvconf_env(), timeout=120)


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from kvconf.cli.app import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd, env=kvconf_env(), timeout=120)


@pytest.mark.parametrize("overrides", [
    ("connector=shared_storage", "connector.kv_load_failure_policy=recompute"),
    ("connector=offloading", "connector.extra.cpu_bytes_to_use=2GiB", "connector.kv_role=kv_producer"),
    ("connector=multi", "connector.extra.connectors=[{name: offloading, kv_role: kv_both, extra: "
     "{cpu_bytes_to_use: 64MiB}}, {name: shared_storage, kv_role: kv_both}]"),
])
def test_export_for_the_plugin_round_trips_through_import(overrides, workdir):
    out = kvconf(*overrides, "action=export", "export.target=kvconf", cwd=workdir)
    assert out.returncode == 0, out.stderr
    ktc = json.loads(out.stdout)
    tree = ktc["kv_connector_extra_config"]["kvconf_connector"]
    assert (ktc["kv_connector"], ktc["kv_connector_module_path"]) == ("KVConfConnector", "kvconf.vllm")
    assert ktc["kv_role"] == tree["kv_role"] and ktc["kv_load_failure_policy"] == tree["kv_load_failure_policy"]
    assert "engine_id" not in ktc and tree["engine_id"] is None  # each vLLM instance makes its own
    assert set(ktc) <= {"kv_connector", "kv_connector_module_path", "kv_role", "kv_load_failure_policy",
                        "kv_buffer_device", "engine_id", "kv_connector_extra_config"}
    lint = cli("lint", out.stdout, cwd=workdir)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    (workdir / "mine").mkdir()
    imported = cli("import", out.stdout, "--out", str(workdir / "mine"), "--name", "back", cwd=workdir)
    assert imported.returncode == 0, imported.stderr
    again = kvconf("--config-dir", str(workdir / "mine"), "connector=back", "action=export", "export.target=kvconf",
                   cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == ktc


def test_the_default_export_target_is_still_vllms_own_connector(workdir):
    out = kvconf("connector=offloading", "action=export", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["kv_connector"] == "OffloadingConnector"
    bad = kvconf("connector=offloading", "action=export", "export.target=sglang", cwd=workdir)
    assert bad.returncode == 2 and "export.target" in bad.stderr and "kvconf" in bad.stderr


def _plugin(tree: dict, **top) -> str:
    return json.dumps({"kv_connector": "KVConfConnector", "kv_connector_module_path": "kvconf.vllm",
                       "kv_role": tree.get("kv_role", "kv_both"), **top,
                       "kv_connector_extra_config": {"kvconf_connector": tree}})


def test_lint_reports_each_problem_of_the_tree_at_its_path(workdir):
    bad = cli("lint", _plugin({"name": "shared_storage", "kv_role": "kv_both", "extra": {"capacty": "1GiB"}}),
              cwd=workdir)
    assert bad.returncode == 1
    assert "kv_connector_extra_config.kvconf_connector.extra.capacty" in bad.stdout
    assert "did you mean capacity?" in bad.stdout
    unknown = cli("lint", _plugin({"name": "sharedstorage", "kv_role": "kv_both"}), cwd=workdir)
    assert unknown.returncode == 1 and "kvconf_connector.name" in unknown.stdout
    mismatch = cli("lint", _plugin({"name": "example", "kv_role": "kv_consumer"}, kv_role="kv_both"), cwd=workdir)
    assert mismatch.returncode == 1 and "kvconf_connector.kv_role" in mismatch.stdout, mismatch.stdout


def test_the_plugin_reads_a_tree_inline_or_composed_from_overrides():
    transfer = SimpleNamespace(kv_role="kv_both", kv_load_failure_policy="fail")
    composed = connector_tree({"kvconf_overrides": ["connector=offloading", "connector.extra.cpu_bytes_to_use=8MiB"]})
    assert composed["name"] == "offloading" and composed["extra"]["cpu_bytes_to_use"] == "8MiB"
    job = check_tree(composed, "scheduler", transfer, None)
    assert job.cls.__name__ == "OffloadingConnector"
    with pytest.raises(ConfigError) as typo:
        connector_tree({"kvconf_overrides": ["connector=offloading", "connector.extra.cpu_bytes_to_uze=1GiB"]})
    assert "did you mean: cpu_bytes_to_use?" in str(typo.value)
    with pytest.raises(ConfigError) as neither:
        connector_tree({"kvconf_conector": {}})
    text = str(neither.value)
    assert "kv_connector_extra_config.kvconf_conector" in text and "did you mean: kvconf_connector?" in text
    with pytest.raises(ConfigError) as policy:
        check_tree({"name": "example", "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}, "worker",
                   transfer, None)
    assert "connector.kv_load_failure_policy" in str(policy.value) and "vLLM's --kv-transfer-config" in str(policy.value)


@pytest.mark.parametrize("name", ["mooncake", "nixl"])
def test_peer_to_peer_connectors_export_for_the_plugin_with_their_timeouts_and_lease(name, workdir):
    out = kvconf(f"connector={name}", "connector.kv_role=kv_producer", "connector.extra.lease_seconds=7",
                 "action=export", "export.target=kvconf", cwd=workdir)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    tree = config["kv_connector_extra_config"]["kvconf_connector"]
    assert config["kv_role"] == "kv_producer" and tree["name"] == name and tree["extra"]["lease_seconds"] == 7


def test_a_peer_to_peer_connector_inside_a_multi_connector_is_refused_for_the_plugin(workdir):
    out = kvconf("connector=multi", "action=export", "export.target=kvconf", cwd=workdir)  # the shipped multi: nixl first
    assert out.returncode == 2 and "connector.extra.connectors.0.name" in out.stderr, out.stderr
    assert "not inside a multi connector" in out.stderr
    assert "Traceback" not in out.stderr
