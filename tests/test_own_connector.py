"""A connector of one's own, walked as a new user would from docs/writing-a-connector.md: its
settings (``extra_config`` without ``extra="forbid"``) reach it validated from every place a user
sets them (the conformance kit's ``--kvconf-override``, ``python -m kvconf``, a connector file),
a misspelt key or a bad value is kvconf's message wherever it is written, ``kvconf validate FILE``
checks what it can without running the module and says what it could not, ``--help`` lists the
class's keys, and the README lists a connector file's keys."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, kvconf_env, run_kvconf
from kvconf.config.models import ConnectorConfig
from test_guide import guide_connector

OWN = ["connector.module_path=my_connector", "connector.name=HostConnector"]


@pytest.fixture
def guide(workdir: Path) -> Path:
    guide_connector(workdir)
    return workdir


def kit(folder: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [a for o in overrides for a in ("--kvconf-override", o)]
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--kvconf-connector",
                           "my_connector:HostConnector", *args], cwd=folder, env=kvconf_env(PYTHONPATH=str(folder)),
                          capture_output=True, text=True, timeout=300)


def kvconf(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return run_kvconf(*args, cwd=folder, env=kvconf_env(PYTHONPATH=str(folder)))


@pytest.mark.torch
def test_the_kit_builds_the_connector_with_the_override_validated(guide):
    proc = kit(guide, "connector.extra.max_blocks=64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kvconf: my_connector:HostConnector: connector.extra: max_blocks=64" in proc.stdout
    assert "5 passed" in proc.stdout and "warning" not in proc.stdout.lower()


@pytest.mark.parametrize(("override", "expected"), [
    ("connector.extra.max_block=64", ["connector.extra.max_block", "did you mean: max_blocks?"]),
    ("connector.extra.max_blocks=many", ["connector.extra.max_blocks", "'many'", "integer"]),
    ("+connector.extra.max_block=64", ["connector.extra.max_block", "unknown key"]),
    ("connector.kv_rol=kv_both", ["connector.kv_rol", "did you mean: kv_role?"]),
])
def test_the_kit_stops_on_a_bad_setting_with_kvconfs_message(guide, override, expected):
    proc = kit(guide, override)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert all(e in out for e in expected), out
    assert "Traceback" not in out and "passed" not in out and "failed" not in out  # no test ran


def test_an_unknown_key_is_refused_without_extra_forbid(guide):
    assert "forbid" not in (guide / "my_connector.py").read_text()
    proc = kvconf(guide, *OWN, "connector.extra.max_blok=2", "action=check")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "connector.extra.max_blok" in proc.stderr and "did you mean: max_blocks?" in proc.stderr


@pytest.mark.torch
def test_the_validated_setting_reaches_the_connector(guide):
    """max_blocks=1 keeps one block of each prompt: the run still verifies, with fewer hits."""
    full = kvconf(guide, *OWN, "output=json")
    one = kvconf(guide, *OWN, "connector.extra.max_blocks=1", "output=json")
    assert full.returncode == 0 and one.returncode == 0, full.stderr + one.stderr
    hits = [int(re.search(r'"hits": (\d+)', p.stdout).group(1)) for p in (full, one)]
    assert hits[1] < hits[0], hits


def _file(folder: Path, text: str) -> Path:
    (folder / "connector").mkdir(exist_ok=True)
    path = folder / "connector" / "host.yaml"
    path.write_text(text)
    return path


def test_validate_says_what_it_could_not_check_without_importing(guide):
    path = _file(guide, "name: HostConnector\nmodule_path: my_connector\nkv_role: kv_both\nextra:\n  max_blok: 2\n")
    proc = subprocess.run([sys.executable, "-m", "kvconf", "validate", str(path)], cwd=guide,
                          env=kvconf_env(PYTHONPATH=str(guide)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all valid" not in proc.stdout
    assert "note: connector.extra: not checked" in proc.stdout and "--import-modules" in proc.stdout
    assert "1 not fully checked" in proc.stdout
    imported = subprocess.run([sys.executable, "-m", "kvconf", "validate", "--import-modules", str(path)], cwd=guide,
                              env=kvconf_env(PYTHONPATH=str(guide)), capture_output=True, text=True)
    assert imported.returncode == 1
    assert f"{path}:5:3: connector.extra.max_blok: unknown key 'max_blok' (did you mean max_blocks?)" in imported.stdout


def test_validate_flags_a_legacy_class_in_a_file_as_the_matrix_does(guide):
    (guide / "old_connector.py").write_text(
        "from kvconf import KVConnectorBase\n\n\nclass Old(KVConnectorBase):\n"
        "    def __init__(self, config, role):\n        super().__init__(config, role, None)\n")
    path = _file(guide, "name: Old\nmodule_path: old_connector\nkv_role: kv_both\n")
    proc = subprocess.run([sys.executable, "-m", "kvconf", "validate", str(path)], cwd=guide,
                          env=kvconf_env(PYTHONPATH=str(guide)), capture_output=True, text=True)
    assert proc.returncode == 1
    assert "legacy 2-argument constructor" in proc.stdout and "1 invalid" in proc.stdout
    matrix = subprocess.run([sys.executable, "-m", "kvconf", "validate", "--matrix", "--config-dir", str(guide)],
                            cwd=guide, env=kvconf_env(PYTHONPATH=str(guide)), capture_output=True, text=True)
    assert matrix.returncode == 1 and "legacy 2-argument constructor" in matrix.stdout


def test_validate_checks_a_file_of_a_class_with_inherited_settings_fully(guide):
    (guide / "my_offload.py").write_text(
        "from kvconf_connectors.offloading import OffloadingConnector\n\n\nclass MyOffload(OffloadingConnector):\n"
        "    def __init__(self, config, role, kv_cache_config):\n"
        "        super().__init__(config, role, kv_cache_config)\n")
    path = _file(guide, "name: MyOffload\nmodule_path: my_offload\nkv_role: kv_both\n"
                        "extra:\n  cpu_bytes_to_us: 1GiB\n")
    proc = subprocess.run([sys.executable, "-m", "kvconf", "validate", str(path)], cwd=guide,
                          env=kvconf_env(PYTHONPATH=str(guide)), capture_output=True, text=True)
    assert proc.returncode == 1 and "did you mean cpu_bytes_to_use?" in proc.stdout


def test_help_lists_the_classs_own_settings(guide):
    proc = kvconf(guide, *OWN, "--help")
    assert proc.returncode == 0, proc.stderr
    section = proc.stdout.split("== connector.extra.* of connector.module_path=my_connector", 1)[1]
    assert "connector.extra.max_blocks: int = 4096" in section.split("==", 2)[1]
    assert "of connector=offloading" not in proc.stdout  # the built-in connectors' settings are not this class's


def test_a_consumer_that_finds_nothing_is_told_why(guide):
    (guide / "lonely.py").write_text((guide / "my_connector.py").read_text().replace(
        "self.store = _STORES.setdefault(str(config.engine_id), {})", "self.store = {}"))
    proc = kvconf(guide, "connector.module_path=lonely", "connector.name=HostConnector", "connector.kv_role=kv_consumer")
    assert proc.returncode == 1
    assert "connector.kv_role" in proc.stderr and "a consumer never saves" in proc.stderr
    assert "kv_role=kv_both" in proc.stderr


def test_the_readme_lists_every_key_of_a_connector_file():
    readme = (REPO / "README.md").read_text()
    table = readme.split("**A connector file's keys**", 1)[1].split("\n\n", 2)[1]
    listed = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert listed == list(ConnectorConfig.model_fields)
