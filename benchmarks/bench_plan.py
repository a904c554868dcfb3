"""How long kvconf takes to plan the largest shipped layout (DeepSeek-V3 style, 61 MLA layers, with
the max_model_len check), plan only (``action=check``), against a bare Hydra app composing the same
config: bench_legacy_reject.py's method.

    .venv/bin/python benchmarks/bench_plan.py [--runs 15]

Goal (issue #11): within 1.3x of the bare app. Prints the medians and the ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_legacy_reject import BARE_APP, REPO, timed

OVERRIDES = ["kv_cache=deepseek_v3_mla", "kv_cache.memory=16GiB", "kv_cache.max_model_len=32768", "action=check",
             "role=scheduler"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args()
    env = {**os.environ}
    with tempfile.TemporaryDirectory() as cwd:
        bare_py = Path(cwd) / "bare_app.py"
        bare_py.write_text(BARE_APP.replace("CONF_DIR", repr(str(REPO / "kvconf" / "conf"))))
        kvconf_cmd = [sys.executable, "-m", "kvconf", *OVERRIDES]
        bare_cmd = [sys.executable, str(bare_py), *OVERRIDES,
                    "hydra.callbacks.summary._target_=hydra.experimental.callback.Callback"]
        # kvconf's bytecode, as an installed copy has it (pip compiles on install; an editable
        # install under PYTHONDONTWRITEBYTECODE=1 would compile every module on every run)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "kvconf"), str(REPO / "kvconf_connectors"),
                        str(REPO / "tests" / "zoo")], check=True, capture_output=True)
        for _ in range(2):  # warm the page cache and .pyc files
            timed(kvconf_cmd, env, cwd, 0)
            timed(bare_cmd, env, cwd, 0)
        kv, bare = [], []
        for _ in range(args.runs):  # interleaved, so machine noise hits both alike
            kv.append(timed(kvconf_cmd, env, cwd, 0))
            bare.append(timed(bare_cmd, env, cwd, 0))
    mk, mb = statistics.median(kv), statistics.median(bare)
    print(f"runs: {args.runs} each, interleaved")
    print(f"kvconf planning {' '.join(OVERRIDES)}: median {mk * 1000:.0f} ms")
    print(f"bare Hydra app composing the same config: median {mb * 1000:.0f} ms")
    print(f"ratio: {mk / mb:.2f}x (goal: at most 1.3x)")


if __name__ == "__main__":
    main()
