"""Helpers: run kvconf as a user does (a subprocess), or compose in-process for speed.

Each test owns what it starts: every process a test starts (and every process those start) carries
the test's own ``KVCONF_TEST_OWNER`` token in its environment, so :func:`owned_processes` finds
exactly those and nothing else that runs on the machine; each test gets its own ``TMPDIR`` and
``XDG_CACHE_HOME`` (the shared_storage connector's default folder lives there). A test that needs
torch, an engine or
network namespaces is marked and skips with the reason where it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
# modules for the tests to import by path, some broken on purpose
collect_ignore = ["zoo", "fake_mooncake", "fake_nixl", "fake_vllm", "no_vllm", "vllm_runner.py"]
REPO = TESTS.parent
CONF = REPO / "conf"
OWNER = "KVCONF_TEST_OWNER"

_NEEDS = {
    "torch": ("torch", "torch is not installed (bash scripts/setup.sh installs the CPU build)"),
    "mooncake": ("mooncake.engine", "the Mooncake Transfer Engine is not installed (bash scripts/setup.sh)"),
    "nixl": ("nixl._api", "NIXL is not installed (bash scripts/setup.sh)"),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


SLOW_FIRST = ("test_vllm_plugin.py", "test_vllm_pd.py", "test_vllm_serve_pd.py", "test_vllm_bench.py",
              "test_sweeps.py", "test_readme.py")
"""Files whose tests take tens of seconds each (real vLLM engines, sweeps): collected first, so that
pytest-xdist's workers start them early instead of one worker finishing them alone at the end."""


def pytest_collection_modifyitems(config, items) -> None:
    """Skips, with the reason, each test whose marker names something this machine lacks; puts
    the slow files first (:data:`SLOW_FIRST`), each file's tests in their order."""
    missing = {name: why for name, (module, why) in _NEEDS.items() if not _importable(module)}
    for item in items:
        for name, why in missing.items():
            if item.get_closest_marker(name) is not None:
                item.add_marker(pytest.mark.skip(reason=why))
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def owned_processes() -> list[int]:
    """PIDs of live processes that the running test started (directly or not): those whose
    environment carries its token. What else runs on the machine is never counted."""
    token = os.environ.get(OWNER)
    if not token:
        return []
    needle = f"{OWNER}={token}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


@pytest.fixture(autouse=True)
def _owned(tmp_path_factory, monkeypatch):
    """Marks what this test starts, gives it its own TMPDIR, and stops whatever it left running."""
    monkeypatch.setenv(OWNER, uuid.uuid4().hex)
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))  # shared_storage's default home
    yield
    for pid in owned_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def kvconf_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def side_channel(address: str, key_file: str | None):
    """A DEALER socket to the producer at ``address``, as a consumer makes one: it proves the key
    in ``key_file`` (None: no key, as a stranger's socket)."""
    import zmq

    from kvconf_connectors.p2p import auth

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if key_file is not None:
        key = auth.load_key(key_file)
        assert key is not None
        auth.client_keys(s, key)
    s.connect(f"tcp://{address}")
    return s


def run_kvconf(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120,
               module: str = "kvconf") -> subprocess.CompletedProcess:
    """``python -m kvconf ARGS`` in ``cwd``, as a user types it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env or kvconf_env(),
                          capture_output=True, text=True, timeout=timeout)


def stacks_then_kill(proc: subprocess.Popen, wait: float = 1.0) -> tuple[str, str]:
    """Ends a kvconf process that hung: asks it for every thread's stack first (SIGUSR1), so its
    stderr says where it was; what it printed (stdout, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(wait)
        proc.kill()
    out, err = proc.communicate()
    return out or "", err or ""


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
    from kvconf.conf import compose_data

    sys.path.insert(0, str(TESTS))

    def _compose(*overrides: str) -> dict[str, Any]:
        return compose_data(list(overrides))

    return _compose
