"""kvconf works from a non-editable install: conf/ and the built-in connectors ship inside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import CONF, REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True)
    (whl,) = out.glob("kvconf-*.whl")
    return whl


def test_wheel_ships_conf_and_connectors(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    assert {f"kvconf/conf/{c}" for c in conf} <= names
    assert {"kvconf/conf/__init__.py", "kvconf_connectors/example.py", "kvconf/cli/app.py",
            "kvconf_connectors/p2p/connector.py", "hydra_plugins/kvconf_sweeper/__init__.py"} <= names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package that other plugins share
    models = {str(p.relative_to(REPO)) for p in (CONF / "models").glob("*/config.json")}
    assert len(models) == 9 and models <= names  # the model configs kv_cache.model can name


def test_installed_copy_runs_from_anywhere(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-m", "kvconf", "kv_cache=llama3_8b", "action=check", "output=json"],
                          cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["plan"]["bytes_per_block"] == 2 << 20
    where = subprocess.run([sys.executable, "-c", "import kvconf.cli as c; print(c.CONF_DIR)"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target)) and list(cwd.iterdir()) == []
    sweep = subprocess.run([sys.executable, "-m", "kvconf", "-m", "kv_cache=tiny,llama3_8b", "action=check"], cwd=cwd,
                           env=env, capture_output=True, text=True)
    assert sweep.returncode == 0, sweep.stderr  # kvconf's sweeper (hydra/sweeper=kvconf) is in the wheel


def test_every_conf_yaml_validates_against_its_group_schema():
    jsonschema = pytest.importorskip("jsonschema")
    for path in CONF.glob("*/*.yaml"):
        group = path.parent.name
        schema = json.loads((REPO / "schemas" / f"{group}.schema.json").read_text())
        assert f"$schema=../../../schemas/{group}.schema.json" in path.read_text()
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_committed_schemas_are_current():
    proc = subprocess.run([sys.executable, "-m", "kvconf.schemagen", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
