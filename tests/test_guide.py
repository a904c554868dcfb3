"""docs/writing-a-connector.md: its connector runs (action=run) and passes the conformance kit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, kvconf_env, run_kvconf

GUIDE = REPO / "docs" / "writing-a-connector.md"


def guide_connector(folder: Path) -> Path:
    m = re.search(r"<!-- guide-connector: (\S+) -->\n```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert m, "the guide's connector block is missing"
    path = folder / m.group(1)
    path.write_text(m.group(2))
    return path


def run_guide_connector(workdir: Path, *overrides: str):
    """``python -m kvconf`` with the guide's connector (written into ``workdir``)."""
    guide_connector(workdir)
    return run_kvconf("connector.module_path=my_connector", "connector.name=HostConnector", *overrides,
                      cwd=workdir, env=kvconf_env(PYTHONPATH=str(workdir)))


@pytest.mark.torch
def test_guide_connector_passes_action_run(workdir):
    proc = run_guide_connector(workdir, "output=json")
    assert proc.returncode == 0, proc.stderr
    assert '"verified": true' in proc.stdout and '"hits": 0' not in proc.stdout


def test_guide_connector_passes_the_contract_check(workdir):
    proc = run_guide_connector(workdir, "action=check")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.torch
def test_guide_connector_passes_the_conformance_kit(workdir):
    guide_connector(workdir)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--kvconf-connector", "my_connector:HostConnector"], cwd=workdir,
                          env=kvconf_env(PYTHONPATH=str(workdir)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 passed" in proc.stdout


def test_no_docstring_points_outside_the_repository():
    offenders = []
    for path in [*REPO.glob("kvconf/**/*.py"), *REPO.glob("connectors/**/*.py"), *REPO.glob("conf/**/*.py"),
                 *REPO.glob("docs/*.md")]:
        text = path.read_text()
        if re.search(r"shared/(reference|ARCHITECTURE|STYLE)", text):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders
