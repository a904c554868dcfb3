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


FOLDERS = {"kvconf": "kvconf", "kvconf.conf": "conf", "kvconf_connectors": "connectors",
           "hydra_plugins.kvconf_sweeper": "hydra_plugins/kvconf_sweeper"}
"""Import name -> the repository's folder (pyproject.toml's package-dir)."""


def repository_files() -> set[str]:
    """Each module and config file of the repository, at the path it has in an installed copy."""
    out = set()
    for name, folder in FOLDERS.items():
        root = REPO / folder
        for path in root.rglob("*"):
            if path.suffix in (".py", ".yaml") or (path.name == "config.json" and "models" in path.parts):
                if "__pycache__" not in path.parts:
                    out.add("/".join([*name.split("."), *path.relative_to(root).parts]))
    return out


def test_the_repository_top_level_is_the_design_cards():
    top = {p.name for p in REPO.iterdir()}
    assert {"conf", "connectors", "kvconf", "schemas", "tests", "pyproject.toml"} <= top
    assert not (REPO / "kvconf" / "conf").exists() and not (REPO / "kvconf_connectors").exists()


def test_wheel_holds_every_package_module_and_config_file_under_its_import_name(wheel):
    names = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    assert names == repository_files()
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == {
        "kvconf", "kvconf.bench", "kvconf.ci", "kvconf.cli", "kvconf.conf", "kvconf.config", "kvconf.contract",
        "kvconf.runtime", "kvconf.vllm", "kvconf_connectors", "kvconf_connectors.p2p", "hydra_plugins.kvconf_sweeper"}
    assert "hydra_plugins/__init__.py" not in names  # a namespace package that other plugins share
    models = {f"kvconf/{p.relative_to(REPO)}" for p in (CONF / "models").glob("*/config.json")}
    assert len(models) == 10 and models <= names  # the model configs kv_cache.model can name


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
    main_job = subprocess.run([sys.executable, "-m", "kvconf", "connector=mooncake", "role=worker", "output=json"],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert main_job.returncode == 0, main_job.stderr  # the README's main job, from the installed copy
    report = json.loads(main_job.stdout)
    assert report["self_test"]["verified"] and report["connector"]["module"].startswith("kvconf_connectors.")
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
        assert f"$schema=../../schemas/{group}.schema.json" in path.read_text()
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_committed_schemas_are_current():
    proc = subprocess.run([sys.executable, "-m", "kvconf.ci.schemas", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_source_of_a_mapped_package_is_found_without_importing_it():
    """kvconf validate reads a module_path class from its source; kvconf_connectors is connectors/."""
    code = ("import sys; from kvconf.contract.static import source_of; "
            "print(source_of('kvconf_connectors.offloading')); print('kvconf_connectors' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(REPO / "connectors" / "offloading.py"), "False"]
