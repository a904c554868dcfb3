"""How long kvconf takes to reject a legacy (2-argument) connector, against a bare Hydra app that
composes the same config and exits: the floor any Hydra-based tool pays.

    .venv/bin/python benchmarks/bench_legacy_reject.py [--runs 15]

Goal (issue #2, kept by the restructure of #10): kvconf's rejection within 1.3x of the bare app's wall time. Prints the medians
and the ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEGACY = "uses the legacy 2-argument constructor"

# Imports nothing of kvconf: only Hydra, the same conf/ tree (and kvconf's help node, which the
# defaults list names), and the same overrides.
BARE_APP = '''
import hydra
from hydra.core.config_store import ConfigStore

ConfigStore.instance().store(group="hydra/help", name="kvconf", package="hydra.help", node={"template": ""})

@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg):
    pass

app()
'''


def timed(cmd: list[str], env: dict[str, str], cwd: str, expect: int, says: str = "") -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != expect or says not in proc.stderr:
        raise SystemExit(f"{cmd} exited {proc.returncode}, expected {expect} saying {says!r}:\n{proc.stderr}")
    return dt


def compare(what: str, overrides: list[str], runs: int, expect: int = 0, says: str = "",
            env: dict[str, str] | None = None) -> None:
    """``python -m kvconf OVERRIDES`` against the bare Hydra app given the same overrides,
    interleaved ``runs`` times each; prints the medians and the ratio."""
    env = env or dict(os.environ)
    with tempfile.TemporaryDirectory() as cwd:
        bare_py = Path(cwd) / "bare_app.py"
        bare_py.write_text(BARE_APP.replace("CONF_DIR", repr(str(REPO / "conf"))))
        kvconf_cmd = [sys.executable, "-m", "kvconf", *overrides]
        # Hydra's no-op callback for kvconf's sweep summary, whose import would charge kvconf to the bare app
        bare_cmd = [sys.executable, str(bare_py), *overrides,
                    "hydra.callbacks.summary._target_=hydra.experimental.callback.Callback"]
        # kvconf's bytecode, as an installed copy has it (pip compiles on install; an editable
        # install under PYTHONDONTWRITEBYTECODE=1 would compile every module on every run)
        folders = [REPO / "kvconf", REPO / "conf", REPO / "connectors", REPO / "tests" / "zoo"]
        subprocess.run([sys.executable, "-m", "compileall", "-q", *map(str, folders)], check=True, capture_output=True)
        for _ in range(2):  # warm the page cache and .pyc files
            timed(kvconf_cmd, env, cwd, expect, says)
            timed(bare_cmd, env, cwd, 0)
        kv, bare = [], []
        for _ in range(runs):  # interleaved, so machine noise hits both alike
            kv.append(timed(kvconf_cmd, env, cwd, expect, says))
            bare.append(timed(bare_cmd, env, cwd, 0))
    mk, mb = statistics.median(kv), statistics.median(bare)
    print(f"runs: {runs} each, interleaved")
    print(f"kvconf {what}: median {mk * 1000:.0f} ms (min {min(kv) * 1000:.0f}, max {max(kv) * 1000:.0f})")
    print(f"bare Hydra app composing the same config: median {mb * 1000:.0f} ms "
          f"(min {min(bare) * 1000:.0f}, max {max(bare) * 1000:.0f})")
    print(f"ratio: {mk / mb:.2f}x (goal: at most 1.3x)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args()
    compare("rejecting a legacy connector (action=check)",
            ["connector.module_path=zoo.connectors", "connector.name=Legacy", "action=check"], args.runs,
            expect=2, says=LEGACY, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})


if __name__ == "__main__":
    main()
