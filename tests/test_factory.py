"""Resolution: built-in names import lazily, entry points add connectors, module_path wins."""

from __future__ import annotations

import json

import pytest

from conftest import json_out, kvconf_env, run_kvconf
from kvconf.contract import registry as factory
from kvconf.errors import ConfigError


def test_importing_kvconf_imports_no_connector_and_no_torch():
    import subprocess
    import sys

    code = ("import sys, kvconf, kvconf.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('kvconf_connectors.') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_the_chosen_connector_module_is_imported(workdir, tmp_path):
    probe = tmp_path / "probe.json"
    proc = run_kvconf("connector=offloading", "action=check", cwd=workdir,
                      env=kvconf_env(KVCONF_PROBE=str(probe)), module="zoo.probe")
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(probe.read_text())
    assert seen["connector_modules"] == ["kvconf_connectors.offloading", "kvconf_connectors.tier"]
    assert seen["torch"] is False


def test_entry_point_adds_a_connector(workdir, tmp_path):
    site = tmp_path / "site"
    dist = site / "thirdparty_kv-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-kv\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kvconf.connectors]\nthirdparty = zoo.connectors:Good\n")
    env = kvconf_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    proc = run_kvconf("connector.name=thirdparty", "action=check", "output=json", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert out["connector"]["class"] == "Good" and out["connector"]["source"] == "entry_point"


def test_module_path_wins_over_a_registered_name(workdir):
    proc = run_kvconf("connector=example", "connector.module_path=zoo.connectors", "action=check", "output=json",
                      cwd=workdir)
    out = json_out(proc)
    assert out["connector"]["name"] == "example" and out["connector"]["class"] == "Good"
    assert out["connector"]["module"] == "zoo.connectors" and out["connector"]["source"] == "module_path"


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        factory.register_connector("example", "x", "Y")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as exc:
        factory.resolve("exampel", None)
    (p,) = exc.value.problems
    assert p.suggestion() == "example" and "mooncake" in p.allowed
