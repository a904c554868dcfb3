"""Helpers: run kvconf as a user does (a subprocess), or compose in-process for speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
collect_ignore = ["zoo", "fake_mooncake", "fake_nixl"]  # modules for the tests to import by path, some broken on purpose
REPO = TESTS.parent


def kvconf_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_kvconf(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120,
               module: str = "kvconf") -> subprocess.CompletedProcess:
    """``python -m kvconf ARGS`` in ``cwd``, as a user types it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env or kvconf_env(),
                          capture_output=True, text=True, timeout=timeout)


def json_out(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON on stdout:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty working directory outside the repository."""
    d = tmp_path / "cwd"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def compose():
    """``compose(*overrides)``: the composed config as plain data, through Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from kvconf.cli import CONF_DIR

    sys.path.insert(0, str(TESTS))

    def _compose(*overrides: str) -> dict[str, Any]:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
            data = OmegaConf.to_container(cfg, resolve=True)
        data.pop("hydra", None)
        return data

    return _compose
