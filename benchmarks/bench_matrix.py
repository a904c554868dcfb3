"""``kvconf validate --matrix`` over the built-in conf/ against one ``python -m kvconf action=check``.

    .venv/bin/python benchmarks/bench_matrix.py [--runs 10]

Goal (issue #5): the whole matrix (every combination of connector x role x kv_cache, at least 32)
in no more than 2x the wall time of a single check. Interleaved runs; prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def timed(cmd: list[str], cwd: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return dt, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    matrix = [sys.executable, "-m", "kvconf", "validate", "--matrix", "--format", "json"]
    single = [sys.executable, "-m", "kvconf", "action=check"]
    with tempfile.TemporaryDirectory() as cwd:
        _, out = timed(matrix, cwd)
        checked = json.loads(out)["checked"]
        timed(single, cwd)
        m, s = [], []
        for _ in range(args.runs):
            m.append(timed(matrix, cwd)[0])
            s.append(timed(single, cwd)[0])
    mm, ms = statistics.median(m), statistics.median(s)
    print(f"kvconf validate --matrix ({checked} combinations): median {mm * 1000:.0f} ms "
          f"(min {min(m) * 1000:.0f}, max {max(m) * 1000:.0f})")
    print(f"python -m kvconf action=check (one):       median {ms * 1000:.0f} ms "
          f"(min {min(s) * 1000:.0f}, max {max(s) * 1000:.0f})")
    print(f"ratio: {mm / ms:.2f}x (goal: at most 2x)")


if __name__ == "__main__":
    main()
